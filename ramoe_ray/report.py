"""``ramoe report``: the comparison tables and figures of one sweep, read from MLflow only.

A sweep (ramoe_ray/sweep.py, logging through tracking.py) logs one *parent* run (tags ``ramoe.kind =
sweep``, ``ramoe.sweep = NAME``; artefacts ``config.resolved.yaml`` and ``cells/cells.json``) and one
*child* run per Tune trial (tags ``mlflow.parentRunId``, ``ramoe.kind = trial``, ``model``, ``task``, ``language``,
``method``, ``selected``; param ``seed``; metrics ``val_acc``, ..., and on the selected child of each cell ×
method ``test_acc`` and ``test_div_L<layer>``). The selected configuration of a trained method is retrained
with each other seed: *replicate* children (tag ``ramoe.replicate_of`` = the selected child's ``trial_key``,
``selected = false``, their own ``seed``, ``test_acc``). Every child with ``test_acc`` also logs
``test/predictions.json`` (``language``, sorted ``ids``, 0/1 ``correct``, ...): the same test examples for
every method and seed of a cell. This module reads those runs and writes, into one folder (default
``<run folder>/report/``):

- ``report.md``: at the top one headline per baseline (``stats.headline``: RA-MoE − baseline over cells);
  per model × task a table (rows = languages; test accuracy mean ± sd over seeds of SFT, Steering, RISE
  (named RISE-LoRA everywhere when the sweep's own config has ``rise.train: lora``), RA-MoE; Δ = RA-MoE −
  SFT of the seed means in points, marked ▲ / ▼ when its paired interval excludes 0; the cell's ci
  proportion); per baseline the paired comparison (Δ with a bootstrap interval over test
  examples, McNemar's exact p per seed, and across cells the mean Δ, wins / ties / losses, Wilcoxon p;
  ``ramoe_ray.stats``); the ci-proportion-vs-gain correlation (Pearson r, Spearman ρ, percentile-bootstrap
  95 % intervals), the figures, the failed trials. A cell whose runs lack predictions says its intervals
  are unavailable;
- ``scatter.png``: ci proportion (x) against Δ vs SFT (y) with its paired interval, one colour per model;
- ``delta.png``: per baseline each cell's Δ and interval, and the mean over cells (forest plot);
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

from ramoe_ray import stats, tracking, trial
from ramoe_ray.cache import write_text_atomic
from ramoe_ray.config import METHODS, ConfigError, RiseConfig, RunConfig, method_label

N_RESAMPLES = 2000  # correlation intervals (resampling cells)
N_BOOT_EXAMPLES = stats.N_BOOT  # paired Δ intervals (resampling test examples)
SEED = 0
CONFIDENCE = 0.95
NA_CORR = "n/a (needs ≥3 cells with varying values)"
DASH = "—"
PREDICTIONS_ARTIFACT = trial.PREDICTIONS  # test/predictions.json: {language, ids, correct, ...} per test run
MARKS = {1: "▲", -1: "▼", 0: ""}  # the paired interval above 0 / below 0 / containing 0



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
        "replicate_of": t.get(tracking.REPLICATE_TAG) or None, "seed": d.params.get("seed"),
        "error": t.get("error"), "metrics": dict(d.metrics), "params": dict(d.params),
        "stopped": str(t.get(tracking.STOPPED_TAG, "")).lower() == "true", "twin": bool(t.get(tracking.SAME_AS_TAG)),
    }


def _read_predictions(path: Path | None) -> dict:
    """A ``test/predictions.json`` as {language, ids, correct (0/1 array)}, or {error} saying what is wrong."""
    if path is None:
        return {"error": f"no {PREDICTIONS_ARTIFACT} artefact"}
    try:
        raw = json.loads(path.read_text())
        ids, correct = [str(i) for i in raw["ids"]], np.asarray(raw["correct"], dtype=float)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"error": f"unreadable {PREDICTIONS_ARTIFACT} ({type(e).__name__}: {e})"}
    if correct.ndim != 1 or len(correct) != len(ids) or len(set(ids)) != len(ids) or not np.isin(correct, (0, 1)).all():
        return {"error": f"malformed {PREDICTIONS_ARTIFACT}: ids and 0/1 correct must be equal-length, ids distinct"}
    return {"language": raw.get("language"), "ids": ids, "correct": correct}


def _needs_predictions(tr: dict) -> bool:
    """A finished test evaluation of a selected configuration: the selected child or one of its replicates."""
    return (tr["status"] == "FINISHED" and _finite(tr["metrics"].get("test_acc"))
            and (tr["selected"] or tr["replicate_of"] is not None))


def _predictions(uri: str, trials: list[dict]) -> dict:
    """run id -> ``_read_predictions`` of each run that needs them (downloaded through MLflow)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="ramoe-report-pred-") as tmp:
        for tr in trials:
            if _needs_predictions(tr):
                dst = Path(tmp) / tr["run_id"]
                dst.mkdir()
                out[tr["run_id"]] = _read_predictions(tracking.download_artifact(uri, tr["run_id"],
                                                                                 PREDICTIONS_ARTIFACT, str(dst)))
    return out


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
                   "status": parent.info.status, "start_time": parent.info.start_time,
                   "driver": tracking.driver_state(parent)},  # RUNNING: a live sweep, or one stopped hard
        "expected_trials": expected, "cells_json": cells_json, "resolved": resolved, "trials": trials,
        "predictions": _predictions(uri, trials),
    }


# ------------------------------------------------------------------------------------------ numbers


def _labels(resolved: Any, cfg: RunConfig) -> dict[str, str]:
    """Each method's name in the report (``config.method_label``: RISE trained with LoRA is RISE-LoRA), from
    the sweep's own resolved config; ``cfg`` where the sweep logged none (an old sweep)."""
    if isinstance(resolved, dict):
        rise = resolved.get("rise") if isinstance(resolved.get("rise"), dict) else {}
        train = rise.get("train", RiseConfig.model_fields["train"].default)
        cfg = cfg.model_copy(update={"rise": cfg.rise.model_copy(update={"train": train})})
    return {m: method_label(m, cfg) for m in METHODS}


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


# ------------------------------------------------------------------------------------------ seeds, paired


def _seed_key(tr: dict) -> tuple:
    s = str(tr["seed"])
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _seed_runs(trials: list[dict], sel: dict) -> dict:
    """(cell, method) -> the test runs of the selected configuration, one per seed: the selected trial
    first, then its finished replicates (tag ramoe.replicate_of = its trial_key; the newest of a seed) by seed."""
    reps: dict = {}
    for tr in sorted(trials, key=lambda t: t["start_time"]):
        if tr["replicate_of"] and tr["status"] == "FINISHED" and _finite(tr["metrics"].get("test_acc")):
            reps.setdefault((tr["model"], tr["task"], tr["language"], tr["method"], tr["replicate_of"]), {})[
                str(tr["seed"])] = tr
    out = {}
    for (cell, method), chosen in sel.items():
        by_seed = dict(reps.get((*cell, method, chosen["trial_key"]), {}))
        by_seed.pop(str(chosen["seed"]), None)
        out[(cell, method)] = [chosen] + sorted(by_seed.values(), key=_seed_key)
    return out


def _correct_by_id(run: dict, preds: dict, language: str, labels: dict) -> dict | str:
    """{example id: 0/1} of one run's test predictions, or why they are unavailable."""
    p = preds.get(run["run_id"]) or {"error": f"no {PREDICTIONS_ARTIFACT} artefact"}
    who = f"run {run['run_id']}, {labels[run['method']]} seed {run['seed']}"
    if "error" in p:
        return f"{p['error']} ({who})"
    if p["language"] != language:
        return f"{PREDICTIONS_ARTIFACT} is in language {p['language']!r}, not {language!r} ({who})"
    return dict(zip(p["ids"], p["correct"]))


def _aligned(runs_a: list, runs_b: list, preds: dict, language: str, labels: dict) -> tuple | str:
    """(A, B, n left out): (seeds, examples) correctness matrices of the examples every run holds, in id
    order; or why there are none."""
    tables = [_correct_by_id(r, preds, language, labels) for r in runs_a + runs_b]
    if why := next((t for t in tables if isinstance(t, str)), None):
        return why
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    if len(ids) < 2:
        return "fewer than 2 test examples common to every run"
    mat = np.array([[t[i] for i in ids] for t in tables], dtype=float)
    return mat[:len(runs_a)], mat[len(runs_a):], max(len(t) for t in tables) - len(ids)


def _seed_pairs(runs_a: list, runs_b: list) -> list[tuple[int, int]]:
    """(baseline run, RA-MoE run) index pairs for McNemar: equal seeds; a baseline without a seed
    (steering) against every RA-MoE seed."""
    if len(runs_a) == 1 and _seed_key(runs_a[0])[0] == 1:
        return [(0, j) for j in range(len(runs_b))]
    index = {str(r["seed"]): i for i, r in enumerate(runs_a)}
    return [(index[str(r["seed"])], j) for j, r in enumerate(runs_b) if str(r["seed"]) in index]


def _compare(runs_a: list, runs_b: list, preds: dict, language: str, labels: dict) -> dict:
    """RA-MoE (B) against one baseline (A) in one cell: ``paired`` (stats.PairedDelta, fractions), the
    sign of its interval, McNemar per seed pair; or ``available`` False and why."""
    got = _aligned(runs_a, runs_b, preds, language, labels)
    if isinstance(got, str):
        return {"available": False, "note": got, "seeds": [len(runs_a), len(runs_b)]}
    a, b, left_out = got
    pd = stats.paired_bootstrap(a, b, n_boot=N_BOOT_EXAMPLES, seed=SEED)
    mc = [{"ramoe_seed": runs_b[j]["seed"], "baseline_seed": runs_a[i]["seed"], "p": m.p, "b01": m.b01, "b10": m.b10}
          for i, j in _seed_pairs(runs_a, runs_b) for m in [stats.mcnemar_exact(a[i], b[j])]]
    return {"available": True, "paired": pd, "sign": 1 if pd.low > 0 else -1 if pd.high < 0 else 0,
            "mcnemar": mc, "seeds": [len(runs_a), len(runs_b)],
            "note": f"{left_out} examples not held by every run left out" if left_out else None}


def _comparisons(cells_order: list, seeds: dict, preds: dict, baselines: list[str], labels: dict) -> dict:
    """cell -> {baseline: ``_compare``} for every cell where RA-MoE and the baseline both have test runs."""
    out: dict = {}
    for key in cells_order:
        ours = seeds.get((key, "ramoe"))
        out[key] = {b: _compare(seeds[(key, b)], ours, preds, key[2], labels) for b in baselines
                    if ours and (key, b) in seeds}
    return out


def _comparison_record(c: dict) -> dict:
    """A ``_compare`` result for report.json and the tables: Δ and its interval in points."""
    if not c["available"]:
        return {k: c[k] for k in ("available", "note", "seeds")}
    pd = c["paired"]
    return {"available": True, "delta": 100 * pd.delta, "low": 100 * pd.low, "high": 100 * pd.high, "n": pd.n,
            "sign": c["sign"], "mark": MARKS[c["sign"]], "mcnemar": c["mcnemar"], "seeds": c["seeds"],
            "note": c["note"]}


def _summary(baseline: str, comps: dict, labels: dict) -> dict:
    """Across cells, RA-MoE against ``baseline``: stats.across_cells in points, its headline, the cells
    left out (predictions unavailable)."""
    mine = [(k, c[baseline]) for k, c in comps.items() if baseline in c]
    ok = [c["paired"] for _, c in mine if c["available"]]
    out = {"baseline": baseline, "unavailable": ["/".join(k) for k, c in mine if not c["available"]]}
    if not ok:
        why = "no cell with RA-MoE and this baseline" if not mine else "test predictions unavailable in every cell"
        return out | {"cells": 0, "headline": f"{labels['ramoe']} vs {labels[baseline]}: no paired comparison ({why})"}
    s = stats.across_cells([p.delta for p in ok], [p.low for p in ok], [p.high for p in ok], seed=SEED)
    pts = {k: (None if v is None else 100 * v) for k, v in (("mean", s.mean), ("low", s.low), ("high", s.high))}
    return out | pts | {"cells": s.n, "wins": s.wins, "ties": s.ties, "losses": s.losses,
                        "wilcoxon_p": s.wilcoxon_p, "level": s.level, "note": s.note,
                        "headline": stats.headline(labels["ramoe"], labels[baseline], s)}


def _mismatches(seeds: dict, preds: dict) -> list[str]:
    """Runs whose predictions' accuracy differs from their test_acc metric (the two should be one number)."""
    out = []
    for runs in seeds.values():
        for r in runs:
            p = preds.get(r["run_id"]) or {}
            if "correct" in p and abs(p["correct"].mean() - r["metrics"]["test_acc"]) > 1e-6:
                out.append(f"run {r['run_id']}: {PREDICTIONS_ARTIFACT} gives {100 * p['correct'].mean():.2f} %, "
                           f"test_acc is {100 * r['metrics']['test_acc']:.2f} %")
    return out


def _corr(x: np.ndarray, y: np.ndarray, kind: str) -> dict:
    """r (or ρ), p-value and a percentile-bootstrap interval (paired resampling of cells; resamples in
    which x or y is constant have no correlation and are dropped, their count reported)."""
    from scipy import stats as sps

    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": None, "p": None, "low": None, "high": None, "n": n, "dropped": None, "note": NA_CORR}
    fn = sps.pearsonr if kind == "pearson" else sps.spearmanr

    def stat(a, b):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return np.nan
        return float(fn(a, b).statistic)

    res = fn(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (nan) make scipy warn about its own interval
        boot = sps.bootstrap((x, y), stat, paired=True, vectorized=False, n_resamples=N_RESAMPLES,
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


def _cell_row(key: tuple, seeds: dict, info: dict, trials: list[dict]) -> dict:
    """One table row: per method the test accuracy over seeds (mean, sd, each seed's run), Δ = RA-MoE − SFT
    of the seed means in points, the ci proportion, the selected RA-MoE trial's knobs."""
    row: dict = {}
    for m in METHODS:
        runs = seeds.get((key, m)) or []
        ms = stats.mean_sd([r["metrics"]["test_acc"] for r in runs]) if runs else None
        row[m], row[f"{m}_sd"] = (ms.mean, ms.sd) if ms else (None, None)
        row[f"{m}_run"] = runs[0]["run_id"] if runs else None  # the selected trial
        row[f"{m}_seeds"] = [{"seed": r["seed"], "run_id": r["run_id"], "test_acc": r["metrics"]["test_acc"]}
                             for r in runs]
    row["delta"] = (100.0 * (row["ramoe"] - row["sft"])) if row["ramoe"] is not None and row["sft"] is not None \
        else None
    row["ci_proportion"] = _ci_proportion(key, info, trials)
    rm = (seeds.get((key, "ramoe")) or [None])[0]
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
    stopped = sum(tr.get("stopped", False) for tr in trials)  # FINISHED children that ASHA stopped at a rung
    return {"total": len(statuses), "finished": statuses.count("FINISHED") - stopped, "stopped": stopped,
            "failed": statuses.count("FAILED"), "twins": sum(tr.get("twin", False) for tr in trials),
            "running": sum(s in ("RUNNING", "SCHEDULED") for s in statuses), "killed": statuses.count("KILLED"),
            "expected": expected}


def _paired(cells_order: list, methods: list, seeds: dict, preds: dict, labels: dict) -> dict:
    """RA-MoE against each baseline the sweep has: per cell (``_comparison_record``), across cells
    (``_summary``), the headline lines, and runs whose predictions disagree with their test_acc."""
    baselines = [m for m in METHODS if m != "ramoe" and m in methods] if "ramoe" in methods else []
    comps = _comparisons(cells_order, seeds, preds, baselines, labels)
    summaries = {b: _summary(b, comps, labels) for b in baselines}
    return {"cells": {k: {b: _comparison_record(c) for b, c in v.items()} for k, v in comps.items()},
            "summary": summaries, "headline": [s["headline"] for s in summaries.values()],
            "mismatches": _mismatches(seeds, preds),
            "bootstrap": {"n_resamples": N_BOOT_EXAMPLES, "seed": SEED, "level": stats.LEVEL,
                          "method": "percentile", "resampled": "test examples (cells: across cells)"}}


def _scatter_points(cells: dict) -> list[dict]:
    """Cells with a ci proportion and Δ vs SFT: (ci, Δ), and Δ's paired interval where there is one."""
    out = []
    for k, v in cells.items():
        if v["delta"] is None or v["ci_proportion"] is None:
            continue
        c = v["vs"].get("sft") or {}
        out.append({"model": k[0], "task": k[1], "language": k[2], "ci_proportion": float(v["ci_proportion"]),
                    "delta": float(v["delta"]), "low": c.get("low"), "high": c.get("high"), "mark": c.get("mark", "")})
    return out


def _config_seeds(resolved: Any) -> list | None:
    """The sweep's ``training.seeds`` from its resolved config (None when not logged)."""
    seeds = ((resolved or {}).get("training") or {}).get("seeds") if isinstance(resolved, dict) else None
    return list(seeds) if isinstance(seeds, list) and seeds else None


def _failed(trials: list[dict]) -> list[dict]:
    return [{"run_id": tr["run_id"], "cell": f"{tr['model']}/{tr['task']}/{tr['language']}", "method": tr["method"],
             "trial_key": tr["trial_key"], "replicate_of": tr["replicate_of"], "seed": tr["seed"],
             "error": tr["error"]} for tr in trials if tr["status"] == "FAILED"]


def compute(data: dict, cfg: RunConfig) -> dict:
    """The report's numbers from what ``collect`` read (no MLflow access)."""
    cells_order, methods, planned = _ordered_cells(data, cfg)
    labels = _labels(data["resolved"], cfg)
    info = {(c.get("model"), c.get("task"), c.get("language")): c for c in data["cells_json"] or []}
    sel = _selected(data["trials"])
    seeds = _seed_runs(data["trials"], sel)
    cells = {key: _cell_row(key, seeds, info, data["trials"]) for key in cells_order}
    paired = _paired(cells_order, methods, seeds, data.get("predictions") or {}, labels)
    for key, row in cells.items():
        row["vs"] = paired["cells"][key]
    missing = [f"{'/'.join(map(str, key))} {m}" for key in cells_order for m in METHODS
               if (key, m) not in sel and m in methods]
    pts = _scatter_points(cells)
    x, y = (np.array([p[f] for p in pts], dtype=float) for f in ("ci_proportion", "delta"))
    divergence = {model: d for model in dict.fromkeys(k[0] for k in cells_order)
                  if (d := _model_divergence(model, cells_order, info, sel)) is not None}
    counts = _counts(data["trials"], data["expected_trials"])
    partial = bool(missing) or not planned or (counts["expected"] is not None
                                                and counts["finished"] + counts["failed"] + counts["stopped"]
                                                < counts["expected"])
    return {
        "sweep": dict(data["parent"], experiment=data["experiment"], tracking_uri=data["tracking_uri"]),
        "counts": counts, "methods": methods, "labels": labels, "partial": partial, "missing": missing, "planned": planned,
        "cells": cells, "headline": paired["headline"], "seeds": _config_seeds(data["resolved"]),
        "paired": {k: v for k, v in paired.items() if k not in ("cells", "headline")},
        "scatter": {"points": pts}, "pearson": _corr(x, y, "pearson"), "spearman": _corr(x, y, "spearman"),
        "bootstrap": {"n_resamples": N_RESAMPLES, "seed": SEED, "confidence": CONFIDENCE, "method": "percentile",
                      "paired": True},
        "divergence": divergence, "failed": _failed(data["trials"]),
    }


# ------------------------------------------------------------------------------------------ figures


def _wtl(s: dict, adjective: str = "") -> str:
    """'3 significant wins, 4 ties, 1 loss' of a ``_summary``."""
    return ", ".join(f"{s[k]} {adjective * (k != 'ties')}{one if s[k] == 1 else k}"
                     for k, one in (("wins", "win"), ("ties", "tie"), ("losses", "loss")))


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


def draw_scatter(report: dict):
    """The scatter as a matplotlib figure: ci proportion (x) against Δ = RA-MoE − SFT in points (y, seed
    means), Δ's paired 95 % interval as error bars where the predictions allow one, one colour per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = report["scatter"]["points"]
    models = list(dict.fromkeys(p["model"] for p in pts))
    for i, m in enumerate(models):
        mp = [p for p in pts if p["model"] == m]
        colour = plt.get_cmap("tab10")(i % 10)
        ax.scatter([p["ci_proportion"] for p in mp], [p["delta"] for p in mp], color=colour, label=m, s=36, zorder=3)
        bars = [p for p in mp if p["low"] is not None]
        if bars:
            ax.errorbar([p["ci_proportion"] for p in bars], [p["delta"] for p in bars], fmt="none", ecolor=colour,
                        yerr=[[p["delta"] - p["low"] for p in bars], [p["high"] - p["delta"] for p in bars]],
                        capsize=3, linewidth=1)
        for p in mp:
            ax.annotate(f"{p['task']}/{p['language']}{p['mark']}", (p["ci_proportion"], p["delta"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="tab:gray", linewidth=0.8)
    if not pts:
        ax.text(0.5, 0.5, "no cell with both RA-MoE and SFT results", ha="center", va="center",
                transform=ax.transAxes)
    pr, sr = report["pearson"], report["spearman"]
    sub = (f"Pearson r = {pr['r']:.2f}, Spearman ρ = {sr['r']:.2f} (n = {pr['n']})" if pr["r"] is not None
           else f"n = {pr['n']}: correlation n/a")
    ax.set_title(f"ci proportion vs RA-MoE gain over SFT\n{sub}; bars: paired 95 % CI", fontsize=10)
    ax.set_xlabel("ci proportion (train split)")
    ax.set_ylabel("Δ test accuracy, RA-MoE − SFT (points, mean over seeds)")
    if models:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scatter_figure(report: dict, path: Path) -> Path:
    """``draw_scatter`` saved as a PNG."""
    return _save(draw_scatter(report), path)


def delta_figure(report: dict, path: Path) -> Path | None:
    """Forest plot: per baseline, each cell's Δ = RA-MoE − baseline with its paired 95 % interval (green:
    above 0, red: below, grey: contains 0), and the mean over cells with its interval; None when no cell
    has one."""
    bases = [b for b, s in report["paired"]["summary"].items() if s["cells"]]
    if not bases:
        return None
    plt = _plt()
    keys = [k for k, row in report["cells"].items() if any(row["vs"].get(b, {}).get("available") for b in bases)]
    fig, axes = plt.subplots(1, len(bases), figsize=(3.2 * len(bases) + 1.5, 0.32 * len(keys) + 1.6),
                             sharey=True, squeeze=False)
    colour = {1: "tab:green", -1: "tab:red", 0: "tab:gray"}
    for ax, b in zip(axes[0], bases):
        for y, k in enumerate(keys):
            c = report["cells"][k]["vs"].get(b, {})
            if c.get("available"):
                ax.errorbar(c["delta"], y, xerr=[[c["delta"] - c["low"]], [c["high"] - c["delta"]]], fmt="o",
                            color=colour[c["sign"]], capsize=2, markersize=4)
        s = report["paired"]["summary"][b]
        ax.errorbar(s["mean"], len(keys), fmt="D", color="black", markersize=5, capsize=3,
                    xerr=None if s["low"] is None else [[s["mean"] - s["low"]], [s["high"] - s["mean"]]])
        ax.axvline(0.0, color="tab:gray", linewidth=0.8)
        ax.set_title(f"{report['labels']['ramoe']} − {report['labels'][b]}\n{_wtl(s)}", fontsize=9)
        ax.set_xlabel("Δ test accuracy (points)")
    axes[0][0].set_yticks(range(len(keys) + 1), ["/".join(k) for k in keys] + ["mean over cells"], fontsize=7)
    axes[0][0].invert_yaxis()
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


def _headline_lines(report: dict) -> list[str]:
    """One bold line per baseline (stats.headline), what the numbers mean, where the details are."""
    if not report["headline"]:
        return []
    lines = [f"- **{h}**" for h in report["headline"]]
    return lines + ["", "Δ = RA-MoE − baseline in test-accuracy points, mean over cells (95 % CI: bootstrap over "
                        "cells); a significant win / loss is a cell whose paired 95 % interval lies above / below 0 "
                        "(section \"RA-MoE against each baseline\").", ""]


def _summary_lines(report: dict) -> list[str]:
    """Title, the sweep run, the trial counts, what is partial."""
    s, n = report["sweep"], report["counts"]
    lines = [f"# RA-MoE sweep report: {s['name']}", ""] + _headline_lines(report)
    lines.append(f"- sweep run: `{s['run_id']}` ({s['status']}), experiment `{s['experiment']}`, "
                 f"tracking `{s['tracking_uri']}`")
    state, said = s["driver"]
    if state in ("stopped", "unknown", "alive"):
        lines.append(f"- **status: {said}**" + ("; `--resume` continues it" if state != "alive" else ""))
    exp = f" of {n['expected']} expected" if n["expected"] is not None else ""
    extra = "".join(f", {n[k]} {k}" for k in ("running", "killed") if n[k])
    stopped = (f", {n['stopped']} stopped early by ASHA (sweep.scheduler: asha; never selected)"
               if n.get("stopped") else "")
    twins = (f"; {n['twins']} of them twins (the same computation as another trial of their cell, run once: "
             f"tag {tracking.SAME_AS_TAG})" if n.get("twins") else "")
    lines.append(f"- trials: {n['finished']} finished{stopped}, {n['failed']} failed{extra} ({n['total']} logged{exp})"
                 + twins)
    if report["partial"]:
        what = []
        if report["missing"]:
            what.append(f"{len(report['missing'])} cell × method results missing: " + _missing_text(report))
        if not report["planned"]:
            what.append("the sweep's cells.json and resolved config are not logged; cells are the config's grid")
        done = n["finished"] + n["failed"] + n.get("stopped", 0)
        if n["expected"] is not None and done < n["expected"]:
            what.append(f"{n['expected'] - done} expected trials not done")
        lines.append(f"- **partial sweep**: {'; '.join(what) or 'results missing'}")
    return lines


def _acc(row: dict, m: str, n_max: int) -> str:
    """'45.0 ± 1.2' (mean ± sd over seeds, %), '45.0 (1 seed)' where a trained method has fewer seeds."""
    if row[m] is None:
        return DASH
    sd = "" if row[f"{m}_sd"] is None else f" ± {100 * row[f'{m}_sd']:.1f}"
    n = len(row[f"{m}_seeds"])
    few = f" ({n} seed{'s' * (n != 1)})" if m != "steering" and n < n_max else ""
    return f"{100 * row[m]:.1f}{sd}{few}"


def _accuracy_lines(report: dict) -> list[str]:
    """Per model × task a table: rows = languages, test accuracy mean ± sd over seeds, Δ vs SFT, ci proportion."""
    seeds = report["seeds"] or []
    n_max = max([len(seeds)] + [len(r[f"{m}_seeds"]) for r in report["cells"].values() for m in METHODS])
    said = f"training.seeds = {', '.join(map(str, seeds))}" if seeds else f"{n_max} seed{'s' * (n_max != 1)}"
    lines = ["", "## Test accuracy (%) per cell and method, mean ± sd over seeds", "",
             "Selected = best validation accuracy among the trials of the cell and method (first seed); the "
             f"selected configuration is then retrained with each other seed ({said}: mean ± sample sd, and "
             f"\"(k seeds)\" where fewer finished; Steering has no seed: one value). Δ = RA-MoE − SFT of the seed "
             f"means, in accuracy points; {MARKS[1]} / "
             f"{MARKS[-1]}: its paired 95 % interval lies above / below 0; {DASH} = no result (not run, failed or "
             "not selected yet).", ""]
    labels = report["labels"]
    head = " | ".join(labels[m] + " (best)" * (m == "ramoe") for m in METHODS)
    for model, task in dict.fromkeys((k[0], k[1]) for k in report["cells"]):
        lines += [f"### {model} / {task}", "",
                  f"| language | {head} | Δ vs SFT (points) | ci proportion |",
                  "|---|" + "---:|" * (len(METHODS) + 2)]
        for (m, t, lang), row in report["cells"].items():
            if (m, t) != (model, task):
                continue
            mark = row["vs"].get("sft", {}).get("mark", "")
            delta = DASH if row["delta"] is None else f"{row['delta']:+.1f}{' ' * bool(mark)}{mark}"
            ci = DASH if row["ci_proportion"] is None else f"{row['ci_proportion']:.3f}"
            lines.append(f"| {lang} | " + " | ".join(_acc(row, x, n_max) for x in METHODS) + f" | {delta} | {ci} |")
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


def _mcnemar_text(c: dict) -> str:
    """'7: 2.4e-05 (+40/−10); 8: …': per RA-MoE seed, McNemar's p and the discordant examples."""
    return "; ".join(f"{m['ramoe_seed']}: {m['p']:.2g} (+{m['b01']}/−{m['b10']})" for m in c["mcnemar"]) or DASH


def _paired_row(key: tuple, row: dict, b: str) -> str:
    c = row["vs"][b]
    seeds = f"{c['seeds'][1]} / {c['seeds'][0]}"
    if not c["available"]:
        d = 100 * (row["ramoe"] - row[b])
        return f"| {'/'.join(key)} | {DASH} | {seeds} | {d:+.1f} | unavailable: {c['note']} | {DASH} |"
    note = f"; {c['note']}" if c["note"] else ""
    mark = f" {c['mark']}" if c["mark"] else ""
    return (f"| {'/'.join(key)} | {c['n']} | {seeds} | {c['delta']:+.1f}{mark} | [{c['low']:+.1f}, {c['high']:+.1f}]"
            f"{note} | {_mcnemar_text(c)} |")


def _across_line(s: dict) -> str:
    if not s["cells"]:
        return f"- {s['headline']}"
    ci = "no interval" if s["low"] is None else f"95 % CI [{s['low']:+.1f}, {s['high']:+.1f}]"
    w = "n/a" if s["wilcoxon_p"] is None else f"{s['wilcoxon_p']:.2g}"
    note = f" ({s['note']})" if s["note"] else ""
    return (f"- across {s['cells']} cells: mean Δ {s['mean']:+.1f} points ({ci}); {_wtl(s, 'significant ')}; "
            f"Wilcoxon signed-rank p = {w}{note}")


def _paired_lines(report: dict, paths: dict) -> list[str]:
    """Per baseline a table of cells (Δ, interval, mark, McNemar per seed) and the across-cells line."""
    pr = report["paired"]
    if not pr["summary"]:
        return []
    b = pr["bootstrap"]
    lines = ["## RA-MoE against each baseline, paired on the test examples", "",
             "Δ = RA-MoE − baseline in accuracy points on the same test examples, each example's correctness "
             f"averaged over its method's seeds; 95 % CI: {b['method']} bootstrap resampling test examples "
             f"({b['n_resamples']} resamples, seed {b['seed']}); {MARKS[1]} / {MARKS[-1]}: the interval lies above / "
             "below 0 (a significant win / loss; otherwise a tie). McNemar: exact two-sided p of each RA-MoE seed "
             "against the baseline's run of the same seed (Steering has no seed: every RA-MoE seed against its one "
             "run), with the discordant examples (+ only RA-MoE right, − only the baseline right). Across cells: "
             "mean Δ with a percentile-bootstrap interval resampling cells; Wilcoxon signed-rank p of the cell Δs.", ""]
    ours = report["labels"]["ramoe"]
    for base, s in pr["summary"].items():
        name = report["labels"][base]
        lines += [f"### {ours} vs {name}", "",
                  f"| cell | examples | seeds ({ours} / {name}) | Δ (points) | 95 % CI | "
                  "McNemar p by RA-MoE seed (+/−) |", "|---|---:|---:|---:|---|---|"]
        lines += [_paired_row(k, row, base) for k, row in report["cells"].items() if base in row["vs"]]
        lines += ["", _across_line(s)]
        if s["unavailable"]:
            lines.append(f"- intervals unavailable (no usable test predictions), left out: {', '.join(s['unavailable'])}")
        lines.append("")
    if paths.get("delta"):
        lines += [f"![Δ per cell]({Path(paths['delta']).name})", ""]
    lines += [f"- **warning**: {m}" for m in pr["mismatches"]] + ([""] if pr["mismatches"] else [])
    return lines


def _correlation_lines(report: dict, paths: dict) -> list[str]:
    b = report["bootstrap"]
    lines = ["## ci proportion vs gain", "",
             f"Cells with both RA-MoE and SFT results: {report['pearson']['n']} (x = ci proportion of the train "
             "split, y = Δ = RA-MoE − SFT in test-accuracy points, each the mean over its seeds; error bars in the "
             "figure: Δ's paired 95 % interval, where the test predictions allow one).", "",
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
        method = f"{f['method']} (seed {f['seed']} replicate)" if f.get("replicate_of") else f["method"]
        lines.append(f"| `{f['run_id']}` | {f['cell']} | {method} | {err} |")
    return lines + [""]


def render_markdown(report: dict) -> str:
    """report.md from the dict ``compute`` returns (figures named by ``report['paths']`` when present)."""
    paths = report.get("paths", {})
    lines = (_summary_lines(report) + _accuracy_lines(report) + _knob_lines(report) + _paired_lines(report, paths)
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
    report.html, report.json, scatter.png, delta.png and divergence_<model>.png into ``out_dir`` (default
    ``<run folder>/report``), logs them to the parent run under ``report/`` and returns the numbers:
    ``cells`` {(model, task, language): {sft, steering, rise, ramoe (test accuracy 0..1, mean over seeds,
    or None), ``<method>_sd``, ``<method>_seeds`` [{seed, run_id, test_acc}], delta (RA-MoE − SFT of the
    seed means, points, or None), ci_proportion, vs {baseline: {available, delta, low, high (points), n,
    sign, mark, mcnemar [{ramoe_seed, baseline_seed, p, b01, b10}], seeds, note}}, ...}}, ``headline``
    (lines), ``paired`` {summary {baseline: {cells, mean, low, high (points), wins, ties, losses,
    wilcoxon_p, unavailable, headline, ...}}, mismatches, bootstrap}, ``pearson`` / ``spearman`` {r, p,
    low, high, n, ...}, ``paths``, ``markdown`` and the rest of what the markdown shows."""
    data = collect(cfg, sweep_run_id)
    report = compute(data, cfg)
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict = {"scatter": str(scatter_figure(report, out / "scatter.png")), "divergence": {}}
    delta = delta_figure(report, out / "delta.png")
    paths["delta"] = str(delta) if delta else None
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
    for p in [paths["markdown"], paths["html"], paths["json"], paths["scatter"], *paths["divergence"].values(),
              *([paths["delta"]] if paths["delta"] else [])]:
        client.log_artifact(pid, p, "report")
    return report
