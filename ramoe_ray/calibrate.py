"""``--calibrate``: the cost model's rates (cost.Rates) measured on this hardware, per (model, task).

Entry: ``calibrate(cfg) -> {(model, task): Rates}`` for a resolved config (``sources.build``: unlike the
rest of the dry run, this builds what it needs: the synthetic world, the cell's stages 1-2, which the sweep
then reuses from the cache). Per (model, task), on the config's first target language:

- **training**: ``train.train_cell`` of the config's first trained method with ``training.max_steps`` =
  ``STEPS`` and the model's own workers, in a temporary run folder (removed): the step time (median of the
  steps after the first), the model load (the smaller of training's ``model_load`` phase and the evaluation's
  load: the first read of a model pays a cold file cache), the forward of one training example (the final
  passes over the train split's records), and the rest of the training as its fixed cost (less the imports
  and process group, which a reused Tune trial actor pays once);
- **evaluation**: ``inference.Predictor`` (one actor, here) on ``EXAMPLES`` validation rows (English and
  target): its model load and the seconds per example.

A Ray Train worker group's start-up is not in a measurement made in this process: with workers it is taken
from ``cost.GPU_ASSUMED["ray_train_start_s"]``, and so is the Tune trial's own (``trial_start_s``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from ramoe_ray import cost, inference, taxonomy, train, trial
from ramoe_ray.config import METHODS, RunConfig

STEPS = 8  # optimizer steps timed per (model, task); the first is warm-up
EXAMPLES = 64  # evaluated rows timed per (model, task)
TRIAL_START_CPU = 0.1  # seconds of a Tune trial in-process beyond training and evaluation (trial.json): assumed


def _training(cfg: RunConfig, model_cfg, task_cfg, language: str) -> dict:
    """One short training (module docstring); its result (train_cell's, with phases and step times)."""
    method = next(m for m in METHODS[::-1] if m in cfg.methods and m != "steering")
    # the final pass on: it times the no-grad forward (Rates.forward) the base passes cost in any sweep
    short = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": STEPS, "final_train_pass": True})})
    train.plan_training(short, model_cfg, task_cfg, language, method=method)  # stages 1-2 first: not timed below
    with tempfile.TemporaryDirectory(prefix="ramoe-calibrate-") as tmp:
        return train.train_cell(short, model_cfg, task_cfg, language, method=method, run_dir=Path(tmp) / "run",
                                num_workers=trial.train_workers(cfg, model_cfg.name))


def _evaluation(cfg: RunConfig, model_cfg, task_cfg, language: str) -> tuple[float, float]:
    """(model load, seconds per example) of the predictor on a few validation rows, in this process."""
    import torch

    plan = taxonomy.plan(cfg, model_cfg, task_cfg, [language], "validation")
    rows = taxonomy.rows_frame(plan, ["en", language], False).head(EXAMPLES)
    t0 = time.perf_counter()
    actor = inference.Predictor(**taxonomy.predictor_kwargs(plan), device="cuda" if torch.cuda.is_available() else "cpu")
    t1 = time.perf_counter()
    for i in range(0, len(rows), cfg.training.eval_batch_size):
        actor(rows.iloc[i:i + cfg.training.eval_batch_size])
    return t1 - t0, (time.perf_counter() - t1) / max(1, len(rows))


def cell_rates(cfg: RunConfig, model_cfg, task_cfg, language: str) -> cost.Rates:
    """The rates of one (model, task), measured (module docstring)."""
    res = _training(cfg, model_cfg, task_cfg, language)
    phases, steps = res.get("phases_rank0") or {}, res.get("step_seconds_rank0") or [0.0]
    load_eval, example = _evaluation(cfg, model_cfg, task_cfg, language)
    final_passes = res["n_train"] + res["n_ci"]  # CE over the train split, KL over its ci pairs
    forward = phases.get("final_passes", 0.0) / max(1, final_passes)
    # timed separately, or once per process (imports, process group: a reused Tune trial actor pays them once)
    measured = sum(phases.get(k, 0.0) for k in ("model_load", "loop", "base_passes", "final_passes",
                                                 "imports_and_process_group"))
    workers = trial.train_workers(cfg, model_cfg.name)
    start = cost.GPU_ASSUMED["ray_train_start_s"] if workers else 0.0
    trial_start = cost.GPU_ASSUMED["trial_start_s"] if workers else TRIAL_START_CPU + cost.OVERHEAD["cpu"]["tune_trial_s"]
    return cost.Rates(fixed_train=max(0.0, res["seconds"] - measured) + res.get("seconds_prepare", 0.0) + start,
                      fixed_eval=trial_start, load=min(phases.get("model_load", load_eval), load_eval),
                      step=statistics.median(steps[1:] or steps), forward=forward, example=example,
                      source=f"calibrated here ({STEPS} steps, {EXAMPLES} examples)")


def calibrate(cfg: RunConfig, log=print) -> dict:
    """(model, task) -> measured Rates for every model and task of a resolved config."""
    out = {}
    for m in cfg.models:
        for t in cfg.tasks:
            log(f"  calibrating {m.name}/{t.name} ({STEPS} training steps, {EXAMPLES} evaluated examples) ...")
            out[(m.name, t.name)] = cell_rates(cfg, m, t, cfg.languages[0])
    return out
