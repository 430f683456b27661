"""The sweep (docs/architecture.md, "The method", over the grid): Ray Tune over cells x methods x knobs, MLflow.

Entry: ``run_sweep(cfg, resume=False) -> dict``; CLI ``ramoe sweep CONFIG [--resume]``. The stages, in
the order ``run_sweep`` runs them:

1. **Checks** (``plan_sweep``), all before any model runs or Ray starts a trial: the tracking URI is
   usable (``check_tracking``), the grid is not empty, every model's size fits the knobs
   (``sources.check``), every (model, task, language) cell has its data (``taxonomy.plan``).
2. **Stages 1-2 once per cell** (``run_stages``), in the driver, through the content-addressed cache: the
   train split's taxonomy of every task and language of a model in one Ray Data pass (one model load per
   actor: ``taxonomy.execute_many``), then experts.json for every (task, language, band, top-k). Trials find
   both in the cache; each trial reports how many it had to recompute (``stage12_recomputed``: 0 expected), the sweep's result sums them.
3. **Trials** (``run_trials``): the grid (grid.py) minus what is already finished and minus the twins (``grid.twins``:
   logged with the trial they repeat), one Ray Tune trial each
   (grid order; trial names = Tune's trial ids; one Tune run per model when models ask for different
   resources, ``resource_groups``, each at its model's concurrency) running ``trial.run_trial``: train, evaluate on the
   **validation** split, report. ``sweep.train_workers = 0`` trains in the trial process itself (small
   models on one machine: no worker group to start per trial).
4. **MLflow** (tracking.py; driver only: trials never open the database): one parent run per sweep
   (resolved config, cells.json, every rule of the method's definitions as params); a child per trial,
   logged by a Tune callback as each trial ends. A failed trial is a FAILED child with its error; the
   sweep goes on, and the parent ends FAILED.
5. **Selection** (``select_and_test``): per cell and method, the child with the best validation accuracy
   of the target language (ties: grid order) is tagged ``selected``; only it is evaluated on the **test**
   split (``test_acc``, ``test_div_L<l>``).
6. **Resume**: the finished children of the newest sweep of this name are the record of what is done;
   ``--resume`` runs only the other trials under the same parent (failed or interrupted ones again,
   their old children deleted), after checking the config is the same. A twin whose trial finished
   before is logged from that trial's child (``tracking.ChildLogger.earlier_twins``), not run.

The report (``ramoe report``, report.py) reads only MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramoe_ray import asha, experts, grid, inference, losses, memory, routing_stats, sources, taxonomy, tracking, train, train_worker, trial
from ramoe_ray.config import NON_RESULT, ConfigError, RunConfig, band_json, band_label, check_tracking_scheme, differing_keys, result_fields
from ramoe_ray.grid import SELECT_METRIC, TRIAL_FIGURE, Trial

# ---------------------------------------------------------------------------------------------- checks


def _check_sqlite(uri: str) -> None:
    """A sqlite URI names a database that can be created (nothing is created here)."""
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or not str(path):
        raise ConfigError(f"tracking.mlflow_uri = {uri!r}: write sqlite:///ABSOLUTE/PATH.db")
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise ConfigError(f"tracking.mlflow_uri = {uri!r}: cannot create the database under {existing} "
                          f"(not a writable folder)")


def _probe_server(uri: str) -> None:
    """One request to the tracking server, without retries: an unreachable server fails here, in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")  # this probe only
    try:
        tracking.mlflow_client(uri).search_experiments(max_results=1)
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


def check_tracking(cfg: RunConfig) -> str:
    """The MLflow URI is usable (an unreachable server fails here, in seconds); returns it."""
    uri = cfg.mlflow_uri
    if check_tracking_scheme(uri) == "sqlite":
        _check_sqlite(uri)
    else:
        _probe_server(uri)
    return uri


@dataclass
class SweepPlan:
    """What ``plan_sweep`` checked: the resolved config, the trials, every model's shape, the tracking URI,
    stage 1's plans."""

    cfg: RunConfig
    trials: list[Trial]
    shapes: dict
    uri: str
    plans: list


def check_sweep(cfg: RunConfig) -> tuple[list[Trial], str, dict, dict]:
    """The checks that need nothing built (module docstring, 1.), in order: the grid, the tracking URI,
    ``sources.check``, the general text, the memory fit of every model with GPUs (``memory.check_fit``).
    Returns (trials, tracking URI, model shapes, memory fits). The dry run runs exactly these."""
    trials = grid.trials(cfg)
    if not trials:
        raise ConfigError("the sweep's grid is empty: methods x knobs give no trial")
    uri = check_tracking(cfg)
    shapes = sources.check(cfg)
    sources.check_general_text(cfg)  # the sweep's stage 2 needs it: refused before the world is built
    on_gpu = [m for m in cfg.models if cfg.resources_for(m).gpus_per_worker > 0]
    fits = memory.check_fit(cfg, sources.hf_configs(cfg, on_gpu)) if on_gpu else {}
    return trials, uri, shapes, fits


def plan_sweep(cfg: RunConfig) -> SweepPlan:
    """Every check before anything runs (``check_sweep``), then the config is resolved (``sources.build``:
    the synthetic world on first use) and stage 1 planned."""
    trials, uri, shapes, _ = check_sweep(cfg)
    cfg = sources.build(cfg)  # concrete local paths: trials run in their own folders
    # stage 1's plan of every (model, task): checks the data of every cell and the tokenizer; run_stages runs them
    plans = [taxonomy.plan(cfg, m, t, list(cfg.languages), "train", general=True) for m in cfg.models for t in cfg.tasks]
    return SweepPlan(cfg=cfg, trials=trials, shapes=shapes, uri=uri, plans=plans)


# ---------------------------------------------------------------------------------------------- stages 1-2


def cell_id(cell: dict) -> str:
    """A cell's facts (cells.json entry) -> the cell id of its trials (``Trial.cell``)."""
    return f"{cell['model']}/{cell['task']}/{cell['language']}"


def _cell_facts(plan, taxonomy_path: Any, experts_path: Any, language: str) -> dict:
    """A cells.json entry: the report's facts of one cell, from its taxonomy and first experts.json."""
    art = json.loads(Path(experts_path).read_text())
    s = taxonomy.summary(taxonomy_path)
    return {
        "model": plan.model_cfg.name, "task": plan.task_cfg.name, "language": language, "family": plan.model_cfg.family,
        "n_train": s["n"], "ci_proportion": s["ci"],
        "categories": {c: int(round(s[c] * s["n"])) for c in taxonomy.CATEGORIES},
        "moe_layers": art["moe_layers"], "band_layers": art["band"]["layers"],
        "divergence_base": [art["divergence"][language][str(l)] for l in art["moe_layers"]],
    }


def _stages_of(cfg: RunConfig, plan, done: dict, general: tuple) -> tuple[list[dict], int, int]:
    """Stages 1-2 of one (model, task), its stage 1 done (``taxonomy.execute``'s result): (its cells' facts,
    stage 1 computed, stage 2 computed)."""
    n1 = sum(not hit for _, hit in done.values())
    paths = {lang: path for lang, (path, _) in done.items()}
    cells, n2 = [], 0
    for lang in cfg.languages:
        facts, bands = None, {}
        for band in cfg.knobs.bands:
            for k in cfg.knobs.top_k:  # the same artefact (key) run_experts gives the trials
                path, hit = experts.build_experts(plan, paths, general[0], lang, band, k)
                n2 += not hit
                facts = facts or _cell_facts(plan, paths[lang], path, lang)
            bands[band_label(band)] = json.loads(Path(path).read_text())["band"]["layers"]
        cells.append({**facts, "bands": bands})  # band label -> its layers in this cell (grid.twins)
    return cells, n1, n2


def run_stages(cfg: RunConfig, plans: list, *, log=print) -> dict:
    """Stages 1-2 of every cell (module docstring, 2.), from ``plan_sweep``'s plans. Returns {"cells": [...],
    "stage1_computed", "stage2_computed", "seconds"}; cells.json entries are the report's per-cell facts."""
    t0 = time.time()
    cells, n1, n2 = [], 0, 0
    by_model: dict[str, list] = {}
    for plan in plans:
        by_model.setdefault(plan.model_cfg.name, []).append(plan)
    for model_plans in by_model.values():
        # stage 1 of every task of a model in ONE predictor pass: one model load per actor, not per task
        for plan, (done, general) in zip(model_plans, taxonomy.execute_many(model_plans)):
            mine, c1, c2 = _stages_of(cfg, plan, done, general)
            cells += mine
            n1, n2 = n1 + c1, n2 + c2
            log(f"  stages 1-2 {plan.model_cfg.name}/{plan.task_cfg.name}: " + ", ".join(
                f"{c['language']} ci {100 * c['ci_proportion']:.0f}%" for c in mine))
    return {"cells": cells, "stage1_computed": n1, "stage2_computed": n2, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------- Ray resources


def ensure_ray(cfg: RunConfig) -> None:
    """Ray for the trials: the cluster of ``ray job submit`` (RAY_ADDRESS), else a local instance."""
    inference.ensure_ray(train_worker.ray_env())


def trial_resources(cfg: RunConfig, model: str | None = None) -> dict:
    """What one trial of ``model`` (None: the top-level ``resources``) asks Tune for for its own process.
    Training in the trial (train_workers = 0): the model's worker CPU/GPU; otherwise a fraction of a CPU
    (the TorchTrainer asks for the model's workers itself: ``trial_demand``)."""
    r = cfg.resources if model is None else cfg.resources_for(model)
    if trial.train_workers(cfg, model) == 0:
        return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}
    return {"cpu": cfg.sweep.trial_cpus, "gpu": 0}


def trial_demand(cfg: RunConfig, model: str | None = None) -> dict:
    """Everything one trial of ``model`` holds while it trains: its own process and its Ray Train workers."""
    r = cfg.resources if model is None else cfg.resources_for(model)
    w, own = trial.train_workers(cfg, model), trial_resources(cfg, model)
    return {"cpu": own["cpu"] + (w * r.cpus_per_worker if w else 0), "gpu": (w or 1) * r.gpus_per_worker}


def max_concurrent(cfg: RunConfig, cluster: dict, model: str | None = None) -> int:
    """Trials of ``model`` at once that the cluster's CPUs and GPUs hold: ``sweep.cluster`` replaces what Ray
    reports (``cluster``), ``sweep.max_concurrent_trials`` caps it (without ``sweep.cluster``: replaces it)."""
    cap = cfg.sweep.max_concurrent_trials
    if cfg.sweep.cluster is None and cap:
        return cap  # it stands for the cluster's size (an autoscaling cluster starts small)
    if cfg.sweep.cluster is not None:
        cluster = {"CPU": cfg.sweep.cluster.cpus, "GPU": cfg.sweep.cluster.gpus}
    need = trial_demand(cfg, model)
    n = int(cluster.get("CPU", 1) // need["cpu"])
    if need["gpu"] > 0:
        n = min(n, int(cluster.get("GPU", 0) // need["gpu"]))
    return max(1, min(n, cap) if cap else n)


def tune_storage(cfg: RunConfig) -> Path:
    """Where Tune keeps its runs and the trial folders: ``sweep.storage_path``, else the run folder's tune/."""
    return Path(cfg.sweep.storage_path or Path(cfg.run_dir) / "tune").resolve()


def resource_groups(cfg: RunConfig, todo: list[Trial]) -> list[list[Trial]]:
    """``todo`` cut into runs of consecutive trials whose models ask for the same resources (models are the
    grid's outer loop: one run per model, or one for all when they ask alike); each is one Tune run with its
    own resources and concurrency (Ray Train's workers are not Tune's to reserve, so a Tune run's cap holds
    for every trial in it)."""
    groups: list[list[Trial]] = []
    for t in todo:
        if groups and trial_demand(cfg, groups[-1][-1].model) == trial_demand(cfg, t.model):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


# ---------------------------------------------------------------------------------------------- the parent run


def _open_experiment(cfg: RunConfig, uri: str):
    """(client, experiment id); with sqlite the run folder, database and experiment are created here, once."""
    sqlite = uri.startswith("sqlite:///")
    if sqlite:  # every check passed: now the run folder may be created
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = tracking.mlflow_client(uri)
    artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if sqlite else None
    return client, tracking.experiment_id(client, cfg.tracking.experiment, artifacts)


def _resumed_parent(client, exp_id: str, cfg: RunConfig, uri: str, log=print) -> str:
    """--resume: the newest sweep of this name, begun with the same settings, whose driver is not running."""
    parent_id = tracking.find_parent(client, exp_id, cfg.name)
    if parent_id is None:
        raise ConfigError(f"--resume: no sweep named {cfg.name!r} in experiment {cfg.tracking.experiment!r} "
                          f"({uri}); run it without --resume")
    state, said = tracking.driver_state(client.get_run(parent_id))
    if state == "alive":
        raise ConfigError(f"--resume: {said}; stop it first (a sweep has one driver), or wait for it to end")
    if state in ("stopped", "unknown"):
        log(f"--resume: {said}; this run continues it")
    old = client.get_run(parent_id).data.tags.get("ramoe.config_hash")
    if old != grid.config_hash(cfg):
        before = tracking.sweep_identity(client, parent_id)
        changed = differing_keys(before, result_fields(cfg)) if before is not None else f"hash {old} vs {grid.config_hash(cfg)}"
        raise ConfigError(f"--resume: sweep {parent_id} began with other settings that change results ({changed}); "
                          "resume with the same settings, or start a new sweep without --resume (another name keeps "
                          f"both). Left out of this check, as they change no result: {', '.join(NON_RESULT)}")
    return parent_id


def parent_params(cfg: RunConfig, n_trials: int) -> dict:
    """The parent's params: every choice of the method's definitions, the run's hyperparameters, the grid."""
    out = {f"rule.train.{k}": v for k, v in train.RULES.items()}
    out.update({f"rule.loss.{k}": v for k, v in losses.RULES.items()})
    out.update({f"rule.sweep.{k}": v for k, v in grid.RULES.items()})
    out.update({f"rule.stats.{k}": v for k, v in routing_stats.RULES.items()})
    out.update({f"training.{k}": v for k, v in cfg.training.model_dump().items()})
    out.update({f"rise.{k}": v for k, v in cfg.rise.model_dump().items()})  # budget None: 2 % (K in experts.json)
    out = {k: str(v)[:6000] for k, v in out.items()}
    out.update({"models": ",".join(m.name for m in cfg.models), "tasks": ",".join(t.name for t in cfg.tasks),
                "languages": ",".join(cfg.languages), "methods": ",".join(cfg.methods),
                "knobs.lambdas": str(cfg.knobs.lambdas), "knobs.bands": str([band_json(b) for b in cfg.knobs.bands]),
                "knobs.top_k": str(cfg.knobs.top_k), "steering.strengths": str(cfg.steering.strengths),
                "n_trials": str(n_trials)})
    return out


def _done_trials(client, exp_id: str, parent_id: str) -> tuple[set[str], list[str], int]:
    """Finished trial keys (those ASHA stopped included), the run ids of children to drop (failed / killed /
    running leftovers), and how many of the finished ASHA stopped."""
    df = tracking.children(client, exp_id, parent_id)
    if df.empty:
        return set(), [], 0
    ok = df[df.status == "FINISHED"]
    return set(ok["tags.trial_key"]), list(df[df.status != "FINISHED"].run_id), int(tracking.stopped_rows(ok).sum())


# ---------------------------------------------------------------------------------------------- trials


def run_trials(cfg: RunConfig, todo: list[Trial], cells: list[dict], logger: tracking.ChildLogger, *,
               storage: Path, root: Path, log=print) -> dict:
    """Ray Tune over ``todo`` (module docstring, 3.), one Tune run per ``resource_groups`` group; ``logger``
    logs each trial to MLflow as it ends. Returns {"seconds", "interrupted"} (Ctrl-C, or trials that never ended)."""
    t0, interrupted = time.time(), False
    groups = resource_groups(cfg, todo)
    for i, group in enumerate(groups):
        name = f"sweep-{logger.parent_id}" + (f"-{i}" if len(groups) > 1 else "")
        if _tune_group(cfg, group, cells, logger, storage=storage, root=root, name=name, log=log):
            interrupted = True
            break
    ran = logger.finished + logger.failed + logger.stopped - logger.twins_logged
    return {"seconds": time.time() - t0, "interrupted": interrupted or ran < len(todo)}


def _tune_group(cfg: RunConfig, todo: list[Trial], cells: list[dict], logger: tracking.ChildLogger, *,
                storage: Path, root: Path, name: str, log=print) -> bool:
    """One Tune run over trials that ask for the same resources; True when interrupted (Ctrl-C)."""
    import ray
    from ray import tune

    ensure_ray(cfg)
    model = todo[0].model
    conc = max_concurrent(cfg, ray.cluster_resources(), model)
    res = trial_resources(cfg, model)
    log(f"Ray Tune: {len(todo)} trials ({', '.join(dict.fromkeys(t.model for t in todo))}), {conc} at a time, "
        f"each trial {res['cpu']:g} CPU / {res['gpu']:g} GPU + {trial.train_workers(cfg, model)} Ray Train workers")
    asha_on = any(trial.rungs(cfg, t) for t in todo)  # RA-MoE grid trials under sweep.scheduler: asha
    if asha_on:
        ms = asha.milestones(cfg.sweep.asha_grace, cfg.sweep.asha_reduction_factor)
        log(f"ASHA per cell over the RA-MoE settings: rungs at {', '.join(f'{m:g}' for m in ms)} % of each training; "
            f"at a rung, the top 1/{cfg.sweep.asha_reduction_factor:g} of the cell's settings continue")
    space = {"trials": tune.grid_search(tune_units(todo)), "root": str(root)}
    shared = tune.with_parameters(trial.run_trial, cfg_json=cfg.model_dump(mode="json"),
                                  cells={cell_id(c): c for c in cells})  # once, in the object store
    tuner = tune.Tuner(
        tune.with_resources(shared, res),
        param_space=space,
        # a trial process is reused when it trains itself; one that drives a Ray Train worker group is not: a
        # trial stopped early (asha) ends with its process, which takes its controller and worker group along
        tune_config=tune.TuneConfig(max_concurrent_trials=conc, reuse_actors=trial.train_workers(cfg, model) == 0,
                                    scheduler=asha.scheduler(cfg.sweep.asha_grace, cfg.sweep.asha_reduction_factor)
                                    if asha_on else None,
                                    trial_name_creator=lambda tr: tr.trial_id,
                                    trial_dirname_creator=lambda tr: tr.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=str(storage / "tune"),
                                  callbacks=[tracking.tune_callback(logger)], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        tuner.fit()
    except KeyboardInterrupt:
        return True
    return False


def tune_units(todo: list[Trial]) -> list[list[dict]]:
    """What one Tune trial runs: a trial, or every steering setting of a cell (one model load for all;
    ``trial.run_trial``); in grid order of their first trial."""
    units: dict[str, list[dict]] = {}
    for t in todo:
        key = f"steering:{t.cell}" if t.method == "steering" else t.key
        units.setdefault(key, []).append(dataclasses.asdict(t))
    return list(units.values())


# ---------------------------------------------------------------------------------------------- selection


def select(client, exp_id: str, parent_id: str) -> list:
    """Tags the selected child of each (cell, method) (module docstring, 5.); returns their rows of
    ``tracking.children`` in grid order."""
    df = tracking.children(client, exp_id, parent_id)
    if df.empty:
        return []
    # the grid at the first seed, trials that completed (not those ASHA stopped)
    df = df[(df.status == "FINISHED") & ~_replicate_rows(df) & ~tracking.stopped_rows(df)].copy()
    df["_index"] = df["tags.trial_index"].astype(int)
    chosen = []
    for _, g in df.groupby(["tags.model", "tags.task", "tags.language", "tags.method"], sort=False):
        g = g.sort_values("_index")
        best = g.loc[g[f"metrics.{SELECT_METRIC}"].idxmax()]  # idxmax: first maximum = earliest in grid order
        for rid in g.run_id:
            client.set_tag(rid, "selected", "true" if rid == best.run_id else "false")
        chosen.append(best)
    return sorted(chosen, key=lambda b: int(b["_index"]))


def _replicate_rows(df):
    """The rows of ``tracking.children`` that are replicates (another seed of a selected trial)."""
    return tracking.tagged_rows(df, tracking.REPLICATE_TAG)


def _test_selected(cfg: RunConfig, client, todo: list[tuple[dict, str]], *, log=print) -> list[dict]:
    """The test evaluations of the selected trials (and their replicates) in parallel, as Ray tasks with
    a trial's resources; each child gets its test metrics, its per-example predictions
    (``trial.PREDICTIONS``), its figure (trial.png) and the test split as a dataset input."""
    import ray

    ensure_ray(cfg)
    refs = []
    for row, folder in todo:
        res = trial_resources(cfg, row["model"])
        task_fn = ray.remote(trial.evaluate_on_test).options(num_cpus=res["cpu"], num_gpus=res["gpu"])
        refs.append(task_fn.remote(cfg.model_dump(mode="json"), folder))
    out = []
    for (row, folder), ref in zip(todo, refs):
        got = ray.get(ref)
        vals = got["metrics"]
        client.log_dict(row["run_id"], got["predictions"], trial.PREDICTIONS)
        client.log_artifact(row["run_id"], str(Path(folder) / TRIAL_FIGURE))
        source = next(t.source for t in cfg.tasks if t.name == row["task"])
        tracking.log_dataset(client, row["run_id"], source, row["task"], row["language"], "test", got["predictions"]["ids"])
        model_id = None
        if row.get("adapter"):  # the tested adapters are logged models, their test metrics linked to them
            model_id = tracking.log_adapter(client, row["exp_id"], row["run_id"], f"{row['method']}-{row['model']}-"
                                            f"{row['task']}-{row['language']}", row["adapter"], {"trial_key": row["key"]})
        tracking.log_metrics(client, row["run_id"], vals, model_id=model_id)
        tracking.log_metrics(client, row["run_id"], {"seconds_test": got["seconds"]})  # bench/sweep.py's evaluation
        key = row.pop("key")
        out.append({**row, "test_acc": vals["test_acc"]})
        log(f"  {key}: val {100 * row['val_acc']:.1f}% -> test {100 * vals['test_acc']:.1f}%")
    return out


def select_and_test(cfg: RunConfig, client, exp_id: str, parent_id: str, *, log=print) -> list[dict]:
    """Module docstring, 5.: the selected child per (cell, method), evaluated on the test split (once:
    a resumed sweep keeps the test numbers it has)."""
    out, todo, untested = [], [], []
    chosen = select(client, exp_id, parent_id)
    df = tracking.children(client, exp_id, parent_id)
    replicas = [r for _, r in df[(df.status == "FINISHED") & _replicate_rows(df)].iterrows()] if not df.empty else []
    for best in chosen + replicas:
        row = {"run_id": best.run_id, "model": best["tags.model"], "task": best["tags.task"],
               "language": best["tags.language"], "method": best["tags.method"],
               "val_acc": float(best[f"metrics.{SELECT_METRIC}"]), "exp_id": exp_id,
               "adapter": best.get("tags.ramoe.adapter") or None}
        if not math.isnan(best.get("metrics.test_acc", math.nan)):  # tested before (a resumed sweep)
            out.append({**row, "test_acc": float(best["metrics.test_acc"])})
        else:
            todo.append(({**row, "key": best["tags.trial_key"]}, best["tags.ramoe.trial_dir"]))
            untested.append(best)
    tracking.require_trial_folders(untested, "for the test evaluation (each trial's adapter)")
    return out + (_test_selected(cfg, client, todo, log=log) if todo else [])


# ---------------------------------------------------------------------------------------------- the sweep


@dataclass
class _Sweep:
    """What run_sweep's steps share: the checked config and plan, the MLflow parent, the summary so far."""

    cfg: RunConfig
    plan: SweepPlan
    client: Any
    exp_id: str
    t0: float
    phases: dict
    summary: dict = dataclasses.field(default_factory=dict)
    parent_id: str = ""


LIBRARY_LOG = "sweep.log"  # in the run folder: what libraries print during a sweep


@contextlib.contextmanager
def _library_output_to(path: Path, log):
    """This process's stdout and stderr (library warnings, Ray's and Tune's log lines and banners,
    progress bars) go to ``path``; yields the console's log function, which the trial lines share
    (``tracking.console``). Restored on the way out, so an error reaches the console in full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"library messages (warnings, Ray, Tune) go to {path}")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(1), "w", buffering=1)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    tracking.console = console
    try:
        yield log if log is not print else (lambda text: print(text, file=console, flush=True))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        tracking.console = None
        console.close()


def _prepare(cfg: RunConfig, plan: SweepPlan, resume: bool, t0: float, log) -> tuple[_Sweep, dict]:
    """MLflow experiment (and the parent to resume), stages 1-2. Returns the sweep and stages' result."""
    cfg = plan.cfg
    phases = {"seconds_checks": time.time() - t0}  # includes building the synthetic world on first use
    client, exp_id = _open_experiment(cfg, plan.uri)
    sw = _Sweep(cfg=cfg, plan=plan, client=client, exp_id=exp_id, t0=t0, phases=phases)
    if resume:
        sw.parent_id = _resumed_parent(client, exp_id, cfg, plan.uri, log)
    log(f"sweep {cfg.name!r}: {len(plan.trials)} trials over {len(cfg.models)} models x {len(cfg.tasks)} tasks x "
        f"{len(cfg.languages)} languages; MLflow {plan.uri}")
    log("stages 1-2 (once per cell, cached):")
    # stage 1's actors and the trials share one Ray, with the trials' environment; started before the SIGTERM
    # handler (run_sweep): ray.init sets its own for SIGTERM (sys.exit), which would win
    ensure_ray(cfg)
    stages = run_stages(cfg, plan.plans, log=log)
    phases["seconds_stages"] = stages["seconds"]
    log(f"  computed stage 1 for {stages['stage1_computed']} cells, stage 2 for {stages['stage2_computed']} "
        f"(cell, band, top-k) in {stages['seconds']:.1f} s")
    return sw, stages


def _open_parent(sw: _Sweep, stages: dict, run_dir: Path, log) -> list[Trial]:
    """The parent run (new, or the resumed one back to RUNNING, its unfinished children dropped); the
    summary's start; returns the trials still to run."""
    client, cfg, trials = sw.client, sw.cfg, sw.plan.trials
    if not sw.parent_id:
        sw.parent_id = tracking.start_parent(client, sw.exp_id, cfg, params=parent_params(cfg, len(trials)),
                                             n_trials=len(trials) + grid.n_replicates(cfg), cells=stages["cells"],
                                             run_dir=run_dir)
    else:
        client.update_run(sw.parent_id, status="RUNNING")
        for k, v in tracking.driver_tags().items():
            client.set_tag(sw.parent_id, k, v)
        resumes = int(client.get_run(sw.parent_id).data.tags.get(tracking.RESUMES_TAG, 0)) + 1
        client.set_tag(sw.parent_id, tracking.RESUMES_TAG, str(resumes))  # its phase times are the last segment's
    done, stale, stopped = _done_trials(client, sw.exp_id, sw.parent_id)
    for rid in stale:
        client.delete_run(rid)
    todo = [t for t in trials if t.key not in done]
    early = f" ({stopped} of them stopped early by ASHA)" if stopped else ""
    log(f"parent run {sw.parent_id}: {len(done)} trials already finished{early}, {len(todo)} to run")
    sw.summary = {"parent_run_id": sw.parent_id, "experiment_id": sw.exp_id, "tracking_uri": sw.plan.uri,
                  "trials": len(trials) + grid.n_replicates(cfg), "ran": 0, "finished": len(done) - stopped,
                  "stopped": stopped, "failed": 0,
                  "stage1_computed": stages["stage1_computed"], "stage2_computed": stages["stage2_computed"],
                  "stage12_recomputed_in_trials": 0}
    return todo


def _run_todo(sw: _Sweep, todo: list[Trial], cells: list[dict], log, phase: str = "trials") -> bool:
    """The trials still to run, through Tune, their twins (``grid.twins``) logged with them, and the twins of
    trials finished in an earlier run logged from those (``ChildLogger.earlier_twins``); counts them into the
    summary. True if interrupted."""
    storage = tune_storage(sw.cfg)
    run, twins, earlier = _todo_twins(sw, todo, cells, phase)
    if twins or earlier:
        n = sum(map(len, [*twins.values(), *earlier.values()]))
        log(f"{n} of the {len(todo)} trials are twins of another trial of their cell (a band resolved to the same "
            f"layers as another): {len(run)} run, each twin is logged with its trial's results ({tracking.SAME_AS_TAG})")
    logger = tracking.ChildLogger(sw.plan.uri, sw.exp_id, sw.parent_id, sw.summary["trials"],
                                  sw.summary["finished"] + sw.summary["stopped"],
                                  task_sources={t.name: t.source for t in sw.cfg.tasks}, twins=twins)
    if earlier:
        kids = tracking.children(sw.client, sw.exp_id, sw.parent_id)
        logger.earlier_twins(earlier, kids[kids.status == "FINISHED"])
    ran = run_trials(sw.cfg, run, cells, logger, storage=storage, root=storage / "trials" / sw.parent_id, log=log)
    sw.phases[f"seconds_{phase}"] = ran["seconds"]
    sw.summary["ran"] += logger.finished + logger.failed + logger.stopped
    sw.summary["failed"] += logger.failed
    sw.summary["finished"] += logger.finished
    sw.summary["stopped"] += logger.stopped
    return ran["interrupted"]


def _todo_twins(sw: _Sweep, todo: list[Trial], cells: list[dict], phase: str):
    """``grid.twins`` over the whole grid, restricted to ``todo``: (the trials to run, their twins, and the twins
    whose trial finished in an earlier run of this sweep: {its key: its twins still to log})."""
    keys = {t.key for t in todo}
    run, twins = grid.twins(sw.plan.trials if phase == "trials" else todo,
                            {cell_id(c): c.get("bands", {}) for c in cells})
    left = {k: [t for t in v if t.key in keys] for k, v in twins.items()}
    return ([t for t in run if t.key in keys], {k: v for k, v in left.items() if k in keys and v},
            {k: v for k, v in left.items() if k not in keys and v})


def _run_replicates(sw: _Sweep, cells: list[dict], log) -> bool:
    """The selected configuration of every (cell, trained method) again with each other seed
    (``grid.RULES["seeds"]``), the ones not finished yet. True if interrupted."""
    planned = {t.key: t for t in sw.plan.trials}  # (from the plan, not the trial's folder: nothing read from disk)
    chosen = [planned[b["tags.trial_key"]] for b in select(sw.client, sw.exp_id, sw.parent_id)]
    done, _, _ = _done_trials(sw.client, sw.exp_id, sw.parent_id)
    todo = [r for r in grid.replicates(sw.cfg, chosen, len(sw.plan.trials)) if r.key not in done]
    if not todo:
        return False
    log(f"seeds {sw.cfg.training.seeds[1:]}: {len(todo)} retrainings of the selected configurations")
    return _run_todo(sw, todo, cells, log, phase="replicates")


def _finish(sw: _Sweep, interrupted: bool, log) -> dict:
    """Interrupted: the parent KILLED (resume continues it). Else selection and test, the parent's
    timings, the parent FINISHED (FAILED if a trial failed)."""
    client, summary = sw.client, sw.summary
    df = tracking.children(client, sw.exp_id, sw.parent_id)
    if not df.empty and "metrics.stage12_recomputed" in df:
        summary["stage12_recomputed_in_trials"] = int(df["metrics.stage12_recomputed"].fillna(0).sum())
    summary["twins"] = int(tracking.twin_rows(df).sum()) if not df.empty else 0  # this run's and earlier runs'
    if not df.empty and "metrics.base_passes_recomputed" in df:  # the base passes' cache (base_cache)
        summary["base_passes_recomputed_in_trials"] = int(df["metrics.base_passes_recomputed"].fillna(0).sum())
    if interrupted:
        client.set_terminated(sw.parent_id, "KILLED")
        stopped = f" ({summary['stopped']} more stopped by ASHA)" if summary["stopped"] else ""
        log(f"interrupted: {summary['finished']} of {summary['trials']} trials finished{stopped}; parent run "
            f"{sw.parent_id} marked KILLED")
        return {**summary, "interrupted": True, "seconds": time.time() - sw.t0}
    log("selection on the validation split, test split for the selected trials:")
    t_sel = time.time()
    summary["selected"] = select_and_test(sw.cfg, client, sw.exp_id, sw.parent_id, log=log)
    sw.phases["seconds_selection_and_test"] = time.time() - t_sel
    summary["seconds"] = time.time() - sw.t0
    summary["phases"] = sw.phases
    tracking.log_metrics(client, sw.parent_id, {"sweep_seconds": summary["seconds"], "trials_stopped": summary["stopped"],
                                                "trials_twins": summary["twins"],
                                                **sw.phases})
    client.set_terminated(sw.parent_id, "FINISHED" if not summary["failed"] else "FAILED")
    return {**summary, "interrupted": False}


@contextlib.contextmanager
def _sigterm_as_ctrl_c(sw: _Sweep, resume_hint: str, log):
    """SIGTERM (``ray job stop``, Kubernetes deleting a pod) stops the sweep as Ctrl-C does. A hard kill
    may follow within seconds (``ray job stop``: RAY_JOB_STOP_WAIT_TIME_S, 3 s by default), so first the
    parent is marked KILLED (from a thread, at most 2 s: the main thread may hold MLflow's store) and the
    resume command printed."""
    def on_sigterm(signum, frame):
        marker = threading.Thread(target=sw.client.set_terminated, args=(sw.parent_id, "KILLED"), daemon=True)
        marker.start()
        marker.join(2.0)
        log(f"SIGTERM: stopping the sweep; parent run {sw.parent_id} marked KILLED. Continue it with: {resume_hint}")
        ctrl_c = signal.getsignal(signal.SIGINT)  # Ray Tune's own during tuner.fit: it stops the trials cleanly
        if callable(ctrl_c):
            ctrl_c(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_sweep(cfg: RunConfig, *, resume: bool = False, log=print, resume_hint: str = "ramoe sweep CONFIG --resume") -> dict:
    """The whole sweep (module docstring). Returns a summary dict (parent run id, counts, timings).
    ``resume_hint``: the exact command that continues this sweep (printed when it is stopped)."""
    t0 = time.time()
    plan = plan_sweep(cfg)  # every check: errors reach the console before anything is written
    with _library_output_to(Path(plan.cfg.run_dir).resolve() / LIBRARY_LOG, log) as log:
        sw, stages = _prepare(cfg, plan, resume, t0, log)
        run_dir = Path(sw.cfg.run_dir).resolve()
        todo = _open_parent(sw, stages, run_dir, log)
        with _sigterm_as_ctrl_c(sw, resume_hint, log):
            interrupted = _run_todo(sw, todo, stages["cells"], log) if todo else False
            if not interrupted and len(sw.cfg.training.seeds) > 1:
                interrupted = _run_replicates(sw, stages["cells"], log)
            return _finish(sw, interrupted, log)
