"""``--calibrate``: the cost model's rates (cost.Rates) measured on this hardware, per (model, task), by a
short sweep run as the real one runs.

Entry: ``calibrate(cfg, examples, folder=None) -> {(model, task): Rates}``. It runs ``sweep.run_sweep`` on
``calibration_config(cfg, folder)``: the config's models, tasks, resources and sweep settings, on its first
target language and first seed, with at most ``STEPS`` training steps, every trial to the end (``scheduler:
grid``), the config's most frequent trained method at its first ``LAMBDAS`` knob settings per cell, and
steering (if the config has it) at its first strength; its own MLflow database and run folder in ``folder``
(default: a temporary folder, removed). The rates are read from that sweep's children as an earlier sweep's
are (``cost.rates_from_children``).

Why a sweep, not a few steps timed in this process: the trials of a sweep share the machine with each other,
with the sweep's driver (Tune's controller, MLflow logging) and with Ray's own processes, and on a cluster
they pay their worker groups' start-up. On the project's 2-core host one process's training steps with the
machine to itself, at the driver's two torch threads, took 0.071 s, while the grid's trials ran at 0.090 s
(one thread each, two at a time). A calibration sweep times them as the sweep runs them. A shared host's
speed also varies by the hour (the same grid trials: 0.078 s a step one day, 0.053 s another): a
calibration holds for the hour it ran in.

What it builds stays: the synthetic world and the cells' stages 1-2 go to ``cache_dir`` and the real sweep
reuses them. It writes nothing in ``output_dir`` and nothing to the config's MLflow tracking server.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ramoe_ray import cost, grid, sweep, tracking
from ramoe_ray.config import METHODS, RunConfig

STEPS = 40  # optimizer steps per calibration trial, at most: the synthetic configs' whole training
LAMBDAS = 3  # the trained method's trials per cell, at most: a process's first trial pays its imports, a median of 3 leaves it out


def calibrated_method(cfg: RunConfig) -> str | None:
    """The trained method whose trials the calibration times: RA-MoE if the config has it (a sweep's
    trials are mostly RA-MoE's), else the first of RISE, SFT; None for a steering-only config."""
    return next((m for m in METHODS[::-1] if m in cfg.methods and m != "steering"), None)


def calibration_config(cfg: RunConfig, folder: str | Path) -> RunConfig:
    """The calibration sweep's config (module docstring): everything else as ``cfg``."""
    method = calibrated_method(cfg)
    methods = [m for m in cfg.methods if m in (method, "steering")]
    knobs = cfg.knobs.model_copy(update={"lambdas": cfg.knobs.lambdas[:LAMBDAS], "bands": cfg.knobs.bands[:1],
                                         "top_k": cfg.knobs.top_k[:1]})
    steps = min(STEPS, cfg.training.max_steps or STEPS)
    training = cfg.training.model_copy(update={"max_steps": steps, "seeds": cfg.training.seeds[:1]})
    storage = None if cfg.sweep.storage_path is None else str(Path(cfg.sweep.storage_path) / Path(folder).name)
    return cfg.model_copy(update={
        "name": f"{cfg.name}-calibrate", "languages": cfg.languages[:1], "methods": methods, "knobs": knobs,
        "steering": cfg.steering.model_copy(update={"strengths": cfg.steering.strengths[:1]}),
        "training": training, "output_dir": str(folder),
        "tracking": cfg.tracking.model_copy(update={"mlflow_uri": None}),  # sqlite in the calibration's folder
        "sweep": cfg.sweep.model_copy(update={"scheduler": "grid", "storage_path": storage})})


def calibrate(cfg: RunConfig, examples: dict[str, int], log=print, folder: str | Path | None = None) -> dict:
    """(model, task) -> Rates measured by a calibration sweep (module docstring). ``examples``: task -> the
    examples one validation evaluates (English and target); ``folder``: where the sweep runs and stays (a
    test reads it), default a temporary folder removed afterwards."""
    tmp = None if folder is not None else tempfile.mkdtemp(prefix="ramoe-calibrate-")
    short = calibration_config(cfg, folder if folder is not None else tmp)
    try:
        n = len(short.models) * len(short.tasks)
        log(f"  calibrating: a sweep of {len(grid.trials(short))} trials in {n} cells ({short.languages[0]}; "
            f"{', '.join(short.methods)}; {short.training.max_steps} steps per trial) in {short.output_dir} ...")
        summary = sweep.run_sweep(short, log=lambda line: log(f"    {line}"))
        client = tracking.mlflow_client(summary["tracking_uri"])
        kids = tracking.children(client, summary["experiment_id"], summary["parent_run_id"])
        source = (f"calibrated here (a sweep of {len(kids)} trials at this machine's concurrency, "
                  f"{short.training.max_steps} steps each)")
        return cost.rates_from_children(kids, examples, source)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if short.sweep.storage_path is not None:
                shutil.rmtree(short.sweep.storage_path, ignore_errors=True)

