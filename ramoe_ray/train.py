"""Stage 3: alignment training (docs/architecture.md, "The method") and the trained baselines, one cell at a time.

Entry: ``train_cell(cfg, model_cfg, task_cfg, language, method=..., lam=..., band=..., top_k=..., run_dir=...)``.

This module is the driver; ``train_worker`` is the recipe each worker runs. The driver:

1. ``plan_training``: checks every input (``ConfigError`` before anything runs), runs or reuses stage 1
   (taxonomy of the train split: the ci ids) and stage 2 (experts.json: band layers, task experts, RISE
   selection), builds the training records and THE schedule (global batches of record indices: a
   function of the seed only, identical for every method) and the key inputs of the cell's base passes
   (``base_inputs``: the workers of the cell's first training compute them, ``base_cache``) -> a ``TrainPlan``;
2. the run folder: its spec (a folder of another configuration is refused), a finished training's
   result reused;
3. the fit: with ``num_workers > 0`` a Ray Train ``TorchTrainer`` (``train_worker.ray_train_loop`` on each
   worker; restarts from the last checkpoint on a worker failure); with ``num_workers == 0`` the recipe
   runs right here (``train_worker.run_training``: a world of one, no Ray Train session, so it runs in a
   plain process and inside a Ray Tune trial alike), its checkpoints kept in the run folder;
4. the result: the worker's result file + the plan's summary.

Methods (``config.METHODS``): ``ramoe`` (λ as given), ``sft`` (λ forced to 0), ``rise`` (λ = 0; the full
weights of the RISE experts train, ``rise.train: full``, or LoRA masked to them, ``rise.train: lora``),
``steering`` (no training: the result holds the evaluation-time steering
spec — band layers' task experts and the strength — for ``evaluate.evaluate_cell``).

Every choice the design leaves open is named in ``RULES`` (logged with the result).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ramoe_ray import asha, experts, inference, models, taxonomy, train_worker
from ramoe_ray.cache import atomic_dir, content_key, write_json_atomic
from ramoe_ray.config import (
    METHODS,
    BandSpec,
    ConfigError,
    band_label,
    differing_keys,
    flatten,
    parse_band,
    resolve_band,
    result_fields,
)
from ramoe_ray.tasks import LETTERS, build_prompt, choice_continuations, load_parallel, split_ids
from ramoe_ray.train_worker import RESULT, TrainPlan, check_checkpoint, ray_env

RULES: dict[str, str] = {
    "lm_target": (
        "target-language prompt followed by its answer continuation: ' ' + answer (generative) or the correct "
        "choice's continuation in the task's choices mode (tasks.choice_continuations); continuation ids as "
        "inference.continuation_ids (lm-eval's rule)"
    ),
    "lm_loss_tokens": "cross-entropy on the continuation tokens only (prompt and padding labelled -100), mean per worker",
    "alignment_target": (
        "T = soft_importance of the same example's English prompt under the BASE model (no grad, batches of "
        "eval_batch_size; computed once per cell by the first training's workers and read by the others from "
        "cache_dir/base_passes, bit for bit: base_cache): losses.RULES default 'example'"
    ),
    "alignment_tokens": "P̄ over the target prompt's tokens (not the answer continuation)",
    "schedule": (
        "per epoch a torch.randperm of the train records seeded with seed + epoch, cut into global batches of "
        "batch_size x workers; worker r takes rows r::workers; identical for every method"
    ),
    "empty_ci": "λ > 0 but no ci example in the train split: warn and train as SFT (λ = 0), recorded in the result",
    "metrics": (
        "per step: ce, align (λ > 0), loss, routing_kl = alignment KL on the batch's ci examples (nan without one); "
        "averaged over workers; at the end routing_kl_ci(_base) = the KL over every ci train example and ce_train(_base) "
        "= the token-mean continuation CE over every train example, after (before) training, both from ONE no-grad "
        "pass over the train split (prompt + continuation, batches of eval_batch_size: the per-step metrics at λ = 0; "
        "the KL on the prompt tokens, whose routing causal attention makes that of the prompt alone); the _base ones "
        "computed once per cell (base_cache); the end-of-training pass only with training.final_train_pass "
        "(off: routing_kl_ci and ce_train are not measured)"
    ),
    "checkpoint": "DeepSpeed engine checkpoint (adapter + optimizer + step) + ramoe_meta.json, every checkpoint_every steps",
    "rise_train": (
        "rise.train = full: the selected experts' full weights (every parameter of the expert: gate, up, down "
        "projections, GPT-OSS biases) train, as RISE's model_freezer, through a zero full-rank delta per expert "
        "(expert_delta; optimizer state ~ K); rise.train = lora: expert LoRA masked to them (RISE-LoRA). Either way "
        "with this module's LM target, schedule, seed, lr, epochs and AdamW (weight decay 0) of every method, not "
        "RISE's trainer (causal LM on whole target texts, lr 2e-5, 3 epochs, effective batch 16, warmup 5 %)"
    ),
}

SPEC = "train_spec.json"  # in the run folder: the identity of the training it holds
CHECKPOINTS = "checkpoints"  # in the run folder of a num_workers=0 training: the newest checkpoints
KEEP_CHECKPOINTS = 2  # as the worker group's CheckpointConfig(num_to_keep=2)


# ------------------------------------------------------------------------------------------- checks


@dataclass
class CheckedKnobs:
    """One training's knobs, checked against the model."""

    lam: float
    band: BandSpec
    top_k: int
    shape: models.MoEShape


def _checked_knobs(cfg, model_cfg, *, method: str, lam: float | None, band: Any, top_k: int | None) -> CheckedKnobs:
    """The method, λ, band and top-k (defaults: the config's first), or ConfigError."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r}; allowed: {', '.join(METHODS)}")
    lam = (cfg.knobs.lambdas[0] if lam is None else float(lam)) if method == "ramoe" else 0.0
    if lam < 0 or not math.isfinite(lam):
        raise ConfigError(f"lambda = {lam}: the alignment weight must be a finite number >= 0")
    try:
        band = parse_band(cfg.knobs.bands[0] if band is None else band)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    top_k = cfg.knobs.top_k[0] if top_k is None else int(top_k)
    try:
        shape = models.moe_shape(model_cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"model {model_cfg.name!r}: {e}") from None
    if not 1 <= top_k <= shape.num_experts:
        raise ConfigError(f"top_k = {top_k}: allowed 1..{shape.num_experts} (experts of model {model_cfg.name!r})")
    resolve_band(band, shape)
    return CheckedKnobs(lam=lam, band=band, top_k=top_k, shape=shape)


def _identity(cfg, model_cfg, task_cfg, language: str, method: str, knobs: CheckedKnobs, *, workers: int,
              batch_size: int) -> dict:
    """Everything in the config that determines one training's result, flat: the model, the task and
    language, the method and its knobs, the training settings (``config.NON_RESULT`` left out), the worker
    count and per-worker batch (together the global batch) and the device kind. ``plan_training`` adds
    ``inputs``, the digest of what stages 1-2 hand the training. A run folder holds one identity; a
    checkpoint resumes only into its own."""
    shape = knobs.shape
    training = {k: v for k, v in result_fields(cfg).items() if k.startswith("training.") and k != "training.seeds"}
    training["split_seed"] = cfg.training.seed  # plan_training adds this training's own "seed"
    out = {"model": model_cfg.name, "model_path": str(model_cfg.path), "family": shape.family,
           "num_layers": shape.num_layers, "num_experts": shape.num_experts,
           **flatten(model_cfg.model_dump(mode="json", exclude={"resources"}), "model."), **flatten(task_cfg.model_dump(mode="json"), "task."),
           "language": language, "method": method, "lam": float(knobs.lam), "band": band_label(knobs.band),
           "top_k": int(knobs.top_k), **training, "training.batch_size": int(batch_size), "workers": int(workers),
           "gpu": cfg.resources_for(model_cfg).gpus_per_worker > 0}
    if method == "rise":
        out.update(flatten(cfg.rise.model_dump(mode="json"), "rise."))
    return out


def _inputs_digest(records: list[dict], stage2: dict) -> str:
    """What stages 1-2 hand one training: its records (prompts, continuations, ci labels) and the selection."""
    return content_key([records, stage2["band_layers"], stage2["task_experts"], stage2["experts_mask"]], 24)


def base_inputs(p: taxonomy.Plan, records: list[dict], stage2: dict, training) -> dict:
    """What a training's base passes depend on, the device aside (``base_cache``): the same for every method,
    λ and seed of a cell and band x top-k."""
    return {"stage": "train/base_passes", "code": train_worker.code_version(), "model": p.inputs["en"]["model"],
            "records": content_key(records, 32), "band_layers": stage2["band_layers"],
            "task_experts": stage2["task_experts"], "eval_batch_size": training.eval_batch_size}


def adapter_kind(cfg, method: str) -> str:
    """What trains (``RULES["rise_train"]``): "full" (the RISE experts' full weights) for ``rise`` with
    ``rise.train: full``, else "lora" (expert LoRA, masked to the RISE experts for ``rise``)."""
    return "full" if method == "rise" and cfg.rise.train == "full" else "lora"


# --------------------------------------------------------------------------------------------- plan


def _continuation(ex: dict, task_cfg) -> str:
    if ex["choices"]:
        return choice_continuations(ex, getattr(task_cfg, "choices", "letters"))[LETTERS.index(ex["answer"])]
    return " " + str(ex["answer"])


def train_records(cfg, task_cfg, language: str, taxonomy_cell: str | os.PathLike) -> list[dict]:
    """The train split's examples, sorted by id: target prompt, its continuation, the English prompt,
    and whether stage 1 found the pair ci (``taxonomy_cell``: that language's taxonomy.parquet)."""
    tax = pd.read_parquet(taxonomy_cell, columns=["id", "language", "category"])
    mine = tax[tax.language == language]
    category = dict(zip(mine.id, mine.category))
    data = load_parallel(task_cfg, [language])
    train_ids = set(split_ids([ex["id"] for ex in data["en"]], seed=cfg.training.seed)["train"])
    records = [{"id": tg["id"], "prompt": build_prompt(tg, task_cfg.format), "continuation": _continuation(tg, task_cfg),
                "prompt_en": build_prompt(en, task_cfg.format), "ci": category.get(tg["id"]) == "ci"}
               for en, tg in zip(data["en"], data[language]) if en["id"] in train_ids]
    return sorted(records, key=lambda r: r["id"])


def schedule(n: int, *, batch_size: int, workers: int, epochs: int, seed: int, max_steps: int | None) -> list[list[int]]:
    """Global batches of record indices (``RULES["schedule"]``); a batch smaller than the worker count
    is dropped (a worker must never get an empty batch)."""
    g = batch_size * workers
    out: list[list[int]] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += [perm[i : i + g] for i in range(0, n, g) if len(perm[i : i + g]) >= workers]
    return out[:max_steps] if max_steps else out


def _stages_1_2(cfg, model_cfg, task_cfg, language: str, knobs: CheckedKnobs):
    """Stages 1-2 of the cell, run or reused, from ONE taxonomy plan (every language of the config: RISE
    compares them all). Returns (the plan, (taxonomy.parquet, hit), (experts.json, hit))."""
    langs = [language] + [l for l in cfg.languages if l != language]
    p = taxonomy.plan(cfg, model_cfg, task_cfg, langs, "train", general=True)  # checks data, model, tokenizer
    cells, general = taxonomy.execute(p)
    paths = {lang: path for lang, (path, _) in cells.items()}
    return p, cells[language], experts.build_experts(p, paths, general[0], language, knobs.band, knobs.top_k)


def _stage2(cfg, language: str, experts_json: Path, hit: bool, method: str) -> dict:
    """The stage-2 artefact read: the band layers, their task experts, the RISE mask (rise only), the
    steering spec; the TrainPlan fields of the same names."""
    art = json.loads(Path(experts_json).read_text())
    band_layers = [int(l) for l in art["band"]["layers"]]
    task_experts = {int(l): [int(e) for e in v["experts"]] for l, v in art["task_experts"].items()}
    rise = {int(l): v for l, v in art["rise"]["experts"][language].items()}
    return {"experts_json": str(experts_json), "experts_hit": bool(hit), "band_layers": band_layers,
            "task_experts": {str(l): task_experts[l] for l in band_layers},
            "experts_mask": {str(l): v for l, v in rise.items()} if method == "rise" else None,
            "steering": {"experts": {str(l): task_experts[l] for l in band_layers},
                         "strength": float(cfg.steering.strengths[0])}}


def _lam_used(lam: float, n_ci: int, where: str) -> tuple[float, list[str]]:
    """λ to train with, and the notes (``RULES["empty_ci"]``)."""
    if lam > 0 and n_ci == 0:
        msg = f"{where}: no ci example in the train split; λ = {lam} has nothing to align, training as SFT (λ = 0)"
        warnings.warn(msg, stacklevel=3)
        return 0.0, [msg]
    return lam, []


def plan_training(cfg, model_cfg, task_cfg, language: str, *, method: str, lam: float | None = None,
                  band: Any = None, top_k: int | None = None, resume_from: str | os.PathLike | None = None,
                  num_workers: int | None = None, batch_size: int | None = None, seed: int | None = None,
                  rungs: list[float] = ()) -> TrainPlan:
    """Checks the inputs, runs/reuses stages 1-2 and returns the plan of one training. All ConfigErrors
    are raised before any model runs. ``seed``: the training's seed (default ``training.seeds[0]``; the
    data split always uses that one). ``rungs``: ASHA's milestones in percent trained (``asha.milestones``):
    the training evaluates its validation accuracy there (``rung_eval``)."""
    knobs = _checked_knobs(cfg, model_cfg, method=method, lam=lam, band=band, top_k=top_k)
    workers = cfg.resources_for(model_cfg).num_workers if num_workers is None else int(num_workers)
    if workers < 0:
        raise ConfigError(f"num_workers = {workers}: allowed 0 (train in this process) or more")
    t = cfg.training
    bs = batch_size or t.batch_size
    seed = t.seed if seed is None else int(seed)
    identity = _identity(cfg, model_cfg, task_cfg, language, method, knobs, workers=workers, batch_size=bs)
    identity["seed"] = seed
    if resume_from is not None:
        check_checkpoint(resume_from, identity)  # the config part now; the inputs when the checkpoint loads
    p, (cell, taxonomy_hit), (experts_json, experts_hit) = _stages_1_2(cfg, model_cfg, task_cfg, language, knobs)
    stage2 = _stage2(cfg, language, experts_json, experts_hit, method)
    records = train_records(cfg, task_cfg, language, cell)
    identity["inputs"] = _inputs_digest(records, stage2)
    n_ci = sum(r["ci"] for r in records)
    lam_used, notes = _lam_used(knobs.lam, n_ci, f"{model_cfg.name}/{task_cfg.name}/{language}")
    sched = schedule(len(records), batch_size=bs, workers=max(1, workers), epochs=t.epochs, seed=seed,
                     max_steps=t.max_steps)
    if not sched:
        raise ConfigError(f"no training step: {len(records)} train examples for {max(1, workers)} workers")
    return TrainPlan(
        identity=identity, method=method, lam=knobs.lam, lam_used=lam_used, language=language,
        model_path=p.model_path, experts_json=stage2["experts_json"], band_layers=stage2["band_layers"],
        task_experts=stage2["task_experts"], experts_mask=stage2["experts_mask"],
        adapter_kind=adapter_kind(cfg, method), steering=stage2["steering"],
        records=records, n_ci=n_ci, schedule=sched, workers=workers, training=t, seed=seed, batch_size=bs, notes=notes,
        rules=dict(RULES), stage_cache={"experts": stage2["experts_hit"], "taxonomy": bool(taxonomy_hit)},
        base_inputs=base_inputs(p, records, stage2, t), base_cache=str(Path(cfg.cache_dir) / "base_passes"),
        rung_eval=_rung_eval(cfg, model_cfg, task_cfg, language, len(sched), rungs))


def _rung_eval(cfg, model_cfg, task_cfg, language: str, total_steps: int, rungs: list[float]) -> dict | None:
    """What a training needs to evaluate itself at ASHA's rungs: the rung steps and the validation rows of
    the target language, as stage 4's evaluator sees them (``train_worker.rung_accuracy``)."""
    steps = asha.rung_steps(total_steps, list(rungs))
    if not steps:
        return None
    vp = taxonomy.plan(cfg, model_cfg, task_cfg, [language], "validation")
    rows = taxonomy.rows_frame(vp, [language], False).to_dict("records")
    kw = taxonomy.predictor_kwargs(vp)
    return {"steps": steps, "rows": rows, "k": kw["k"], "max_new_tokens": kw["max_new_tokens"],
            "batch_size": cfg.training.eval_batch_size or inference.BATCH_SIZE}


# --------------------------------------------------------------------------------------- run folder


def run_name(model_cfg, task_cfg, language: str, plan: TrainPlan) -> str:
    """Readable, and unique per identity: a changed setting trains afresh in a folder of its own."""
    i = plan.identity
    return (f"{model_cfg.name}-{task_cfg.name}-{language}-{plan.method}-lam{i['lam']:g}-band{i['band']}-top{i['top_k']}"
            f"-{content_key(i, 8)}")


def _run_folder(cfg, plan: TrainPlan, name: str, run_dir: str | os.PathLike | None) -> Path:
    """The run folder (default: run_dir/train/<run name>); ConfigError naming the differing settings when
    it holds a training of another identity."""
    folder = (Path(run_dir) if run_dir is not None else Path(cfg.run_dir) / "train" / name).resolve()
    spec_file = folder / SPEC
    if spec_file.is_file():
        old = json.loads(spec_file.read_text()).get("identity") or {}
        if old != plan.identity:
            raise ConfigError(f"run folder {folder} holds a training with other settings "
                              f"({differing_keys(old, plan.identity)}); give another --run-dir, or none (each "
                              "setting then gets a folder of its own)")
    return folder


def _summary(plan: TrainPlan, run_dir: Path) -> dict:
    """The plan's part of the result."""
    return {"method": plan.method, "lam": plan.lam, "lam_used": plan.lam_used, "band_layers": plan.band_layers,
            "task_experts": plan.task_experts, "experts_mask": plan.experts_mask,
            "adapter_kind": plan.adapter_kind, "n_ci": plan.n_ci,
            "n_train": len(plan.records), "steps": len(plan.schedule), "notes": plan.notes,
            "experts_json": plan.experts_json, "identity": plan.identity, "rules": plan.rules,
            "run_dir": str(run_dir), "stage_cache": plan.stage_cache}


class KeptCheckpoints:
    """The report of a training run in this process: the reported metrics in order, and a copy of each
    reported checkpoint under ``folder`` (``checkpoint_<step>``), the newest ``keep`` kept."""

    def __init__(self, folder: Path, keep: int = KEEP_CHECKPOINTS):
        self.folder, self.keep = folder, keep
        self.metrics: list[dict] = []
        self.latest: str | None = None

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.metrics.append(metrics)
        if checkpoint_dir is None:
            return
        dest = self.folder / f"checkpoint_{int(metrics['step']):06d}"
        if dest.exists():  # from an earlier, interrupted run in this folder
            shutil.rmtree(dest)
        atomic_dir(dest, lambda tmp: shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True))
        self.latest = str(dest)
        for old in sorted(self.folder.glob("checkpoint_*"))[: -self.keep]:
            shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------- fit


def _fit_here(plan: TrainPlan, run_dir: Path, probe: list[str] | None,
              resume_from: str | os.PathLike | None, on_rung=None, on_trained=None) -> str | None:
    """num_workers = 0: the worker recipe in this process, world of one; returns the last checkpoint.
    ``on_rung(metrics)`` receives each rung's evaluation (a Tune trial: ``tune.report``); ``on_trained``:
    ``train_worker.run_training``'s."""
    kept = KeptCheckpoints(run_dir / CHECKPOINTS)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        kept(metrics, checkpoint_dir)
        if on_rung is not None and asha.TIME_ATTR in metrics:
            on_rung(metrics)

    context = train_worker.WorkerContext(rank=0, world_size=1,
                                         resume_dir=str(resume_from) if resume_from is not None else None)
    train_worker.run_training(plan, run_dir, probe, context, report, on_trained)
    return kept.latest


def _fit_worker_group(cfg, plan: TrainPlan, name: str, run_dir: Path, probe: list[str] | None,
                      resume_from: str | os.PathLike | None) -> str | None:
    """A Ray Train worker group (the model's resources per worker, ``RunConfig.resources_for``;
    ``training.max_failures`` restarts from the last checkpoint); Ray's run folder is run_dir/ray. Returns the
    last checkpoint."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = cfg.resources_for(plan.identity["model"])
    use_gpu = res.gpus_per_worker > 0
    callbacks = []
    if plan.rung_eval:  # inside a Tune trial (asha): the workers' reports, rungs included, go on to Tune
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker.ray_train_loop,
        train_loop_config={"plan": plan, "run_dir": str(run_dir), "probe": probe},
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.training.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS), callbacks=callbacks),
        resume_from_checkpoint=Checkpoint.from_directory(str(resume_from)) if resume_from is not None else None,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    _drop_unkept_checkpoints(result)
    return result.checkpoint.path if result.checkpoint else None


def _drop_unkept_checkpoints(result) -> list[Path]:
    """Removes the checkpoint folders of the run that Ray Train does not keep: those a driver stopped hard
    had written but not yet registered (its keep-2 never sees them). Returns them."""
    kept = {Path(c.path).resolve() for c, _ in (result.best_checkpoints or [])}
    stale = [d for d in Path(result.path).glob("checkpoint_*") if d.is_dir() and d.resolve() not in kept]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def train_cell(cfg, model_cfg, task_cfg, language: str, *, method: str, lam: float | None = None, band: Any = None,
               top_k: int | None = None, run_dir: str | os.PathLike | None = None,
               resume_from: str | os.PathLike | None = None, num_workers: int | None = None,
               batch_size: int | None = None, probe: list[str] | None = None, seed: int | None = None,
               rungs: list[float] = (), on_rung=None, on_trained=None) -> dict:
    """Trains one cell with one method; returns {"adapter", "final", "history", ...} (module docstring).

    num_workers: Ray Train workers (default: the model's ``resources.num_workers``); 0 = the training runs in this
      process (world size 1, no Ray Train: small runs, debugging, a Ray Tune trial's own process).
    resume_from: a checkpoint folder (checked to come from the same model and configuration).
    probe: prompts whose logits (trained model) rank 0 saves as ``probe_logits.pt`` in the run folder.
    Steering trains nothing: the result's "steering" is the spec for ``evaluate.evaluate_cell``.
    rungs: ASHA's milestones (percent trained; a sweep trial with ``sweep.scheduler: asha``): the validation
      accuracy there goes to ``on_rung(metrics)`` (in this process), or through Ray Train to the Tune trial
      (``TuneReportCallback``, worker group); the result's "rungs" lists them.
    on_trained(model, tok, adapter): with num_workers = 0, called in this process with the trained model (eval
      mode, its adapter saved in the folder ``adapter``) and its tokenizer before they are released: an
      evaluation that needs no second load (``trial.py``'s validation). Not called for a worker group's
      training, nor for one reused from its run folder.
    """
    t_called = time.time()
    plan = plan_training(cfg, model_cfg, task_cfg, language, method=method, lam=lam, band=band, top_k=top_k,
                         resume_from=resume_from, num_workers=num_workers, batch_size=batch_size, seed=seed,
                         rungs=rungs)
    t_planned = time.time()
    name = run_name(model_cfg, task_cfg, language, plan)
    run_dir = _run_folder(cfg, plan, name, run_dir)
    summary = _summary(plan, run_dir)
    if method == "steering":
        return {**summary, "adapter": None, "steering": plan.steering, "final": {}, "history": [],
                "base_passes_recomputed": 0}
    result_file = run_dir / RESULT
    if result_file.is_file():  # the same training (same identity) finished before: reuse it, and say so
        print(f"reusing the finished training in {run_dir} (the same settings and inputs)", flush=True)
        return {**summary, **json.loads(result_file.read_text()), "cached": True, "base_passes_recomputed": 0}
    write_json_atomic(run_dir / SPEC, {"identity": plan.identity})
    if plan.workers > 0:
        inference.ensure_ray(ray_env())  # a worker group: the cluster at RAY_ADDRESS, else a local instance
    t0 = time.time()
    if plan.workers == 0:
        checkpoint = _fit_here(plan, run_dir, probe, resume_from, on_rung, on_trained)
    else:
        checkpoint = _fit_worker_group(cfg, plan, name, run_dir, probe, resume_from)
    out = json.loads(result_file.read_text())
    out["seconds"] = time.time() - t0
    out["seconds_prepare"] = t_planned - t_called
    write_json_atomic(result_file, out)
    return {**summary, **out, "checkpoint": checkpoint}
