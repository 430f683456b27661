"""The sweep's cost model: wall time and accelerator-hours of a plan, before anything runs (``ramoe sweep
--dry-run``, dryrun.py). Arithmetic only: what the plan holds (``Work``) comes from dryrun.py, the rates
(``Rates``) from a calibration (calibrate.py), an earlier sweep's timings in MLflow (``rates_from_children``)
or the stated assumptions here (``default_rates``).

A plan is a list of **units** per phase. A unit is what one Tune trial runs (a trained trial; or every
steering setting of a cell in one model load, ``sweep.tune_units``), one (model, task)'s stage-1 pass, or one
test evaluation. Its seconds (``seconds``):

    fixed_eval + (fixed_train if it trains) + loads x load + steps x step + passes x forward
        + examples x example / actors

- ``steps``: optimizer steps it trains (``steps_of``: the schedule's length; a scheduler that stops trials
  early lowers it); ``loads``: model loads one after the other (the training's, then the evaluation actors',
  which load side by side: one); ``passes``: no-grad forwards of
  training examples inside the training (the base-model and final passes); ``examples``: evaluated
  examples (prompt forward, and decoding for a generative task), shared by ``actors``.
- Phases run one after another: stage 1 (sequential in the driver), the trials, the replicates, the tests.
  Within a phase the units of a model run in grid order at the model's concurrency (``wall``: each starts on
  the first free slot, as Ray Tune's FIFO does), models one after another (``sweep.resource_groups``).
- Accelerator-hours = sum over units of seconds x the GPUs the unit holds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Rates:
    """Seconds per thing, for one (model, task) (module docstring); ``source`` says where they come from."""

    fixed_train: float  # a trained unit beyond loads, steps, passes and examples: Ray Train / DeepSpeed set-up, saving
    fixed_eval: float  # every unit: Tune's trial, reading stage 2, the evaluation's set-up
    load: float  # one model load
    step: float  # one optimizer step of the global batch
    forward: float  # one no-grad forward of a training example (base-model / final passes)
    example: float  # one evaluated example on one actor
    source: str


@dataclass(frozen=True)
class Work:
    """One unit of a phase (module docstring)."""

    model: str
    task: str
    steps: int = 0
    passes: int = 0
    examples: int = 0
    loads: int = 1
    actors: int = 1
    gpus: float = 0.0  # GPUs it holds while it runs
    fixed: bool = True  # pays the fixed costs (a stage-1 pass pays loads and examples only)
    extra: float = 0.0  # stated seconds on top (stage 2's experts.json files)


def seconds(w: Work, r: Rates) -> float:
    """A unit's seconds (module docstring)."""
    fixed = (r.fixed_eval + (r.fixed_train if w.steps else 0.0)) if w.fixed else 0.0
    return (fixed + w.loads * r.load + w.steps * r.step + w.passes * r.forward
            + w.examples * r.example / max(1, w.actors) + w.extra)


def steps_of(n_train: int, *, batch_size: int, workers: int, epochs: int, max_steps: int | None) -> int:
    """The length of ``train.schedule``: per epoch the global batches of ``batch_size x workers`` records, a
    last batch smaller than the worker count dropped; at most ``max_steps``."""
    g = batch_size * max(1, workers)
    per_epoch = n_train // g + (1 if n_train % g >= max(1, workers) else 0)
    total = per_epoch * epochs
    return min(total, max_steps) if max_steps else total


# ---------------------------------------------------------------------------------------------- schedule


def wall(durations: list[float], slots: int) -> float:
    """Wall seconds of ``durations`` run in order on ``slots`` parallel slots, each on the first free one."""
    ends = [0.0] * max(1, slots)
    for d in durations:
        heapq.heappush(ends, heapq.heappop(ends) + d)
    return max(ends)


@dataclass
class Phase:
    """A phase's units, their seconds, wall time and accelerator-hours (``estimate``)."""

    name: str
    units: list[Work]
    seconds: list[float] = field(default_factory=list)
    wall: float = 0.0
    gpu_hours: float = 0.0


def run_phase(name: str, units: list[Work], rates: dict, concurrency: dict[str, int], *,
              sequential: bool = False) -> Phase:
    """The phase's units with their seconds (``rates``: (model, task) -> Rates); models one after another,
    each at ``concurrency[model]`` (``sequential``: one at a time, as the driver's stage 1)."""
    ph = Phase(name, units, [seconds(u, rates[(u.model, u.task)]) for u in units])
    for model in dict.fromkeys(u.model for u in units):
        mine = [s for u, s in zip(units, ph.seconds) if u.model == model]
        ph.wall += sum(mine) if sequential else wall(mine, concurrency[model])
    ph.gpu_hours = sum(s * u.gpus for u, s in zip(units, ph.seconds)) / 3600
    return ph


@dataclass
class Estimate:
    phases: list[Phase]

    @property
    def wall(self) -> float:
        return sum(p.wall for p in self.phases)

    @property
    def gpu_hours(self) -> float:
        return sum(p.gpu_hours for p in self.phases)

    def lines(self) -> list[str]:
        out = [f"  {p.name:<22} {len(p.units):>6} units  {hours(p.wall):>10} wall  {p.gpu_hours:>10.1f} GPU-h"
               for p in self.phases]
        return out + [f"  {'total':<22} {'':>12}  {hours(self.wall):>10} wall  {self.gpu_hours:>10.1f} GPU-h"]


def hours(s: float) -> str:
    """Seconds as '42 s', '12.5 min' or '3.2 h' (or '1.4 d')."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.1f} d"


# ---------------------------------------------------------------------------------------------- rates


# Stated assumptions: a CPU run of the synthetic world's tiny models (measured once on a 2-core machine,
# sweeps/demo.yaml) and a GPU run of a real model (H100 80 GB figures from NVIDIA's datasheet; the rest named).
CPU_ASSUMED = Rates(fixed_train=0.3, fixed_eval=0.45, load=0.08, step=0.047, forward=0.001, example=0.0017,
                    source="default: the synthetic world on a 2-core CPU (sweeps/demo.yaml, measured 2026-12-01)")
GPU_ASSUMED = {
    "peak_flops": 989e12,  # H100 SXM bf16 dense (NVIDIA datasheet)
    "mfu": 0.05,  # model FLOPs utilisation of HF MoE layers under ZeRO-3, ~1k tokens per GPU per step: assumed
    "hbm_bytes_s": 3.35e12,  # H100 SXM HBM3 bandwidth (datasheet): a decoding step reads the weights once
    "nvlink_bytes_s": 200e9,  # achieved all-gather bandwidth per GPU over NVLink 4 (of 450 GB/s): assumed
    "load_bytes_s": 1e9,  # reading bf16 weights from the shared file system: assumed 1 GB/s
    "tokens_per_example": 300,  # mean prompt + answer tokens of MGSM / Global-MMLU / Belebele: assumed
    "ray_train_start_s": 30.0,  # worker group + process group + deepspeed.initialize: assumed
    "trial_start_s": 10.0,  # Tune trial, stage-2 read, Ray Data actor pool start: assumed
}


# What the phases cost beyond their units' own timings (stated assumptions): a Tune trial's scheduling and
# result handling (bench/sweep.py: "Tune phase / (trial time / concurrency)" on 2 cores), a stage-1 pass's Ray
# Data start and its writes, a test evaluation's Ray task start and the trial's figure (trial.trial_figure, ~0.22 s on CPU).
OVERHEAD = {"cpu": {"tune_trial_s": 0.35, "stage_pass_s": 8.0, "test_task_s": 0.4},
            "gpu": {"tune_trial_s": 1.0, "stage_pass_s": 30.0, "test_task_s": 10.0}}


def default_rates(total: int, active: int, *, workers: int, global_batch: int, eval_batch: int,
                  max_new_tokens: int, generative: bool, gpu: bool) -> Rates:
    """Assumed rates of a model with ``total`` / ``active`` parameters: ``CPU_ASSUMED``, or on a GPU
    from ``GPU_ASSUMED``: a step = 4 x active x tokens FLOPs (LoRA: no weight gradients of frozen weights) over
    the workers at the assumed MFU, plus ZeRO-3's all-gather of the bf16 weights forward and backward; a
    forward = 2 x active x tokens FLOPs; an evaluated example = its forward + (generative) its share of
    ``max_new_tokens`` decoding steps that each read the weights once."""
    if not gpu:
        return CPU_ASSUMED
    a = GPU_ASSUMED
    flops_s = a["peak_flops"] * a["mfu"]
    tokens = a["tokens_per_example"]
    gather = 2 * 2 * total * (workers - 1) / workers / a["nvlink_bytes_s"]
    decode = max_new_tokens * 2 * total / a["hbm_bytes_s"] / eval_batch if generative else 0.0
    return Rates(fixed_train=a["ray_train_start_s"], fixed_eval=a["trial_start_s"],
                 load=2 * total / a["load_bytes_s"],
                 step=4 * active * tokens * global_batch / (workers * flops_s) + gather,
                 forward=2 * active * tokens / (workers * flops_s), example=2 * active * tokens / flops_s + decode,
                 source="default: assumed GPU figures (cost.GPU_ASSUMED)")


def rates_from_children(df, eval_examples: dict[str, int], source: str, tune_trial_s: float = 0.0) -> dict:
    """(model, task) -> Rates from an earlier sweep's finished children (``tracking.children``; metrics
    seconds_total, seconds_in_loop, seconds_eval, param steps); ``eval_examples``: task -> examples one
    validation evaluates; ``tune_trial_s``: a Tune trial's seconds outside its own timing (``OVERHEAD``).
    Model loads, set-ups and the training's passes are not told apart there: they stay in ``fixed_train`` /
    ``fixed_eval`` (load = forward = 0)."""
    out = {}
    if df.empty:  # a sweep stopped before its first trial finished: no timings
        return out
    df = df[df.status == "FINISHED"]
    for (model, task), g in df.groupby(["tags.model", "tags.task"]):
        if task not in eval_examples:
            continue
        steering = g["tags.method"] == "steering"
        steps = g["params.steps"].astype(float).fillna(0.0) if "params.steps" in g else 0.0 * g["metrics.seconds_total"]
        tot, loop, ev = (g[f"metrics.seconds_{k}"].astype(float).fillna(0.0) for k in ("total", "in_loop", "eval"))
        fixed_eval = float((tot - ev)[steering].median()) if steering.any() else 0.0
        fixed_train = float((tot - loop - ev)[~steering].median()) - fixed_eval if (~steering).any() else 0.0
        out[(model, task)] = Rates(
            fixed_train=max(0.0, fixed_train), fixed_eval=max(0.0, fixed_eval) + tune_trial_s, load=0.0,
            step=float(loop[~steering].sum() / max(1.0, steps[~steering].sum())), forward=0.0,
            example=float((ev / eval_examples[task]).median()), source=source)
    return out
