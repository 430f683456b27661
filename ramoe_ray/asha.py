"""Early stopping of RA-MoE's knob settings within a cell (``sweep.scheduler: asha``; docs/architecture.md,
"The sweep").

Tune's ``AsyncHyperBandScheduler`` (ASHA), one instance per cell: the RA-MoE trials of a cell (its λ × band ×
top-k settings) compete with each other only, never with another cell's, language's or method's trials.
SFT, RISE, steering and the seed replicates are never stopped (they run to the end, FIFO).

Time is the share of a trial's own schedule it has trained, in percent (``percent_trained``), so cells with
different step counts share one rule. The rungs are ASHA's milestones, grace · rf^k percent below 100
(``milestones``); a training evaluates its validation accuracy (``val_acc``, the selection metric) at each
rung and reports it to Tune (``train.train_cell(rungs=...)``); at a rung, ASHA stops a trial whose
accuracy is below the (1 - 1/rf) quantile of the cell's trials that reached that rung before it.
"""

from __future__ import annotations

import math

METRIC, TIME_ATTR = "val_acc", "percent_trained"


def milestones(grace: float, reduction_factor: float) -> list[float]:
    """The rungs in percent trained, below 100, in ascending order: exactly ASHA's milestones for
    min_t = 100·grace, max_t = 100 (``ray.tune.schedulers.async_hyperband._Bracket``, bracket 0)."""
    min_t = 100.0 * grace
    n = int(math.log(100.0 / min_t) / math.log(reduction_factor) + 1)
    return sorted(m for m in (min_t * reduction_factor ** k for k in range(n)) if m < 100.0)


def rung_steps(total_steps: int, rungs: list[float]) -> dict[int, float]:
    """Optimizer step (1-based, after it) -> the rung it completes: ceil(total · percent / 100), at least 1;
    a rung that would fall on the last step is left to the trial's own final validation."""
    out: dict[int, float] = {}
    for pct in rungs:
        step = max(1, math.ceil(total_steps * pct / 100.0))
        if step < total_steps:
            out.setdefault(step, pct)
    return out


# The share of a cell's RA-MoE trials ASHA lets on past a rung, for the cost model (dryrun.py): measured on
# sweeps/synthetic-grid.yaml, 2026-11-30 (1,458 RA-MoE trials in 54 cells of 27 settings, 2 trials at a time:
# 424 stopped, 71 % finished, so sqrt(0.71) per rung). ASHA's asymptotic 1/rf is far lower than what it does
# on a cell this size: its first trials at a rung are never stopped, and an accuracy equal to the cutoff
# (saturated cells: many settings at 100 %) is not below it.
SURVIVAL = 0.84


def expected_share(rungs: list[float], survival: float = SURVIVAL) -> tuple[float, list[float], float]:
    """The cost model's assumption (dryrun.py): a trial goes on past each rung with probability ``survival``.
    Returns (expected share of the steps trained, probability of reaching each rung, of finishing)."""
    reach = [survival ** i for i in range(len(rungs) + 1)]
    bounds = [0.0] + [m / 100.0 for m in rungs] + [1.0]
    share = sum((hi - lo) * p for lo, hi, p in zip(bounds, bounds[1:], reach))
    return share, reach[:-1], reach[-1]


def cell_of(config: dict) -> tuple | None:
    """The ASHA group of a Tune trial's config (``sweep.tune_units``): its cell for an RA-MoE grid trial,
    None (never stopped) for anything else."""
    t = config["trials"][0]
    if t["method"] != "ramoe" or t.get("replicate_of"):
        return None
    return (t["model"], t["task"], t["language"], t.get("seed"))


def scheduler(grace: float, reduction_factor: float):
    """A Tune scheduler: one ASHA per cell (``cell_of``), FIFO for the rest."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    class PerCellASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.cells: dict[tuple, AsyncHyperBandScheduler] = {}

        def _asha(self, trial):
            cell = cell_of(trial.config)
            if cell is None:
                return None
            if cell not in self.cells:
                self.cells[cell] = AsyncHyperBandScheduler(
                    time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=100, grace_period=100.0 * grace,
                    reduction_factor=reduction_factor, stop_last_trials=False)
            return self.cells[cell]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True  # metric and mode are fixed: val_acc, max

        def on_trial_add(self, tune_controller, trial):
            if (a := self._asha(trial)) is not None:
                a.on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            a = self._asha(trial)
            return self.CONTINUE if a is None else a.on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if (a := self._asha(trial)) is not None:
                a.on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            if (a := self._asha(trial)) is not None:
                a.on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return f"per-cell ASHA over {len(self.cells)} cells"

    return PerCellASHA()
