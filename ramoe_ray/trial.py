"""What runs inside one Ray Tune trial of the sweep (docs/architecture.md, "The method"), and the test-split
evaluation of a selected trial afterwards.

``run_trial(config, cfg_json, cells)`` is the Tune function: it trains the trial's cell with its method and knobs
(``train.train_cell``: a Ray Train ``TorchTrainer`` with DeepSpeed ZeRO-3; ``sweep.train_workers = 0``
runs the training recipe in the trial process itself, no worker group to start per trial), evaluates
on the **validation** split (``evaluate.evaluate_cell``; a training in the trial process is validated with its
own model before it is released, ``train_cell``'s ``on_trained``: no second load), writes trial.json in its
folder and reports the flat metrics to Tune. Trials never open the MLflow database: the sweep's driver
logs them (tracking.py).

``evaluate_on_test(cfg_json, folder)`` evaluates a finished trial (its adapter or steering spec) on the
**test** split and draws its figure (trial.png); the sweep runs it only for the selected trial of each (cell, method)
and their seed replicates. Every trial's curves are MLflow metrics (train_*, val_div_L*), which MLflow's UI plots;
a figure for every trial cost ~0.22 s each, and sweeps/synthetic-grid.yaml ran 1,972 trials for 378 tested ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from ramoe_ray import asha, evaluate, tracking, train
from ramoe_ray.cache import write_json_atomic
from ramoe_ray.config import RunConfig, config_from_dict
from ramoe_ray.grid import TRIAL_FIGURE, TRIAL_JSON, Trial

TRAIN_KEYS = ("method", "lam", "lam_used", "band_layers", "task_experts", "experts_mask", "n_ci", "n_train", "steps",
              "notes", "adapter", "history", "final", "cached", "stage_cache", "base_passes_recomputed", "rungs",
              "zero_stage")
FINAL_METRICS = ("routing_kl_ci", "routing_kl_ci_base", "ce_train", "ce_train_base")
PREDICTIONS = "test/predictions.json"  # a tested child's artefact: {language, ids, correct, predictions, answers}


# ---------------------------------------------------------------------------------------------- resources


def _resources(cfg: RunConfig, model: str | None):
    return cfg.resources if model is None else cfg.resources_for(model)


def train_workers(cfg: RunConfig, model: str | None = None) -> int:
    """Ray Train workers per trial of ``model`` (None: the top-level ``resources``): sweep.train_workers, else
    the model's resources.num_workers (``RunConfig.resources_for``; 0 = train in the trial)."""
    return _resources(cfg, model).num_workers if cfg.sweep.train_workers is None else cfg.sweep.train_workers


def eval_actors(cfg: RunConfig, model: str | None = None) -> int:
    """Evaluation inside a trial / after selection: in process when training runs in the trial process
    (sweep.train_workers = 0: its CPU or GPU is the trial's), else Ray Data actors (resources.inference_actors)."""
    return 0 if train_workers(cfg, model) == 0 else cfg.resources.inference_actors


def _use_trial_cpus(cfg: RunConfig, model: str | None = None) -> None:
    """Training / evaluating in this process: as many torch threads as the trial holds CPUs."""
    import torch

    if train_workers(cfg, model) == 0:
        torch.set_num_threads(max(1, int(_resources(cfg, model).cpus_per_worker)))


def _cell_objects(cfg: RunConfig, trial: Trial):
    m = next(x for x in cfg.models if x.name == trial.model)
    t = next(x for x in cfg.tasks if x.name == trial.task)
    return m, t


# ---------------------------------------------------------------------------------------------- steps


def rungs(cfg: RunConfig, trial: Trial) -> list[float]:
    """ASHA's rungs (percent trained) for an RA-MoE grid trial under ``sweep.scheduler: asha``; else none."""
    if cfg.sweep.scheduler != "asha" or trial.method != "ramoe" or trial.replicate_of:
        return []
    return asha.milestones(cfg.sweep.asha_grace, cfg.sweep.asha_reduction_factor)


def train_trial(cfg: RunConfig, trial: Trial, run_dir: Path, on_rung=None, on_trained=None) -> dict:
    """Trains the trial's cell with its method and knobs; ``train.train_cell``'s result. ``on_rung``: where
    the rung evaluations of a training in this process go (``tune.report``); ``on_trained``: train_cell's."""
    m, t = _cell_objects(cfg, trial)
    return train.train_cell(cfg, m, t, trial.language, method=trial.method, lam=trial.lam, band=trial.band_spec(),
                            top_k=trial.top_k, run_dir=run_dir / "train", num_workers=train_workers(cfg, trial.model),
                            seed=trial.seed, rungs=rungs(cfg, trial), on_rung=on_rung, on_trained=on_trained)


def _steering(trial: Trial, result: dict) -> dict | None:
    if trial.method != "steering":
        return None
    return {"experts": result["steering"]["experts"], "strength": float(trial.strength)}


def validate_trial(cfg: RunConfig, trial: Trial, result: dict, steering: dict | None, run_dir: Path,
                   loaded: tuple | None = None) -> dict:
    """The trained (or steered) model on the validation split; ``evaluate.evaluate_cell``'s result. ``loaded``:
    the trained model and tokenizer, still in this process (``evaluate_cell``)."""
    m, t = _cell_objects(cfg, trial)
    return evaluate.evaluate_cell(cfg, m, t, [trial.language], adapter=result["adapter"], steering=steering,
                                  split="validation", out_dir=run_dir / "validation", num_actors=eval_actors(cfg, trial.model),
                                  batch_size=cfg.training.eval_batch_size, loaded=loaded)


def _record(trial: Trial, cell: dict, result: dict, steering: dict | None, ev: dict, times: dict) -> dict:
    """trial.json: everything the sweep's driver logs for this trial (tracking.log_child)."""
    return {
        "spec": dataclasses.asdict(trial), "cell": cell, "started": times["start"],
        "train": {k: result.get(k) for k in TRAIN_KEYS},
        "steering": steering,
        "eval": {k: ev[k] for k in ("n", "accuracy", "divergence", "moe_layers", "path")},
        "timing": {"total": None, "train_cell": times["train"] - times["start"], "in_loop": times["in_loop"],
                   "eval": times["eval"] - times["train"], "prepare": result.get("seconds_prepare"),
                   "fit": result.get("seconds")},
        "phases": result.get("phases_rank0") or {},  # where the fixed cost goes (bench/sweep.py)
        "rules": result.get("rules") or {},
        "env": tracking.environment(),  # where it ran, on what (the child's ramoe.host and ramoe.libs tags)
    }


def _tune_metrics(record: dict, result: dict, record_path: Path) -> dict:
    """The flat metrics the trial reports to Tune (the driver's callback reads trial.json for the rest)."""
    lang, ev, timing = record["spec"]["language"], record["eval"], record["timing"]
    metrics = {
        "val_acc": ev["accuracy"][lang], "val_acc_en": ev["accuracy"]["en"],
        "ci_proportion": record["cell"]["ci_proportion"], "n_ci": result.get("n_ci", 0), "steps": result.get("steps", 0),
        "stage12_recomputed": sum(not h for h in (result.get("stage_cache") or {}).values()),
        "base_passes_recomputed": int(result.get("base_passes_recomputed") or 0),
        "seconds_total": timing["total"], "seconds_in_loop": timing["in_loop"], "seconds_eval": timing["eval"],
        "trial_json": str(record_path),
    }
    final = result.get("final") or {}
    metrics.update({k: float(final[k]) for k in FINAL_METRICS if final.get(k) is not None})
    return metrics


def run_trial(config: dict, cfg_json: dict, cells: dict) -> None:
    """The Tune function (module docstring). ``config``: {"trials": one grid.Trial as a dict, or every
    steering setting of a cell (evaluated in one model load), "root": trial folders}. What every trial shares
    comes through ``tune.with_parameters`` (Ray's object store, once, not in every trial's config and Tune's
    experiment state): ``cfg_json``, the RunConfig as JSON, and ``cells``, cell id -> the cell's facts (stages
    1-2). Reports the first trial's metrics and every trial.json ("trial_jsons": one path per line; a string,
    as Tune's loggers take no lists)."""
    from ray import tune

    cfg = config_from_dict(cfg_json, "sweep trial config")
    trials = [Trial(**d) for d in config["trials"]]
    _use_trial_cpus(cfg, trials[0].model)
    if trials[0].method == "steering":
        done = _steering_trials(cfg, trials, Path(config["root"]), cells)
    else:
        done = [_one_trial(cfg, trials[0], Path(config["root"]) / trials[0].dir, cells, tune.report)]
    record, result, path = done[0]
    tune.report({**_tune_metrics(record, result, path), asha.TIME_ATTR: 100.0,
                 "trial_jsons": "\n".join(str(p) for _, _, p in done)})


def _one_trial(cfg: RunConfig, trial: Trial, run_dir: Path, cells: dict, on_rung=None) -> tuple[dict, dict, Path]:
    """Train, validate, write trial.json; returns (record, train result, trial.json)."""
    times = {"start": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    validated = {}

    def validate_trained(model, tok, adapter) -> None:  # a training in this process: its model, not a second load
        t0 = time.time()
        validated["ev"] = validate_trial(cfg, trial, {"adapter": str(adapter)}, None, run_dir, loaded=(model, tok))
        validated["seconds"] = time.time() - t0

    result = train_trial(cfg, trial, run_dir, on_rung, validate_trained if eval_actors(cfg, trial.model) == 0 else None)
    times["train"] = time.time() - validated.get("seconds", 0.0)
    steering = _steering(trial, result)
    # a training reused from its folder (or in a worker group) is validated from its saved adapter
    ev = validated["ev"] if "ev" in validated else validate_trial(cfg, trial, result, steering, run_dir)
    times["eval"] = time.time()
    times["in_loop"] = float(sum(result.get("step_seconds_rank0") or []))
    record = _record(trial, cells[trial.cell], result, steering, ev, times)
    return record, result, _written(record, run_dir, time.time() - times["start"])


def _written(record: dict, run_dir: Path, total: float) -> Path:
    record["timing"]["total"] = total  # the trial's whole time
    write_json_atomic(run_dir / TRIAL_JSON, record)
    return run_dir / TRIAL_JSON


def _steering_trials(cfg: RunConfig, trials: list[Trial], root: Path, cells: dict) -> list[tuple[dict, dict, Path]]:
    """Every steering setting of one cell: their specs from stage 2 (one plan per band x top-k), then ONE
    evaluation pass over all of them (``evaluate.evaluate_steering``: one model load). Each setting gets
    its own folder and trial.json; the cell's time is shared out equally."""
    t0 = time.time()
    specs, results = {}, []
    for tr in trials:
        if (tr.band_label(), tr.top_k) not in specs:
            specs[(tr.band_label(), tr.top_k)] = train_trial(cfg, tr, root / tr.dir)
        results.append(specs[(tr.band_label(), tr.top_k)])
    steerings = [_steering(tr, r) for tr, r in zip(trials, results)]
    t1 = time.time()
    m, t = _cell_objects(cfg, trials[0])
    loads_before = evaluate.EvalPredictor.loads
    evs = evaluate.evaluate_steering(cfg, m, t, [trials[0].language], steerings,
                                     [root / tr.dir / "validation" for tr in trials], split="validation",
                                     num_actors=eval_actors(cfg, m.name), batch_size=cfg.training.eval_batch_size)
    n, t2 = len(trials), time.time()
    # models loaded for the cell's settings: in this process, or one per Ray Data actor
    loads = evaluate.EvalPredictor.loads - loads_before if eval_actors(cfg, m.name) == 0 else eval_actors(cfg, m.name)
    records = []
    for tr, result, steering, ev in zip(trials, results, steerings, evs):
        times = {"start": t0, "train": t0 + (t1 - t0) / n, "eval": t0 + (t1 - t0) / n + (t2 - t1) / n, "in_loop": 0.0}
        record = _record(tr, cells[tr.cell], result, steering, ev, times)
        record["shared_eval"] = {"settings": n, "model_loads": loads}  # this cell's steering, in one pass
        records.append(record)
    share = (time.time() - t0) / n  # each setting's share of the cell's time
    return [(record, result, _written(record, root / tr.dir, share)) for tr, result, record in zip(trials, results, records)]


# ---------------------------------------------------------------------------------------------- figure


def _training_panel(ax, record: dict) -> None:
    hist = record["train"].get("history") or []
    if hist:
        steps = [h["step"] for h in hist]
        for name in ("loss", "ce", "align"):
            ys = [h.get(name) for h in hist]
            if any(y is not None for y in ys):
                ax.plot(steps, [math.nan if y is None else y for y in ys], label=name)
        ax.set_xlabel("step")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training (steering)", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("training")


def _divergence_panel(ax, record: dict, test_divergence: list[float]) -> None:
    ev = record["eval"]
    lang, method = record["spec"]["language"], record["spec"]["method"]
    ax.plot(ev["moe_layers"], record["cell"]["divergence_base"], "--", label="base (train split)")
    ax.plot(ev["moe_layers"], ev["divergence"][lang], label=f"{method} (validation)")
    ax.plot(ev["moe_layers"], test_divergence, ":", label=f"{method} (test)")
    for l in record["train"].get("band_layers") or []:
        ax.axvspan(l - 0.5, l + 0.5, color="0.9")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(f"divergence {lang} to en")
    ax.legend()


def trial_figure(record: dict, test_divergence: list[float], path: Path) -> None:
    """trial.png of a tested trial: the training curves and the routing divergence by MoE layer (base vs this
    trial on validation and test). A bare matplotlib Figure (no pyplot state) with fixed margins, not
    tight_layout (which draws the figure twice): 0.34 s -> 0.22 s per figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2)
    _training_panel(a, record)
    _divergence_panel(b, record, test_divergence)
    fig.suptitle(record["spec"]["key"], fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.86, wspace=0.22)
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------------------- test split


def evaluate_on_test(cfg_json: dict, folder: str) -> dict:
    """Test-split evaluation of one finished trial (its adapter or steering spec) -> test metrics, its
    per-example predictions, its seconds (this function's wall time); its figure drawn (``trial_figure``, in
    the folder)."""
    t0 = time.time()
    cfg = config_from_dict(cfg_json, "sweep config")
    record = json.loads((Path(folder) / TRIAL_JSON).read_text())
    trial = Trial(**record["spec"])
    _use_trial_cpus(cfg, trial.model)
    m, t = _cell_objects(cfg, trial)
    lang = trial.language
    ev = evaluate.evaluate_cell(cfg, m, t, [lang], adapter=record["train"]["adapter"], steering=record["steering"],
                                split="test", out_dir=Path(folder) / "test", num_actors=eval_actors(cfg, trial.model),
                                batch_size=cfg.training.eval_batch_size)
    vals = {"test_acc": ev["accuracy"][lang], "test_acc_en": ev["accuracy"]["en"], "n_test": ev["n"][lang]}
    vals.update({f"test_div_L{l}": v for l, v in zip(ev["moe_layers"], ev["divergence"][lang])})
    trial_figure(record, ev["divergence"][lang], Path(folder) / TRIAL_FIGURE)
    predictions = test_predictions(Path(ev["path"]).parent / "rows.parquet", lang)
    return {"metrics": vals, "predictions": predictions, "seconds": time.time() - t0}


def test_predictions(rows_parquet: Path, language: str) -> dict:
    """The target language's per-example test results, by id (``PREDICTIONS``): what the report's paired
    statistics are computed from."""
    import pandas as pd

    df = pd.read_parquet(rows_parquet, columns=["id", "language", "prediction", "answer", "correct"])
    df = df[df.language == language].sort_values("id", kind="stable")
    return {"language": language, "ids": [str(i) for i in df.id], "correct": [int(bool(c)) for c in df.correct],
            "predictions": [str(x) for x in df.prediction], "answers": [str(x) for x in df.answer]}
