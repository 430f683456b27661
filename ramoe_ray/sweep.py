"""The sweep (DESIGN.md, "The method" 1-4 over the grid): Ray Tune over cells x methods x knobs, MLflow.

Entry: ``run_sweep(cfg, resume=False) -> dict``; CLI ``ramoe sweep CONFIG [--resume]``.

1. **Checks** (``plan_sweep``), all before any model runs or Ray starts a trial: the tracking URI is
   usable, the grid is not empty, every model's size fits the knobs (``config.check_against_models``),
   every (model, task, language) cell has its data (``taxonomy.plan``).
2. **Stages 1-2 once per cell**, in the driver, through the content-addressed cache: the train split's
   taxonomy of every language of a (model, task) in one Ray Data pass, then experts.json for every
   (language, band, top-k). Trials find both in the cache; each trial reports how many it had to
   recompute (``stage12_recomputed``: 0 expected), the sweep's result sums them.
3. **Trials** (``grid``): RA-MoE over λ x band x top-k; SFT and RISE once per cell (the first band /
   top-k: they only set which routing KL is reported); Routing Steering over strength x band x top-k.
   Ray Tune runs ``run_trial`` once per trial (grid order; trial names = Tune's trial ids): it builds and
   fits a Ray Train ``TorchTrainer`` (``train.train_cell``: DeepSpeed ZeRO-3), then evaluates on the
   **validation** split (``evaluate.evaluate_cell``) and reports through Tune.
   ``sweep.train_workers = 0`` runs Ray Train's local mode inside the trial process (small models on one
   machine: no worker group to start per trial; see ``_outside_tune_session``).
4. **MLflow** (driver only: trials never open the database): one parent run per sweep (resolved config,
   cells.json, every rule of DESIGN.md's definitions as params); a child per trial, logged by a Tune
   callback as each trial ends: tags model/task/language/method, params (knobs, training, rules),
   metrics (validation accuracy, ci proportion, routing KL before/after, loss curves), the trial's figure.
   A failed trial is a FAILED child with its error; the sweep goes on.
5. **Selection** (``select_and_test``): per cell and method, the child with the best validation accuracy
   of the target language (ties: grid order) is tagged ``selected``; only it is evaluated on the **test**
   split (``test_acc``, ``test_div_L<l>``).
6. **Resume**: the finished children of the newest sweep of this name are the record of what is done;
   ``--resume`` runs only the other trials under the same parent (failed or interrupted ones again,
   their old children deleted), after checking the config is the same.

The report (``ramoe report``, report.py) reads only MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ramoe_ray.config import (Band, ConfigError, RunConfig, check_against_models, config_from_dict, save_resolved,
                              with_absolute_paths)

TRIAL_JSON = "trial.json"
CELLS_ARTIFACT = "cells"

RULES: dict[str, str] = {
    "grid": ("ramoe: lambdas x bands x top_k; sft, rise: once per cell at bands[0], top_k[0]; steering: "
             "strengths x bands x top_k"),
    "selection": ("per (model, task, language, method): the finished trial with the highest validation accuracy "
                  "in the target language; ties go to the earlier trial in grid order"),
    "test": "only the selected trial of each (cell, method) is evaluated on the test split",
    "stages_1_2": "train split, computed once per cell in the driver before any trial; trials read the cache",
}
SELECT_METRIC = "val_acc"
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


# ---------------------------------------------------------------------------------------------- grid


def _band_json(band: Any) -> Any:
    return "auto" if band == "auto" else [band.start, band.end]


def _band(value: Any) -> Any:
    return "auto" if value == "auto" else Band(start=float(value[0]), end=float(value[1]))


def _band_label(value: Any) -> str:
    return "auto" if value == "auto" else f"{value[0]:g}-{value[1]:g}"


def trial_key(t: dict) -> str:
    """Readable, unique and stable name of a trial (the resume record)."""
    head = f"{t['model']}/{t['task']}/{t['language']}/{t['method']}"
    if t["method"] == "ramoe":
        return f"{head}/lam={t['lam']:g}/band={_band_label(t['band'])}/top_k={t['top_k']}"
    if t["method"] == "steering":
        return f"{head}/strength={t['strength']:g}/band={_band_label(t['band'])}/top_k={t['top_k']}"
    return head


def grid(cfg: RunConfig) -> list[dict]:
    """Every trial of the config, in grid order (cells outer, then methods in config order)."""
    k = cfg.knobs
    bands = [_band_json(b) for b in k.bands]
    out = []
    for m in cfg.models:
        for t in cfg.tasks:
            for lang in cfg.languages:
                cell = {"model": m.name, "task": t.name, "language": lang}
                for method in cfg.methods:
                    if method == "ramoe":
                        specs = [dict(lam=lam, band=b, top_k=tk, strength=None)
                                 for lam in k.lambdas for b in bands for tk in k.top_k]
                    elif method == "steering":
                        specs = [dict(lam=0.0, band=b, top_k=tk, strength=s)
                                 for s in cfg.steering.strengths for b in bands for tk in k.top_k]
                    else:
                        specs = [dict(lam=0.0, band=bands[0], top_k=k.top_k[0], strength=None)]
                    for s in specs:
                        out.append({**cell, "method": method, **s})
    for i, t in enumerate(out):
        t["index"] = i
        t["key"] = trial_key(t)
        t["dir"] = hashlib.sha256(t["key"].encode()).hexdigest()[:16]
    return out


def config_hash(cfg: RunConfig) -> str:
    """What must not change between a sweep and its resume (everything but where it runs / logs)."""
    d = cfg.model_dump(mode="json")
    for k in ("resources", "sweep", "tracking", "output_dir", "cache_dir"):
        d.pop(k, None)
    d.get("training", {}).pop("eval_batch_size", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- checks


def check_tracking(cfg: RunConfig) -> str:
    """The MLflow URI is usable (an unreachable server fails here, in seconds); returns it."""
    uri = cfg.mlflow_uri
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.mlflow_uri = {uri!r}: not a database or server URI; allowed: sqlite:///PATH, "
                          f"http(s)://HOST:PORT (a tracking server), postgresql://, mysql://, databricks "
                          f"(MLflow 3 refuses the plain file store)")
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise ConfigError(f"tracking.mlflow_uri = {uri!r}: write sqlite:///ABSOLUTE/PATH.db")
        existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())  # nothing is created here
        if not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise ConfigError(f"tracking.mlflow_uri = {uri!r}: cannot create the database under {existing} "
                              f"(not a writable folder)")
        return uri
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")  # this probe only
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # connection refused, DNS, auth: say which and stop
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"tracking.mlflow_uri = {uri!r}: the MLflow server cannot be reached ({first}); start it, "
                          f"fix the URI, or leave tracking.mlflow_uri unset for a sqlite file in the run folder") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return uri


def plan_sweep(cfg: RunConfig) -> dict:
    """Every check before anything runs (module docstring, 1.); returns {"trials", "shapes", "uri", "plans"}."""
    from ramoe_ray import taxonomy

    trials = grid(cfg)
    if not trials:
        raise ConfigError("the sweep's grid is empty: methods x knobs give no trial")
    uri = check_tracking(cfg)
    shapes = check_against_models(cfg)
    # stage 1's plan of every (model, task): checks the data of every cell and the tokenizer; run_stages runs them
    plans = [taxonomy.plan(cfg, m, t, list(cfg.languages), "train", general=True) for m in cfg.models for t in cfg.tasks]
    return {"trials": trials, "shapes": shapes, "uri": uri, "plans": plans}


# ---------------------------------------------------------------------------------------------- stages 1-2


def run_stages(cfg: RunConfig, plans: list, *, log=print) -> dict:
    """Stages 1-2 of every cell (module docstring, 2.), from ``plan_sweep``'s plans. Returns {"cells": [...],
    "stage1_computed", "stage2_computed", "seconds"}; cells.json entries are the report's per-cell facts."""
    from ramoe_ray import experts as X
    from ramoe_ray import taxonomy

    t0 = time.time()
    cells, n1, n2 = [], 0, 0
    for plan in plans:
        m, t = plan.model_cfg, plan.task_cfg
        done, general = taxonomy.execute(plan)
        n1 += sum(not hit for _, hit in done.values())
        paths = {lang: path for lang, (path, _) in done.items()}
        for lang in cfg.languages:
            facts = None
            for band in cfg.knobs.bands:
                for k in cfg.knobs.top_k:  # the same artefact (key) run_experts gives the trials
                    path, hit = X.build_experts(plan, paths, general[0], lang, band, k)
                    n2 += not hit
                    if facts is None:
                        art = json.loads(Path(path).read_text())
                        s = taxonomy.summary(paths[lang])
                        facts = {
                            "model": m.name, "task": t.name, "language": lang, "family": m.family,
                            "n_train": s["n"], "ci_proportion": s["ci"],
                            "categories": {c: int(round(s[c] * s["n"])) for c in taxonomy.CATEGORIES},
                            "moe_layers": art["moe_layers"], "band_layers": art["band"]["layers"],
                            "divergence_base": [art["divergence"][lang][str(l)] for l in art["moe_layers"]],
                        }
            cells.append(facts)
        log(f"  stages 1-2 {m.name}/{t.name}: " + ", ".join(
            f"{c['language']} ci {100 * c['ci_proportion']:.0f}%" for c in cells[-len(cfg.languages):]))
    return {"cells": cells, "stage1_computed": n1, "stage2_computed": n2, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------- one trial


@contextlib.contextmanager
def _outside_tune_session(active: bool):
    """Ray Train V2's local mode (num_workers=0) refuses to run inside a Tune trial (``ray.train.report``
    raises "deprecated when running in a function passed to Ray Tune": it sees Tune's session). The
    local-mode loop is a plain function call in this process, so the Tune session is hidden for its
    duration and restored after; nothing reports to Tune meanwhile. With workers > 0 nothing is touched."""
    if not active:
        yield
        return
    import ray.train._internal.session as session

    saved, session._session = session._session, None
    try:
        yield
    finally:
        session._session = saved


def _cell_id(d: dict) -> str:
    return f"{d['model']}/{d['task']}/{d['language']}"


def _cell_objects(cfg: RunConfig, spec: dict):
    m = next(x for x in cfg.models if x.name == spec["model"])
    t = next(x for x in cfg.tasks if x.name == spec["task"])
    return m, t


def _eval_actors(cfg: RunConfig) -> int:
    """Evaluation inside a trial / after selection: in process when training runs in the trial process
    (sweep.train_workers = 0: its CPU or GPU is the trial's), else Ray Data actors (resources.inference_actors)."""
    return 0 if _train_workers(cfg) == 0 else cfg.resources.inference_actors


def _train_workers(cfg: RunConfig) -> int:
    return cfg.resources.num_workers if cfg.sweep.train_workers is None else cfg.sweep.train_workers


def _trial_figure(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    hist = record["train"].get("history") or []
    if hist:
        steps = [h["step"] for h in hist]
        for name in ("loss", "ce", "align"):
            ys = [h.get(name) for h in hist]
            if any(y is not None for y in ys):
                a.plot(steps, [math.nan if y is None else y for y in ys], label=name)
        a.set_xlabel("step")
        a.legend()
    else:
        a.text(0.5, 0.5, "no training (steering)", ha="center", va="center", transform=a.transAxes)
    a.set_title("training")
    ev = record["eval"]
    lang = record["spec"]["language"]
    layers = ev["moe_layers"]
    b.plot(layers, record["cell"]["divergence_base"], "--", label="base (train split)")
    b.plot(layers, ev["divergence"][lang], label=f"{record['spec']['method']} (validation)")
    for l in record["train"].get("band_layers") or []:
        b.axvspan(l - 0.5, l + 0.5, color="0.9")
    b.set_xlabel("MoE layer")
    b.set_ylabel(f"divergence {lang} to en")
    b.legend()
    fig.suptitle(record["spec"]["key"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_trial(config: dict) -> None:
    """The Tune function (module docstring, 3.). ``config``: {"trial": grid entry, "cfg": RunConfig as
    JSON, "root": trial folders, "cells": cell id -> the cell's facts, "fail_key": tests}. Writes trial.json in its folder and reports
    the flat metrics to Tune."""
    import torch
    from ray import tune

    from ramoe_ray import evaluate as EV
    from ramoe_ray import train as TR
    from ramoe_ray.cache import write_json_atomic

    t_start = time.time()
    cfg = config_from_dict(config["cfg"], "sweep trial config")
    spec = config["trial"]
    workers = _train_workers(cfg)
    if workers == 0:
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    m, t = _cell_objects(cfg, spec)
    run_dir = Path(config["root"]) / spec["dir"]
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.get("fail_key") and config["fail_key"] == spec["key"]:  # tests: a trial that fails
        raise RuntimeError(f"injected failure of trial {spec['key']} (test)")
    with _outside_tune_session(workers == 0):
        r = TR.train_cell(cfg, m, t, spec["language"], method=spec["method"], lam=spec["lam"], band=_band(spec["band"]),
                          top_k=spec["top_k"], run_dir=run_dir / "train", num_workers=workers)
    t_train = time.time()
    steering = None
    if spec["method"] == "steering":
        steering = {"experts": r["steering"]["experts"], "strength": float(spec["strength"])}
    ev = EV.evaluate_cell(cfg, m, t, [spec["language"]], adapter=r["adapter"], steering=steering, split="validation",
                          out_dir=run_dir / "validation", num_actors=_eval_actors(cfg),
                          batch_size=cfg.training.eval_batch_size)
    t_eval = time.time()
    lang = spec["language"]
    in_loop = float(sum(r.get("step_seconds_rank0") or []))
    final = r.get("final") or {}
    record = {
        "spec": spec, "cell": config["cells"][_cell_id(spec)], "started": t_start,
        "train": {k: r.get(k) for k in ("method", "lam", "lam_used", "band_layers", "task_experts", "experts_mask",
                                        "n_ci", "n_train", "steps", "notes", "adapter", "history", "final",
                                        "cached", "stage_cache")},
        "steering": steering,
        "eval": {k: ev[k] for k in ("n", "accuracy", "divergence", "moe_layers", "path")},
        "timing": {"total": None, "train_cell": t_train - t_start, "in_loop": in_loop, "eval": t_eval - t_train,
                   "prepare": r.get("seconds_prepare"), "fit": r.get("seconds")},
        "phases": r.get("phases_rank0") or {},  # where the fixed cost goes (bench/sweep.py)
        "rules": r.get("rules") or {},
    }
    _trial_figure(record, run_dir / "trial.png")
    record["timing"]["total"] = time.time() - t_start
    write_json_atomic(run_dir / TRIAL_JSON, record)
    metrics = {
        "val_acc": ev["accuracy"][lang], "val_acc_en": ev["accuracy"]["en"], "ci_proportion": record["cell"]["ci_proportion"],
        "n_ci": r.get("n_ci", 0), "steps": r.get("steps", 0),
        "stage12_recomputed": sum(not h for h in (r.get("stage_cache") or {}).values()),
        "seconds_total": record["timing"]["total"], "seconds_in_loop": in_loop, "seconds_eval": t_eval - t_train,
        "trial_json": str(run_dir / TRIAL_JSON),
    }
    for k in ("routing_kl_ci", "routing_kl_ci_base", "ce_train", "ce_train_base"):
        if final.get(k) is not None:
            metrics[k] = float(final[k])
    tune.report(metrics)


# ---------------------------------------------------------------------------------------------- MLflow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _experiment_id(client, name: str, artifacts: Path | None) -> str:
    """The experiment's id, created if new; with a sqlite store its artifacts live next to the database
    (``artifacts``), not in ./mlruns of whatever folder the command ran in."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(f"tracking.experiment = {name!r} is deleted in {client.tracking_uri}; restore it or pick another name")
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifacts.resolve().as_uri() if artifacts else None)


def _params(cfg: RunConfig) -> dict:
    """Every choice of DESIGN.md's definitions + the run's hyperparameters, as MLflow params."""
    from ramoe_ray import losses
    from ramoe_ray import train as TR

    out = {f"rule.train.{k}": v for k, v in TR.RULES.items()}
    out.update({f"rule.loss.{k}": v for k, v in losses.RULES.items()})
    out.update({f"rule.sweep.{k}": v for k, v in RULES.items()})
    out.update({f"training.{k}": v for k, v in cfg.training.model_dump().items()})
    out["rise.budget"] = cfg.rise.budget
    return {k: str(v)[:6000] for k, v in out.items()}


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])


def start_parent(client, exp_id: str, cfg: RunConfig, trials: list[dict], stages: dict, run_dir: Path) -> str:
    """The sweep's parent run: tags, params, the resolved config and cells.json as artifacts."""
    run = client.create_run(exp_id, run_name=f"sweep {cfg.name}", tags={
        "ramoe.kind": "sweep", "ramoe.sweep": cfg.name, "ramoe.config_hash": config_hash(cfg),
        "ramoe.expected_trials": str(len(trials))})
    rid = run.info.run_id
    params = _params(cfg)
    params.update({"models": ",".join(m.name for m in cfg.models), "tasks": ",".join(t.name for t in cfg.tasks),
                   "languages": ",".join(cfg.languages), "methods": ",".join(cfg.methods),
                   "knobs.lambdas": str(cfg.knobs.lambdas), "knobs.bands": str([_band_json(b) for b in cfg.knobs.bands]),
                   "knobs.top_k": str(cfg.knobs.top_k), "steering.strengths": str(cfg.steering.strengths),
                   "n_trials": str(len(trials))})
    _log_params(client, rid, params)
    resolved = save_resolved(cfg, run_dir)
    client.log_artifact(rid, str(resolved))
    cells_file = run_dir / "cells.json"
    from ramoe_ray.cache import write_json_atomic

    write_json_atomic(cells_file, stages["cells"])
    client.log_artifact(rid, str(cells_file), CELLS_ARTIFACT)
    return rid


def search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` (all pages), read through ``client`` (never the global URI)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def children(client, exp_id: str, parent_id: str):
    """The parent's child runs (not deleted) as a DataFrame with mlflow.search_runs' column names
    (run_id, status, tags.*, metrics.*)."""
    import pandas as pd

    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status,
                          **{f"tags.{k}": v for k, v in r.data.tags.items()},
                          **{f"metrics.{k}": v for k, v in r.data.metrics.items()}}
                         for r in search_all(client, [exp_id], f"tags.mlflow.parentRunId = '{parent_id}'")])


def run_name(spec: dict) -> str:
    """What varies first (MLflow cuts long names): 'arith/syn4 ramoe λ=1 band=0.375-0.625 top_k=2 [olmoe-world]'."""
    knobs = ""
    if spec["method"] == "ramoe":
        knobs = f" λ={spec['lam']:g} band={_band_label(spec['band'])} top_k={spec['top_k']}"
    elif spec["method"] == "steering":
        knobs = f" s={spec['strength']:g} band={_band_label(spec['band'])} top_k={spec['top_k']}"
    return f"{spec['task']}/{spec['language']} {spec['method']}{knobs} [{spec['model']}]"


def log_child(client, exp_id: str, parent_id: str, spec: dict, *, record: dict | None, error: str | None,
              trial_id: str) -> str:
    """One trial as a child run: FINISHED with its record, or FAILED with its error."""
    from mlflow.entities import Metric, Param, RunTag

    tags = {"mlflow.parentRunId": parent_id, "ramoe.kind": "trial", "model": spec["model"], "task": spec["task"],
            "language": spec["language"], "method": spec["method"], "trial_key": spec["key"],
            "trial_index": str(spec["index"]), "tune_trial_id": trial_id, "selected": "false",
            "ramoe.trial_dir": str(Path(record["eval"]["path"]).parents[1]) if record else ""}
    started = int(1000 * record["started"]) if record and record.get("started") else None
    run = client.create_run(exp_id, run_name=run_name(spec), tags=tags, start_time=started)
    rid = run.info.run_id
    # model/task/language also as params: MLflow's comparison plots take params and metrics, not tags
    params = {"model": spec["model"], "task": spec["task"], "language": spec["language"], "method": spec["method"],
              "lam": spec["lam"], "band": _band_label(spec["band"]), "top_k": spec["top_k"],
              "strength": spec["strength"] if spec["strength"] is not None else "none"}
    if record is None:
        client.set_tag(rid, "error", (error or "")[:5000])
        _log_params(client, rid, {k: str(v) for k, v in params.items()})
        client.set_terminated(rid, "FAILED")
        return rid
    tr = record["train"]
    # the rules are the parent's params (rule.*), the RISE mask is in trial.json: the comparison stays readable
    params.update({"lam_used": tr.get("lam_used"), "band_layers": tr.get("band_layers"),
                   "task_experts": json.dumps(tr.get("task_experts")), "n_ci": tr.get("n_ci"), "n_train": tr.get("n_train"),
                   "steps": tr.get("steps")})
    _log_params(client, rid, {k: str(v)[:6000] for k, v in params.items()})
    now = int(time.time() * 1000)
    lang = spec["language"]
    ev = record["eval"]
    vals = {"val_acc": ev["accuracy"][lang], "val_acc_en": ev["accuracy"]["en"],
            "ci_proportion": record["cell"]["ci_proportion"], "n_val": ev["n"][lang]}
    vals.update({f"val_div_L{l}": v for l, v in zip(ev["moe_layers"], ev["divergence"][lang])})
    vals["stage12_recomputed"] = sum(not hit for hit in (tr.get("stage_cache") or {}).values())
    for k, v in (tr.get("final") or {}).items():
        if k in ("routing_kl_ci", "routing_kl_ci_base", "ce_train", "ce_train_base") and v is not None:
            vals[k] = v
    vals.update({f"seconds_{k}": v for k, v in record["timing"].items() if v is not None})
    metrics = [Metric(k, float(v), now, 0) for k, v in vals.items()]
    for h in tr.get("history") or []:
        for k in ("loss", "ce", "align", "routing_kl"):
            if h.get(k) is not None:
                metrics.append(Metric(f"train_{k}", float(h[k]), now, int(h["step"])))
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    folder = Path(record["eval"]["path"]).parents[1]
    for f in ("trial.png", TRIAL_JSON):
        if (folder / f).is_file():
            client.log_artifact(rid, str(folder / f))
    end = started + int(1000 * record["timing"]["total"]) if started else None
    client.set_terminated(rid, "FINISHED", end_time=end)
    return rid


def _callback(uri: str, exp_id: str, parent_id: str, total: int, done_before: int):
    """Tune pickles its callbacks with the experiment state: this one holds only plain values (the MLflow
    client is made on first use, progress goes to print looked up at call time)."""
    from ray.tune import Callback

    class MlflowChildren(Callback):
        """Logs each trial as an MLflow child run as it ends (driver side) and prints a progress line."""

        def __init__(self):
            self.finished, self.failed, self._client = 0, 0, None

        def __getstate__(self):
            return {**self.__dict__, "_client": None}

        @property
        def client(self):
            if self._client is None:
                self._client = _client(uri)
            return self._client

        def _line(self, spec, text):
            n = done_before + self.finished + self.failed
            print(f"  [{n}/{total}] {spec['key']}: {text}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = trial.config["trial"]
            res = trial.last_result or {}
            path = res.get("trial_json")
            if not path or not Path(path).is_file():
                return self.on_trial_error(iteration, trials, trial, **info)
            record = json.loads(Path(path).read_text())
            log_child(self.client, exp_id, parent_id, spec, record=record, error=None, trial_id=trial.trial_id)
            self.finished += 1
            tm = record["timing"]
            self._line(spec, f"val acc {100 * res['val_acc']:.1f}% (en {100 * res['val_acc_en']:.1f}%), "
                             f"{tm['total']:.1f} s ({tm['in_loop']:.1f} s in the training loop)")

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = trial.config["trial"]
            err = ""
            if getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
                err = Path(trial.error_file).read_text()
            elif trial.get_pickled_error() is not None:
                err = repr(trial.get_pickled_error())
            log_child(self.client, exp_id, parent_id, spec, record=None, error=err or "unknown error",
                      trial_id=trial.trial_id)
            self.failed += 1
            last = [l for l in err.strip().splitlines() if l.strip()][-1:] or ["unknown error"]
            self._line(spec, f"FAILED: {last[0][:200]}")

    return MlflowChildren()


# ---------------------------------------------------------------------------------------------- Tune


def _ensure_ray(cfg: RunConfig) -> None:
    import ray

    from ramoe_ray import train as TR

    if not ray.is_initialized():
        env = TR._env()
        job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # inside `ray job submit`: the job's runtime_env
        if job:  # Ray refuses a key that both the job and ray.init set (even with equal values): the job's wins
            job_env = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
            env = {k: v for k, v in env.items() if k not in job_env}
        # RAY_ADDRESS (set by `ray job submit`) joins the cluster; otherwise a local instance
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=os.environ.get("RAMOE_RAY_LOGS") == "1")


def trial_resources(cfg: RunConfig) -> dict:
    """What one trial's own process asks Tune for. Local mode: the training worker's CPU/GPU (the trial
    process trains); otherwise a fraction of a CPU (the TorchTrainer asks for its workers itself)."""
    r = cfg.resources
    if _train_workers(cfg) == 0:
        return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
    return {"cpu": cfg.sweep.trial_cpus, "gpu": 0}


def max_concurrent(cfg: RunConfig, cluster: dict) -> int:
    """Trials at once that the cluster's CPUs and GPUs hold (sweep.max_concurrent_trials overrides)."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    r, w = cfg.resources, _train_workers(cfg)
    cpu = trial_resources(cfg)["cpu"] + (w * r.cpus_per_worker if w else 0)
    gpu = (w or 1) * r.gpus_per_worker
    n = int(cluster.get("CPU", 1) // cpu)
    if gpu > 0:
        n = min(n, int(cluster.get("GPU", 0) // gpu))
    return max(1, n)


def _done_trials(client, exp_id: str, parent_id: str) -> tuple[set[str], list[str]]:
    """Finished trial keys, and the run ids of children to drop (failed / killed / running leftovers)."""
    df = children(client, exp_id, parent_id)
    if df.empty:
        return set(), []
    ok = df[df.status == "FINISHED"]
    return set(ok["tags.trial_key"]), list(df[df.status != "FINISHED"].run_id)


def find_parent(client, exp_id: str, cfg: RunConfig) -> str | None:
    runs = client.search_runs([exp_id], filter_string=f"tags.`ramoe.kind` = 'sweep' and tags.`ramoe.sweep` = '{cfg.name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def select_and_test(cfg: RunConfig, client, exp_id: str, parent_id: str, root: Path, *, log=print) -> list[dict]:
    """Module docstring, 5.: the selected child per (cell, method), evaluated on the test split."""
    from mlflow.entities import Metric

    df = children(client, exp_id, parent_id)
    if df.empty:
        return []
    df = df[df.status == "FINISHED"].copy()
    df["_index"] = df["tags.trial_index"].astype(int)
    chosen = []
    for (model, task, lang, method), g in df.groupby(["tags.model", "tags.task", "tags.language", "tags.method"], sort=False):
        g = g.sort_values("_index")
        best = g.loc[g[f"metrics.{SELECT_METRIC}"].idxmax()]  # idxmax: first maximum = earliest in grid order
        for rid in g.run_id:
            client.set_tag(rid, "selected", "true" if rid == best.run_id else "false")
        chosen.append((best, model, task, lang, method))
    chosen.sort(key=lambda c: int(c[0]["_index"]))
    out, todo = [], []
    for best, model, task, lang, method in chosen:
        row = {"run_id": best.run_id, "model": model, "task": task, "language": lang, "method": method,
               "val_acc": float(best[f"metrics.{SELECT_METRIC}"])}
        if not math.isnan(best.get("metrics.test_acc", math.nan)):  # tested before (a resumed sweep)
            out.append({**row, "test_acc": float(best["metrics.test_acc"])})
        else:
            todo.append(({**row, "key": best["tags.trial_key"]}, best["tags.ramoe.trial_dir"]))
    if not todo:
        return out
    # the test evaluations in parallel, as Ray tasks with a trial's resources
    import ray

    _ensure_ray(cfg)
    res = trial_resources(cfg)
    task_fn = ray.remote(_test_eval).options(num_cpus=res["cpu"], num_gpus=res["gpu"])
    refs = [task_fn.remote(cfg.model_dump(mode="json"), folder) for _, folder in todo]
    for (row, folder), ref in zip(todo, refs):
        vals = ray.get(ref)
        now = int(time.time() * 1000)
        client.log_batch(row["run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in vals.items()])
        key = row.pop("key")
        out.append({**row, "test_acc": vals["test_acc"]})
        log(f"  selected {key}: val {100 * row['val_acc']:.1f}% -> test {100 * vals['test_acc']:.1f}%")
    return out


def _test_eval(cfg_json: dict, folder: str) -> dict:
    """Test-split evaluation of one finished trial (its adapter or steering spec) -> test metrics."""
    import torch

    from ramoe_ray import evaluate as EV

    cfg = config_from_dict(cfg_json, "sweep config")
    if _train_workers(cfg) == 0:
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    record = json.loads((Path(folder) / TRIAL_JSON).read_text())
    m, t = _cell_objects(cfg, record["spec"])
    lang = record["spec"]["language"]
    ev = EV.evaluate_cell(cfg, m, t, [lang], adapter=record["train"]["adapter"], steering=record["steering"],
                          split="test", out_dir=Path(folder) / "test", num_actors=_eval_actors(cfg),
                          batch_size=cfg.training.eval_batch_size)
    vals = {"test_acc": ev["accuracy"][lang], "test_acc_en": ev["accuracy"]["en"], "n_test": ev["n"][lang]}
    vals.update({f"test_div_L{l}": v for l, v in zip(ev["moe_layers"], ev["divergence"][lang])})
    return vals


def run_sweep(cfg: RunConfig, *, resume: bool = False, log=print, _fail_key: str | None = None) -> dict:
    """The whole sweep (module docstring). Returns a summary dict (parent run id, counts, timings)."""
    import ray
    from mlflow.entities import Metric
    from ray import tune

    t0 = time.time()
    cfg = with_absolute_paths(cfg)  # trials run in their own folders
    p = plan_sweep(cfg)
    phases = {"seconds_checks": time.time() - t0}  # includes building the synthetic world on first use
    trials, uri = p["trials"], p["uri"]
    if uri.startswith("sqlite:///"):  # every check passed: now the run folder may be created
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
    exp_id = _experiment_id(client, cfg.tracking.experiment, artifacts)  # database + experiment created here, once
    parent_id = None
    if resume:
        parent_id = find_parent(client, exp_id, cfg)
        if parent_id is None:
            raise ConfigError(f"--resume: no sweep named {cfg.name!r} in experiment {cfg.tracking.experiment!r} "
                              f"({uri}); run it without --resume")
        old = client.get_run(parent_id).data.tags.get("ramoe.config_hash")
        if old != config_hash(cfg):
            raise ConfigError(f"--resume: the config changed since sweep {parent_id} began (hash {old} vs "
                              f"{config_hash(cfg)}); resume with the same config or start a new sweep without --resume")
    run_dir = Path(cfg.run_dir).resolve()
    log(f"sweep {cfg.name!r}: {len(trials)} trials over {len(cfg.models)} models x {len(cfg.tasks)} tasks x "
        f"{len(cfg.languages)} languages; MLflow {uri}")
    log("stages 1-2 (once per cell, cached):")
    stages = run_stages(cfg, p["plans"], log=log)
    phases["seconds_stages"] = stages["seconds"]
    log(f"  computed stage 1 for {stages['stage1_computed']} cells, stage 2 for {stages['stage2_computed']} "
        f"(cell, band, top-k) in {stages['seconds']:.1f} s")
    if parent_id is None:
        parent_id = start_parent(client, exp_id, cfg, trials, stages, run_dir)
    else:
        client.update_run(parent_id, status="RUNNING")
    done, stale = _done_trials(client, exp_id, parent_id)
    for rid in stale:
        client.delete_run(rid)
    todo = [t for t in trials if t["key"] not in done]
    log(f"parent run {parent_id}: {len(done)} trials already finished, {len(todo)} to run")
    storage = Path(cfg.sweep.storage_path or run_dir / "tune").resolve()
    root = storage / "trials" / parent_id
    summary = {"parent_run_id": parent_id, "experiment_id": exp_id, "tracking_uri": uri, "trials": len(trials),
               "ran": 0, "finished": len(done), "failed": 0, "stage1_computed": stages["stage1_computed"],
               "stage2_computed": stages["stage2_computed"], "stage12_recomputed_in_trials": 0}
    interrupted = False
    if todo:
        _ensure_ray(cfg)
        conc = max_concurrent(cfg, ray.cluster_resources())
        res = trial_resources(cfg)
        log(f"Ray Tune: {len(todo)} trials, {conc} at a time, each trial {res['cpu']:g} CPU / {res['gpu']:g} GPU "
            f"+ {_train_workers(cfg)} Ray Train workers")
        space = {"trial": tune.grid_search(todo), "cfg": cfg.model_dump(mode="json"), "root": str(root),
                 "fail_key": _fail_key, "cells": {_cell_id(c): c for c in stages["cells"]}}
        cb = _callback(uri, exp_id, parent_id, len(trials), len(done))
        tuner = tune.Tuner(
            tune.with_resources(run_trial, res),
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=conc, reuse_actors=True,
                                        trial_name_creator=lambda tr: tr.trial_id,
                                        trial_dirname_creator=lambda tr: tr.trial_id),
            run_config=tune.RunConfig(name=f"sweep-{parent_id}", storage_path=str(storage / "tune"), callbacks=[cb],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
        t_tune = time.time()
        try:
            tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
        phases["seconds_trials"] = time.time() - t_tune
        summary["ran"] = cb.finished + cb.failed
        summary["failed"] = cb.failed
        summary["finished"] += cb.finished
        interrupted = interrupted or summary["ran"] < len(todo)
    df = children(client, exp_id, parent_id)
    if not df.empty and "metrics.stage12_recomputed" in df:
        summary["stage12_recomputed_in_trials"] = int(df["metrics.stage12_recomputed"].fillna(0).sum())
    if interrupted:
        client.set_terminated(parent_id, "KILLED")
        log(f"interrupted: {summary['finished']} of {len(trials)} trials finished; continue with --resume")
        summary["interrupted"] = True
        summary["seconds"] = time.time() - t0
        return summary
    log("selection on the validation split, test split for the selected trials:")
    t_sel = time.time()
    summary["selected"] = select_and_test(cfg, client, exp_id, parent_id, root, log=log)
    phases["seconds_selection_and_test"] = time.time() - t_sel
    summary["seconds"] = time.time() - t0
    summary["phases"] = phases
    client.log_batch(parent_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                         for k, v in {"sweep_seconds": summary["seconds"], **phases}.items()])
    client.set_terminated(parent_id, "FINISHED" if not summary["failed"] else "FAILED")
    summary["interrupted"] = False
    return summary
