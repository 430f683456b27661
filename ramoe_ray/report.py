"""``ramoe report``: the comparison tables and figures of one sweep, read from MLflow only.

A sweep (ramoe_ray/sweep.py, logging through tracking.py) logs one *parent* run (tags ``ramoe.kind =
sweep``, ``ramoe.sweep = NAME``; artefacts ``config.resolved.yaml`` and ``cells/cells.json``) and one
*child* run per Tune trial (tags ``mlflow.parentRunId``, ``ramoe.kind = trial``, ``model``, ``task``, ``language``,
``method``, ``selected``; metrics ``val_acc``, ..., and on the selected child of each cell × method
``test_acc`` and ``test_div_L<layer>``). This module reads those runs and writes, into one folder
(default ``<run folder>/report/``):

- ``report.md``: per model × task a table (rows = languages; test accuracy of the selected trial of
  SFT, Steering, RISE, RA-MoE; Δ = RA-MoE − SFT in accuracy points; the cell's ci proportion), the
  ci-proportion-vs-gain correlation (Pearson r, Spearman ρ, percentile-bootstrap 95 % intervals),
  the figures, the failed trials;
- ``scatter.png``: ci proportion (x) against Δ (y), one colour per model;
- ``divergence_<model>.png``: routing divergence to English by MoE layer, per language, base model
  (dashed, from cells.json) and the selected RA-MoE trials (solid, their ``test_div_L*``);
- ``report.json``: the numbers of the tables.

Every file is written to a temporary name and renamed, then logged to the parent run under
``report/``. Nothing here trains, evaluates or starts Ray.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ramoe_ray import tracking
from ramoe_ray.cache import write_text_atomic
from ramoe_ray.config import METHODS, ConfigError, RunConfig

LABELS = {"sft": "SFT", "steering": "Steering", "rise": "RISE", "ramoe": "RA-MoE (best)"}
N_RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
NA_CORR = "n/a (needs ≥3 cells with varying values)"
DASH = "—"



# ------------------------------------------------------------------------------------------ MLflow access


def _describe(runs: list, limit: int = 10) -> str:
    if not runs:
        return "none"
    out = [f"{r.info.run_id} (sweep {r.data.tags.get('ramoe.sweep', '?')!r}, {r.info.status})" for r in runs[:limit]]
    more = f" and {len(runs) - limit} more" if len(runs) > limit else ""
    return ", ".join(out) + more


def _experiment(cfg: RunConfig, client, uri: str):
    """The config's experiment (None if it does not exist); ConfigError when the store cannot be read."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment_by_name(cfg.tracking.experiment)
    except MlflowException as e:
        raise ConfigError(f"tracking {uri}: cannot read experiment {cfg.tracking.experiment!r}: {e}") from None
    except Exception as e:  # connection refused, DNS, TLS...: the URI is unreachable
        raise ConfigError(f"tracking {uri}: unreachable ({type(e).__name__}: {e})") from None


def _given_parent(cfg: RunConfig, client, uri: str, exp_ids: list[str], sweep_run_id: str):
    """--sweep RUN_ID: that run, if it is a sweep's parent."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(sweep_run_id)
    except MlflowException:
        raise ConfigError(f"--sweep {sweep_run_id!r}: no such run at {uri}; sweeps in experiment "
                          f"{cfg.tracking.experiment!r}: {_describe(tracking.sweeps(client, exp_ids))}") from None
    kind = run.data.tags.get("ramoe.kind")
    if kind != "sweep":
        raise ConfigError(f"--sweep {sweep_run_id!r}: run is not a sweep parent (tag ramoe.kind = {kind!r}); "
                          f"sweeps in experiment {cfg.tracking.experiment!r}: "
                          f"{_describe(tracking.sweeps(client, exp_ids))}")
    return run


def _find_parent(cfg: RunConfig, client, uri: str, sweep_run_id: str | None):
    """The sweep to report on: ``sweep_run_id``, else the newest sweep of the config's name; a ConfigError
    naming what the store holds otherwise."""
    exp = _experiment(cfg, client, uri)
    exp_ids = [exp.experiment_id] if exp is not None else []
    if sweep_run_id is not None:
        return _given_parent(cfg, client, uri, exp_ids, sweep_run_id)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"tracking {uri}: experiment {cfg.tracking.experiment!r} does not exist (no sweep has "
                          f"logged to it); experiments there: {', '.join(names) or 'none'}")
    sweeps = tracking.sweeps(client, exp_ids)
    if not sweeps:
        raise ConfigError(f"tracking {uri}: experiment {cfg.tracking.experiment!r} holds no sweep run "
                          f"(tag ramoe.kind = sweep); run `ramoe sweep` first")
    mine = [r for r in sweeps if r.data.tags.get("ramoe.sweep") == cfg.name]
    if not mine:
        raise ConfigError(f"experiment {cfg.tracking.experiment!r} holds no sweep of config {cfg.name!r}; "
                          f"choose one with --sweep: {_describe(sweeps)}")
    return mine[0]


def _trial(run) -> dict:
    t, d = run.data.tags, run.data
    return {
        "run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time or 0,
        "model": t.get("model"), "task": t.get("task"), "language": t.get("language"), "method": t.get("method"),
        "trial_key": t.get("trial_key"), "selected": str(t.get("selected", "")).lower() == "true",
        "error": t.get("error"), "metrics": dict(d.metrics), "params": dict(d.params),
    }


def collect(cfg: RunConfig, sweep_run_id: str | None = None) -> dict:
    """Everything the report needs from MLflow: the parent run, its cells.json and resolved config,
    and its trials (child runs tagged ramoe.kind = trial)."""
    import yaml

    uri = cfg.mlflow_uri
    client = tracking.read_client(uri)
    parent = _find_parent(cfg, client, uri, sweep_run_id)
    pid = parent.info.run_id
    children = tracking.child_runs(client, parent.info.experiment_id, pid)
    trials = [_trial(r) for r in children if r.data.tags.get("ramoe.kind", "trial") == "trial"]
    with tempfile.TemporaryDirectory(prefix="ramoe-report-") as tmp:
        p = tracking.download_artifact(uri, pid, f"{tracking.CELLS_ARTIFACT}/cells.json", tmp)
        cells_json = json.loads(p.read_text()) if p else None
        p = tracking.download_artifact(uri, pid, "config.resolved.yaml", tmp)
        resolved = yaml.safe_load(p.read_text()) if p else None
    expected = parent.data.params.get("ramoe.expected_trials", parent.data.tags.get("ramoe.expected_trials"))
    try:
        expected = int(float(expected)) if expected is not None else None
    except ValueError:
        expected = None
    exp = client.get_experiment(parent.info.experiment_id)
    return {
        "client": client, "tracking_uri": uri, "experiment": exp.name if exp else cfg.tracking.experiment,
        "parent": {"run_id": pid, "name": parent.data.tags.get("ramoe.sweep", parent.info.run_name),
                   "status": parent.info.status, "start_time": parent.info.start_time},
        "expected_trials": expected, "cells_json": cells_json, "resolved": resolved, "trials": trials,
    }


# ------------------------------------------------------------------------------------------ numbers


def _names(items: Any) -> list[str]:
    return [i["name"] if isinstance(i, dict) else str(i) for i in (items or [])]


def _ordered_cells(data: dict, cfg: RunConfig) -> tuple[list, list, bool]:
    """(cells in display order, expected methods, whether the cells come from the sweep's own record)."""
    res = data["resolved"]
    src = res if isinstance(res, dict) else None
    models = _names(src.get("models")) if src else [m.name for m in cfg.models]
    tasks = _names(src.get("tasks")) if src else [t.name for t in cfg.tasks]
    langs = list(src.get("languages") or []) if src else list(cfg.languages)
    methods = [m for m in (src.get("methods") if src and src.get("methods") else cfg.methods)]
    seen: list = []
    if src:
        seen = [(m, t, l) for m in models for t in tasks for l in langs]
    for c in data["cells_json"] or []:
        key = (c.get("model"), c.get("task"), c.get("language"))
        if key not in seen:
            seen.append(key)
    for tr in data["trials"]:
        key = (tr["model"], tr["task"], tr["language"])
        if None not in key and key not in seen:
            seen.append(key)
    if not src and not data["cells_json"]:  # nothing recorded of the plan: fall back to the config's grid
        for key in ((m.name, t.name, l) for m in cfg.models for t in cfg.tasks for l in cfg.languages):
            if key not in seen:
                seen.append(key)
    # group by model then task, keeping first-seen order
    order_m = list(dict.fromkeys(k[0] for k in seen))
    order_t = list(dict.fromkeys(k[1] for k in seen))
    seen.sort(key=lambda k: (order_m.index(k[0]), order_t.index(k[1])))
    return seen, methods, bool(src or data["cells_json"])


def _selected(trials: list[dict]) -> dict:
    """(cell, method) -> the selected, finished trial with a test accuracy (the newest if several)."""
    out: dict = {}
    for tr in trials:
        if not (tr["selected"] and tr["status"] == "FINISHED" and _finite(tr["metrics"].get("test_acc"))):
            continue
        key = ((tr["model"], tr["task"], tr["language"]), tr["method"])
        if key not in out or tr["start_time"] > out[key]["start_time"]:
            out[key] = tr
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _corr(x: np.ndarray, y: np.ndarray, kind: str) -> dict:
    """r (or ρ), p-value and a percentile-bootstrap interval (paired resampling of cells; resamples in
    which x or y is constant have no correlation and are dropped, their count reported)."""
    from scipy import stats

    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": None, "p": None, "low": None, "high": None, "n": n, "dropped": None, "note": NA_CORR}
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr

    def stat(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return np.nan
        return float(fn(a, b).statistic)

    res = fn(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (nan) make scipy warn about its own interval
        boot = stats.bootstrap((x, y), stat, paired=True, vectorized=False, n_resamples=N_RESAMPLES,
                               confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(SEED))
    dist = np.asarray(boot.bootstrap_distribution, dtype=float)
    ok = dist[np.isfinite(dist)]
    alpha = (1 - CONFIDENCE) / 2
    low, high = (np.percentile(ok, [100 * alpha, 100 * (1 - alpha)]) if len(ok) else (np.nan, np.nan))
    return {"r": float(res.statistic), "p": float(res.pvalue), "low": float(low), "high": float(high), "n": n,
            "dropped": int(len(dist) - len(ok)), "note": None}


def _ci_proportion(key: tuple, info: dict, trials: list[dict]) -> float | None:
    """The cell's ci proportion: cells.json's, else what its trials logged."""
    ci = info.get(key, {}).get("ci_proportion")
    if not _finite(ci):  # fall back on what the trials logged
        ci = next((tr["metrics"]["ci_proportion"] for tr in trials
                   if (tr["model"], tr["task"], tr["language"]) == key
                   and _finite(tr["metrics"].get("ci_proportion"))), None)
    return float(ci) if ci is not None else None


def _cell_row(key: tuple, sel: dict, info: dict, trials: list[dict]) -> dict:
    """One table row: test accuracy (and run) of each method's selected trial, Δ, ci proportion, RA-MoE's knobs."""
    row: dict = {}
    for m in METHODS:
        tr = sel.get((key, m))
        row[m] = float(tr["metrics"]["test_acc"]) if tr else None
        row[f"{m}_run"] = tr["run_id"] if tr else None
    row["delta"] = (100.0 * (row["ramoe"] - row["sft"])) if row["ramoe"] is not None and row["sft"] is not None \
        else None
    row["ci_proportion"] = _ci_proportion(key, info, trials)
    rm = sel.get((key, "ramoe"))
    row["ramoe_params"] = ({k: rm["params"].get(k) for k in ("lam", "band", "top_k")} | {
        "val_acc": rm["metrics"].get("val_acc")} if rm else None)
    return row


def _model_divergence(model: str, cells_order: list, info: dict, sel: dict) -> dict | None:
    """Divergence by layer of one model: base (cells.json) and selected RA-MoE (test_div_L*) per language,
    mean over tasks; None when nothing was recorded."""
    entries = [c for k, c in info.items() if k[0] == model]
    layers = next((list(c["moe_layers"]) for c in entries if c.get("moe_layers")), None)
    ram = [tr for (k, m), tr in sel.items() if k[0] == model and m == "ramoe"]
    if layers is None:  # no cells.json: the layers the trials logged
        found = {int(n[len("test_div_L"):]) for tr in ram for n in tr["metrics"] if n.startswith("test_div_L")}
        layers = sorted(found) or None
    if not layers:
        return None
    base, trained = {}, {}
    for lang in dict.fromkeys(k[2] for k in cells_order if k[0] == model):
        b = [c["divergence_base"] for c in entries if c.get("language") == lang
             and len(c.get("divergence_base") or []) == len(layers)]
        if b:
            base[lang] = np.mean(np.asarray(b, dtype=float), axis=0).tolist()
        r = [[tr["metrics"][f"test_div_L{l}"] for l in layers] for tr in ram if tr["language"] == lang
             and all(f"test_div_L{l}" in tr["metrics"] for l in layers)]
        if r:
            trained[lang] = np.mean(np.asarray(r, dtype=float), axis=0).tolist()
    band = sorted({int(l) for c in entries for l in (c.get("band_layers") or [])})
    if not (base or trained):
        return None
    return {"layers": layers, "base": base, "ramoe": trained, "band_layers": band}


def _counts(trials: list[dict], expected: int | None) -> dict:
    statuses = [tr["status"] for tr in trials]
    return {"total": len(statuses), "finished": statuses.count("FINISHED"), "failed": statuses.count("FAILED"),
            "running": sum(s in ("RUNNING", "SCHEDULED") for s in statuses), "killed": statuses.count("KILLED"),
            "expected": expected}


def compute(data: dict, cfg: RunConfig) -> dict:
    """The report's numbers from what ``collect`` read (no MLflow access)."""
    cells_order, methods, planned = _ordered_cells(data, cfg)
    info = {(c.get("model"), c.get("task"), c.get("language")): c for c in data["cells_json"] or []}
    sel = _selected(data["trials"])
    cells = {key: _cell_row(key, sel, info, data["trials"]) for key in cells_order}
    missing = [f"{'/'.join(map(str, key))} {m}" for key in cells_order for m in METHODS
               if (key, m) not in sel and m in methods]

    pts = [(k, v["ci_proportion"], v["delta"]) for k, v in cells.items()
           if v["delta"] is not None and v["ci_proportion"] is not None]
    x = np.array([p[1] for p in pts], dtype=float)
    y = np.array([p[2] for p in pts], dtype=float)
    pearson, spearman = _corr(x, y, "pearson"), _corr(x, y, "spearman")
    divergence = {model: d for model in dict.fromkeys(k[0] for k in cells_order)
                  if (d := _model_divergence(model, cells_order, info, sel)) is not None}

    counts = _counts(data["trials"], data["expected_trials"])
    partial = bool(missing) or not planned or (counts["expected"] is not None
                                                and counts["finished"] + counts["failed"] < counts["expected"])
    failed = [{"run_id": tr["run_id"], "cell": f"{tr['model']}/{tr['task']}/{tr['language']}", "method": tr["method"],
               "trial_key": tr["trial_key"], "error": tr["error"]} for tr in data["trials"] if tr["status"] == "FAILED"]
    return {
        "sweep": dict(data["parent"], experiment=data["experiment"], tracking_uri=data["tracking_uri"]),
        "counts": counts, "methods": methods, "partial": partial, "missing": missing, "planned": planned,
        "cells": cells,
        "scatter": {"points": [{"model": k[0], "task": k[1], "language": k[2], "ci_proportion": float(a),
                                "delta": float(b)} for k, a, b in pts]},
        "pearson": pearson, "spearman": spearman,
        "bootstrap": {"n_resamples": N_RESAMPLES, "seed": SEED, "confidence": CONFIDENCE, "method": "percentile",
                      "paired": True},
        "divergence": divergence, "failed": failed,
    }


# ------------------------------------------------------------------------------------------ figures


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return write_text_atomic(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_figure(report: dict, path: Path) -> Path:
    """ci proportion (x) against Δ = RA-MoE − SFT in points (y), one colour per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = report["scatter"]["points"]
    models = list(dict.fromkeys(p["model"] for p in pts))
    colours = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        mp = [p for p in pts if p["model"] == m]
        ax.scatter([p["ci_proportion"] for p in mp], [p["delta"] for p in mp], color=colours(i % 10), label=m, s=36)
        for p in mp:
            ax.annotate(f"{p['task']}/{p['language']}", (p["ci_proportion"], p["delta"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="tab:gray", linewidth=0.8)
    if not pts:
        ax.text(0.5, 0.5, "no cell with both RA-MoE and SFT results", ha="center", va="center",
                transform=ax.transAxes)
    pr, sr = report["pearson"], report["spearman"]
    sub = (f"Pearson r = {pr['r']:.2f}, Spearman ρ = {sr['r']:.2f} (n = {pr['n']})" if pr["r"] is not None
           else f"n = {pr['n']}: correlation n/a")
    ax.set_title(f"ci proportion vs RA-MoE gain over SFT\n{sub}", fontsize=10)
    ax.set_xlabel("ci proportion (train split)")
    ax.set_ylabel("Δ test accuracy, RA-MoE − SFT (points)")
    if models:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def divergence_figure(model: str, div: dict, path: Path) -> Path:
    """Divergence to English by MoE layer: per language, base model dashed, selected RA-MoE solid."""
    plt = _plt()
    layers = div["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = plt.get_cmap("tab10")
    langs = list(dict.fromkeys(list(div["base"]) + list(div["ramoe"])))
    for i, lang in enumerate(langs):
        c = colours(i % 10)
        if lang in div["base"]:
            ax.plot(layers, div["base"][lang], linestyle="--", color=c, marker="o", markersize=3,
                    label=f"{lang} base")
        if lang in div["ramoe"]:
            ax.plot(layers, div["ramoe"][lang], linestyle="-", color=c, marker="o", linewidth=2,
                    label=f"{lang} RA-MoE")
    if div["band_layers"]:
        ax.axvspan(min(div["band_layers"]) - 0.5, max(div["band_layers"]) + 0.5, color="tab:gray", alpha=0.2,
                   label="band")
    ax.set_xticks(layers)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("normalised JSD to English")
    ax.set_title(f"{model}: routing divergence to English (mean over tasks)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ markdown


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}"


def _corr_line(name: str, c: dict) -> str:
    if c["r"] is None:
        return f"- {name}: {NA_CORR}"
    drop = f"; {c['dropped']} resamples with a constant x or y dropped" if c["dropped"] else ""
    return (f"- {name} = {c['r']:.3f} (95 % CI [{c['low']:.3f}, {c['high']:.3f}], p = {c['p']:.3g}, "
            f"n = {c['n']}{drop})")


def _missing_text(report: dict, limit: int = 20) -> str:
    """'m2/passage/syn2 (all methods), m2/arith/syn6 ramoe, ...': whole cells grouped, at most ``limit`` items."""
    by_cell: dict = {}
    for item in report["missing"]:
        cell, method = item.rsplit(" ", 1)
        by_cell.setdefault(cell, []).append(method)
    expected = [m for m in METHODS if m in report["methods"]]
    items = [f"{c} (all methods)" if len(ms) == len(expected) and len(ms) > 1 else f"{c} {', '.join(ms)}"
             for c, ms in by_cell.items()]
    more = f" and {len(items) - limit} more cells" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _summary_lines(report: dict) -> list[str]:
    """Title, the sweep run, the trial counts, what is partial."""
    s, n = report["sweep"], report["counts"]
    lines = [f"# RA-MoE sweep report: {s['name']}", ""]
    lines.append(f"- sweep run: `{s['run_id']}` ({s['status']}), experiment `{s['experiment']}`, "
                 f"tracking `{s['tracking_uri']}`")
    exp = f" of {n['expected']} expected" if n["expected"] is not None else ""
    extra = "".join(f", {n[k]} {k}" for k in ("running", "killed") if n[k])
    lines.append(f"- trials: {n['finished']} finished, {n['failed']} failed{extra} ({n['total']} logged{exp})")
    if report["partial"]:
        what = []
        if report["missing"]:
            what.append(f"{len(report['missing'])} cell × method results missing: " + _missing_text(report))
        if not report["planned"]:
            what.append("the sweep's cells.json and resolved config are not logged; cells are the config's grid")
        if n["expected"] is not None and n["finished"] + n["failed"] < n["expected"]:
            what.append(f"{n['expected'] - n['finished'] - n['failed']} expected trials not done")
        lines.append(f"- **partial sweep**: {'; '.join(what) or 'results missing'}")
    return lines


def _accuracy_lines(report: dict) -> list[str]:
    """Per model × task a table: rows = languages, the selected trials' test accuracy, Δ, ci proportion."""
    lines = ["", "## Test accuracy (%) of the selected trial per cell and method", "",
             "Selected = best validation accuracy among the trials of the cell and method. "
             f"Δ = RA-MoE − SFT in accuracy points; {DASH} = no result (not run, failed or not selected yet).", ""]
    groups = list(dict.fromkeys((k[0], k[1]) for k in report["cells"]))
    for model, task in groups:
        lines += [f"### {model} / {task}", "",
                  "| language | " + " | ".join(LABELS[m] for m in METHODS) + " | Δ (points) | ci proportion |",
                  "|---|" + "---:|" * (len(METHODS) + 2)]
        for (m, t, lang), row in report["cells"].items():
            if (m, t) != (model, task):
                continue
            delta = DASH if row["delta"] is None else f"{row['delta']:+.1f}"
            ci = DASH if row["ci_proportion"] is None else f"{row['ci_proportion']:.3f}"
            lines.append(f"| {lang} | " + " | ".join(_pct(row[x]) for x in METHODS) + f" | {delta} | {ci} |")
        lines.append("")
    return lines


def _knob_lines(report: dict) -> list[str]:
    """The selected RA-MoE trial's λ, band and top-k per cell."""
    knob_rows = [(k, r["ramoe_params"]) for k, r in report["cells"].items() if r["ramoe_params"]]
    if not knob_rows:
        return []
    lines = ["Selected RA-MoE settings:", "", "| cell | λ | band | top_k | val acc (%) |", "|---|---:|---|---:|---:|"]
    for k, p in knob_rows:
        va = _pct(p["val_acc"]) if _finite(p.get("val_acc")) else DASH
        lines.append(f"| {'/'.join(k)} | {p['lam'] or DASH} | {p['band'] or DASH} | {p['top_k'] or DASH} | {va} |")
    return lines + [""]


def _correlation_lines(report: dict, paths: dict) -> list[str]:
    b = report["bootstrap"]
    lines = ["## ci proportion vs gain", "",
             f"Cells with both RA-MoE and SFT results: {report['pearson']['n']} "
             f"(x = ci proportion of the train split, y = Δ in points).", "",
             _corr_line("Pearson r", report["pearson"]), _corr_line("Spearman ρ", report["spearman"]), "",
             f"Intervals: {b['method']} bootstrap, {b['n_resamples']} paired resamples of cells "
             f"(scipy.stats.bootstrap, seed {b['seed']}).", ""]
    if paths.get("scatter"):
        lines += [f"![ci proportion vs gain]({Path(paths['scatter']).name})", ""]
    return lines


def _divergence_lines(report: dict, paths: dict) -> list[str]:
    lines = ["## Routing divergence to English by MoE layer", "",
             "Dashed: base model (stage 2, train split); solid: the selected RA-MoE trials (test split); "
             "mean over tasks; shaded: the band.", ""]
    if not report["divergence"]:
        lines += ["No divergence recorded yet.", ""]
    for model in report["divergence"]:
        lines += [f"### {model}", ""]
        p = paths.get("divergence", {}).get(model)
        if p:
            lines += [f"![divergence {model}]({Path(p).name})", ""]
    return lines


def _failed_lines(report: dict) -> list[str]:
    if not report["failed"]:
        return []
    lines = ["## Failed trials", "", "| run | cell | method | error |", "|---|---|---|---|"]
    for f in report["failed"]:
        err = re.sub(r"\s+", " ", str(f["error"] or "")).replace("|", "\\|")[:160] or DASH
        lines.append(f"| `{f['run_id']}` | {f['cell']} | {f['method']} | {err} |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    """report.md from the dict ``compute`` returns (figures named by ``report['paths']`` when present)."""
    paths = report.get("paths", {})
    lines = (_summary_lines(report) + _accuracy_lines(report) + _knob_lines(report)
             + _correlation_lines(report, paths) + _divergence_lines(report, paths) + _failed_lines(report))
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ entry point


def _jsonable(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k != "cells"}
    out["cells"] = {"/".join(k): v for k, v in report["cells"].items()}
    return out


def render_html(markdown: str, folder: Path) -> str:
    """report.md as one self-contained HTML page (figures embedded as data URIs): MLflow's artifact
    viewer shows it with its figures, which it does not do for a markdown file's relative images.
    Handles what render_markdown writes: headings, bullets, pipe tables, images, **bold**, `code`."""
    import base64
    import html

    def inline(t: str) -> str:
        t = html.escape(t)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", t)

    out, table, bullets = [], [], False
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
            table = []
        if bullets and not line.startswith("- "):
            out.append("</ul>")
            bullets = False
        if m := re.fullmatch(r"(#+) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip()):
            f = folder / m.group(2)
            if f.is_file():
                data = base64.b64encode(f.read_bytes()).decode()
                out.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}" style="max-width:100%"></p>')
        elif line.startswith("- "):
            if not bullets:
                out.append("<ul>")
                bullets = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(out)}</body></html>"


def build_report(cfg: RunConfig, sweep_run_id: str | None = None, out_dir: Any = None) -> dict:
    """Reads the sweep (``sweep_run_id`` or the config's newest sweep) from MLflow, writes report.md,
    report.json, scatter.png and divergence_<model>.png into ``out_dir`` (default
    ``<run folder>/report``), logs them to the parent run under ``report/`` and returns the numbers:
    ``cells`` {(model, task, language): {sft, steering, rise, ramoe (test accuracy 0..1 or None), delta
    (points or None), ci_proportion, ...}}, ``pearson`` / ``spearman`` {r, p, low, high, n, ...},
    ``paths``, ``markdown`` and the rest of what the markdown shows."""
    data = collect(cfg, sweep_run_id)
    report = compute(data, cfg)
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict = {"scatter": str(scatter_figure(report, out / "scatter.png")), "divergence": {}}
    for model, div in report["divergence"].items():
        paths["divergence"][model] = str(divergence_figure(model, div, out / f"divergence_{_safe(model)}.png"))
    paths["markdown"] = str(out / "report.md")
    paths["json"] = str(out / "report.json")
    report["paths"] = paths
    report["markdown"] = render_markdown(report)
    write_text_atomic(out / "report.md", report["markdown"])
    paths["html"] = str(write_text_atomic(out / "report.html", render_html(report["markdown"], out)))
    write_text_atomic(out / "report.json", json.dumps(_jsonable(report), indent=2, default=str))
    client, pid = data["client"], report["sweep"]["run_id"]
    for p in [paths["markdown"], paths["html"], paths["json"], paths["scatter"], *paths["divergence"].values()]:
        client.log_artifact(pid, p, "report")
    return report
