"""Stage 3: alignment training (DESIGN.md, "The method" 3) and the trained baselines, one cell at a time.

Entry: ``train_cell(cfg, model_cfg, task_cfg, language, method=..., lam=..., band=..., top_k=..., run_dir=...)``.

Driver side (this process): checks every input (``ConfigError`` before anything runs), runs or reuses
stage 1 (taxonomy of the train split: the ci ids) and stage 2 (experts.json: band layers, task experts,
RISE selection), builds the training records and THE schedule (global batches of record indices: a
function of the seed only, identical for every method), and fits a Ray Train V2 ``TorchTrainer``.

Worker side (``train_loop_per_worker``): DeepSpeed ZeRO-3 (model built partitioned through
``HfDeepSpeedConfig``; bf16 on GPU, fp32 on CPU), expert LoRA on every MoE layer (``lora.apply_expert_lora``;
mask = RISE selection for ``rise``, every expert otherwise), the family's MoE block a ZeRO-3 leaf. Per
step: causal-LM loss on the target-language examples of the batch + λ · alignment loss on its ci
examples (``losses.total_loss``: λ = 0 is SFT exactly, nothing of the alignment computed).

Methods: ``ramoe`` (λ as given), ``sft`` (λ forced to 0), ``rise`` (λ = 0, LoRA masked to the RISE
experts), ``steering`` (no training: the result holds the evaluation-time steering spec — band layers'
task experts and the strength — for ``evaluate.evaluate_cell``).

Every choice the design leaves open is named in ``RULES`` (logged with the result).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ramoe_ray.config import ConfigError

METHODS = ("sft", "steering", "rise", "ramoe")

RULES: dict[str, str] = {
    "lm_target": (
        "target-language prompt followed by its answer continuation: ' ' + answer (generative) or the correct "
        "choice's continuation in the task's choices mode (tasks.choice_continuations); continuation ids as "
        "taxonomy.continuation_ids (lm-eval's rule)"
    ),
    "lm_loss_tokens": "cross-entropy on the continuation tokens only (prompt and padding labelled -100), mean per worker",
    "alignment_target": (
        "T = soft_importance of the same example's English prompt under the BASE model (computed once in each worker "
        "before training, no grad): losses.RULES default 'example'"
    ),
    "alignment_tokens": "P̄ over the target prompt's tokens (not the answer continuation)",
    "schedule": (
        "per epoch a torch.randperm of the train records seeded with seed + epoch, cut into global batches of "
        "batch_size x workers; worker r takes rows r::workers; identical for every method"
    ),
    "empty_ci": "λ > 0 but no ci example in the train split: warn and train as SFT (λ = 0), recorded in the result",
    "metrics": (
        "per step: ce, align (λ > 0), loss, routing_kl = alignment KL on the batch's ci examples (nan without one); "
        "averaged over workers; at the end routing_kl_ci(_base) = the KL over every ci train example after (before) training"
    ),
    "checkpoint": "DeepSpeed engine checkpoint (LoRA factors + optimizer + step) + ramoe_meta.json, every checkpoint_every steps",
}

META = "ramoe_meta.json"
RESULT = "train_result.json"
SPEC = "train_spec.json"


# --------------------------------------------------------------------------------------------- driver


def _band_layers(band: Any, shape) -> list[int] | None:
    """Band layers for an explicit band (None for 'auto': decided by stage 2). ConfigError when the band
    lies outside the model."""
    from ramoe_ray.experts import _band_spec_json, resolve_band

    if band == "auto":
        return None
    try:
        start, end = _band_spec_json(band)
    except (TypeError, ValueError):
        raise ConfigError(f"band {band!r}: a band is 'auto' or (start, end) fractions of depth") from None
    if not (0.0 <= start < end <= 1.0):
        raise ConfigError(f"band [{start:g}, {end:g}] lies outside the model: bands are fractions 0 <= start < end <= 1")
    layers = resolve_band(start, end, shape.moe_layers, shape.num_layers)
    if not layers:
        raise ConfigError(f"band [{start:g}, {end:g}] holds no MoE layer of the model ({shape.num_layers} layers, "
                          f"MoE layers {list(shape.moe_layers)}); widen it")
    return layers


def _identity(cfg, model_cfg, model_path: str, shape, *, method: str, lam: float, band: Any, top_k: int) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    from ramoe_ray.experts import band_label

    t = cfg.training
    return {"model": model_cfg.name, "model_path": str(model_path), "family": shape.family,
            "num_layers": shape.num_layers, "num_experts": shape.num_experts, "lora_rank": t.lora_rank,
            "lora_alpha": t.lora_alpha, "seed": t.seed, "method": method, "lam": float(lam), "band": band_label(band),
            "top_k": int(top_k)}


def check_checkpoint(path: str | os.PathLike, identity: dict) -> dict:
    """The meta of a checkpoint folder, or ConfigError when it comes from another model / configuration."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} has no {META}: not a ramoe training checkpoint")
    meta = json.loads(meta_file.read_text())
    theirs = meta.get("identity", {})
    diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
    if diff:
        what = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"checkpoint {str(path)!r} was written by another model/configuration ({what})")
    return meta


def _continuation(ex: dict, task_cfg) -> str:
    from ramoe_ray.tasks import LETTERS, choice_continuations

    if ex["choices"]:
        return choice_continuations(ex, getattr(task_cfg, "choices", "letters"))[LETTERS.index(ex["answer"])]
    return " " + str(ex["answer"])


def schedule(n: int, *, batch_size: int, workers: int, epochs: int, seed: int, max_steps: int | None) -> list[list[int]]:
    """Global batches of record indices (``RULES["schedule"]``); a batch smaller than the worker count
    is dropped (a worker must never get an empty batch)."""
    g = batch_size * workers
    out: list[list[int]] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += [perm[i : i + g] for i in range(0, n, g) if len(perm[i : i + g]) >= workers]
    return out[:max_steps] if max_steps else out


def prepare(cfg, model_cfg, task_cfg, language: str, *, method: str, lam: float | None = None, band: Any = None,
            top_k: int | None = None, resume_from: str | os.PathLike | None = None, num_workers: int | None = None,
            batch_size: int | None = None) -> dict:
    """Checks the inputs, runs/reuses stages 1-2 and returns the plan of one training (the worker config
    without the run-specific paths). All ConfigErrors are raised before any model runs."""
    from ramoe_ray import experts as X
    from ramoe_ray import models as M
    from ramoe_ray import taxonomy
    from ramoe_ray.tasks import build_prompt, load_parallel, split_ids

    if method not in METHODS:
        raise ConfigError(f"method {method!r}; allowed: {', '.join(METHODS)}")
    lam = (cfg.knobs.lambdas[0] if lam is None else float(lam)) if method == "ramoe" else 0.0
    if lam < 0 or not math.isfinite(lam):
        raise ConfigError(f"lambda = {lam}: the alignment weight must be a finite number >= 0")
    band = cfg.knobs.bands[0] if band is None else band
    top_k = cfg.knobs.top_k[0] if top_k is None else int(top_k)
    try:
        shape = M.moe_shape(model_cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"model {model_cfg.name!r}: {e}") from None
    if not 1 <= top_k <= shape.num_experts:
        raise ConfigError(f"top_k = {top_k}: allowed 1..{shape.num_experts} (experts of model {model_cfg.name!r})")
    _band_layers(band, shape)
    workers = cfg.resources.num_workers if num_workers is None else int(num_workers)
    p = taxonomy.plan(cfg, model_cfg, task_cfg, [language], "train")  # checks data, model, tokenizer
    ident = _identity(cfg, model_cfg, p.model_path, shape, method=method, lam=lam, band=band, top_k=top_k)
    if resume_from is not None:
        check_checkpoint(resume_from, ident)

    experts_json, experts_hit = X.run_experts(cfg, model_cfg, task_cfg, language, band, top_k)
    art = json.loads(Path(experts_json).read_text())
    band_layers = [int(l) for l in art["band"]["layers"]]
    task_experts = {int(l): [int(e) for e in v["experts"]] for l, v in art["task_experts"].items()}
    rise = {int(l): v for l, v in art["rise"]["experts"][language].items()}
    steering = {"experts": {l: task_experts[l] for l in band_layers}, "strength": float(cfg.steering.strengths[0])}

    cell, taxonomy_hit = taxonomy.run_taxonomy(cfg, model_cfg, task_cfg, language, "train")
    import pandas as pd

    tax = pd.read_parquet(cell, columns=["id", "language", "category"])
    category = dict(zip(tax[tax.language == language].id, tax[tax.language == language].category))
    data = load_parallel(task_cfg, [language], cache_dir=cfg.cache_dir)
    train_ids = set(split_ids([ex["id"] for ex in data["en"]], seed=cfg.training.seed)["train"])
    records = []
    for en, tg in zip(data["en"], data[language]):
        if en["id"] in train_ids:
            records.append({"id": tg["id"], "prompt": build_prompt(tg, task_cfg.format),
                            "continuation": _continuation(tg, task_cfg), "prompt_en": build_prompt(en, task_cfg.format),
                            "ci": category.get(tg["id"]) == "ci"})
    records.sort(key=lambda r: r["id"])
    n_ci = sum(r["ci"] for r in records)
    notes = []
    lam_used = lam
    if lam > 0 and n_ci == 0:
        msg = (f"{model_cfg.name}/{task_cfg.name}/{language}: no ci example in the train split; "
               f"λ = {lam} has nothing to align, training as SFT (λ = 0)")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        lam_used = 0.0
    t = cfg.training
    bs = batch_size or t.batch_size
    sched = schedule(len(records), batch_size=bs, workers=max(1, workers), epochs=t.epochs, seed=t.seed,
                     max_steps=t.max_steps)
    if not sched:
        raise ConfigError(f"no training step: {len(records)} train examples for {max(1, workers)} workers")
    return {
        "identity": ident, "method": method, "lam": lam, "lam_used": lam_used, "language": language,
        "model_path": p.model_path, "model_cfg": model_cfg.model_dump(), "experts_json": str(experts_json),
        "band_layers": band_layers, "task_experts": {str(l): task_experts[l] for l in band_layers},
        "experts_mask": {str(l): v for l, v in rise.items()} if method == "rise" else None,
        "steering": {"experts": {str(l): v for l, v in steering["experts"].items()}, "strength": steering["strength"]},
        "records": records, "n_ci": n_ci, "schedule": sched, "workers": workers,
        "training": t.model_dump(), "batch_size": bs, "notes": notes, "rules": dict(RULES),
        "stage_cache": {"experts": bool(experts_hit), "taxonomy": bool(taxonomy_hit)},  # the sweep counts recomputations
    }


def _run_name(cfg, model_cfg, task_cfg, language, plan) -> str:
    i = plan["identity"]
    return f"{model_cfg.name}-{task_cfg.name}-{language}-{plan['method']}-lam{i['lam']:g}-band{i['band']}-top{i['top_k']}"


def _env() -> dict:
    """Environment the driver hands to Ray's processes: the driver's own HF_HUB_OFFLINE (only if set:
    cluster workers must be able to download), and a persistent TORCH_EXTENSIONS_DIR (DeepSpeed's CPU
    comm op is compiled once, ~1 min). DS_ACCELERATOR is NOT decided here: a CPU-only head would force
    it on GPU workers; each process decides for itself (``_accelerator_env``)."""
    repo_cache = Path(__file__).resolve().parents[1] / ".ramoe_cache" / "torch_extensions"
    env = {"TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(repo_cache))}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


def _accelerator_env() -> None:
    """In this process, before deepspeed is imported: DeepSpeed's CPU accelerator where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def train_cell(cfg, model_cfg, task_cfg, language: str, *, method: str, lam: float | None = None, band: Any = None,
               top_k: int | None = None, run_dir: str | os.PathLike | None = None,
               resume_from: str | os.PathLike | None = None, num_workers: int | None = None,
               batch_size: int | None = None, probe: list[str] | None = None, _fail_at_step: int | None = None) -> dict:
    """Trains one cell with one method; returns {"adapter", "final", "history", ...} (module docstring).

    num_workers: Ray Train workers (default ``cfg.resources.num_workers``); 0 = Ray Train's local mode
      (the loop runs in this process, world size 1: debugging and small runs).
    resume_from: a checkpoint folder (checked to come from the same model and configuration).
    probe: prompts whose logits (trained model) rank 0 saves as ``probe_logits.pt`` in the run folder.
    _fail_at_step: fault injection for tests: the first attempt raises at that step.
    Steering trains nothing: the result's "steering" is the spec for ``evaluate.evaluate_cell``.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ramoe_ray.cache import write_json_atomic

    t_called = time.time()
    plan = prepare(cfg, model_cfg, task_cfg, language, method=method, lam=lam, band=band, top_k=top_k,
                   resume_from=resume_from, num_workers=num_workers, batch_size=batch_size)
    t_prepared = time.time()
    name = _run_name(cfg, model_cfg, task_cfg, language, plan)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.run_dir) / "train" / name
    run_dir = run_dir.resolve()
    spec_file = run_dir / SPEC
    if spec_file.is_file():
        old = json.loads(spec_file.read_text()).get("identity")
        if old != plan["identity"]:
            raise ConfigError(f"run folder {run_dir} holds a training of another model/configuration "
                              f"({old} vs {plan['identity']}); use another run_dir")
    base = {"method": method, "lam": plan["lam"], "lam_used": plan["lam_used"], "band_layers": plan["band_layers"],
            "task_experts": plan["task_experts"], "experts_mask": plan["experts_mask"], "n_ci": plan["n_ci"],
            "n_train": len(plan["records"]), "steps": len(plan["schedule"]), "notes": plan["notes"],
            "experts_json": plan["experts_json"], "identity": plan["identity"], "rules": plan["rules"],
            "run_dir": str(run_dir), "stage_cache": plan["stage_cache"]}
    if method == "steering":
        return {**base, "adapter": None, "steering": plan["steering"], "final": {}, "history": []}
    result_file = run_dir / RESULT
    if result_file.is_file():  # the same training finished before: reuse it
        return {**base, **json.loads(result_file.read_text()), "cached": True}
    write_json_atomic(spec_file, {"identity": plan["identity"]})

    workers = plan["workers"]
    config = {**plan, "run_dir": str(run_dir), "probe": probe, "fail_at_step": _fail_at_step}
    if not ray.is_initialized() and workers > 0:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 runtime_env={"env_vars": _env()}, log_to_driver=False)
    res = cfg.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.training.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        resume_from_checkpoint=ray.train.Checkpoint.from_directory(str(resume_from)) if resume_from else None,
    )
    t0 = time.time()
    if workers == 0:
        for k, v in _env().items():
            os.environ.setdefault(k, v)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = json.loads(result_file.read_text())
    out["seconds"] = time.time() - t0
    out["seconds_prepare"] = t_prepared - t_called
    write_json_atomic(result_file, out)
    return {**base, **out, "checkpoint": result.checkpoint.path if result.checkpoint else None}


# --------------------------------------------------------------------------------------------- worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_deepspeed_groups() -> None:
    import deepspeed.comm.comm as dcomm
    import deepspeed.utils.groups as groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, {})
    dcomm.cdb = None


def _ds_config(plan: dict, on_gpu: bool) -> dict:
    from ramoe_ray.lora import DS_ZERO3_CONFIG

    cfg = json.loads(DS_ZERO3_CONFIG.read_text())
    cfg["train_micro_batch_size_per_gpu"] = plan["batch_size"]
    cfg["gradient_accumulation_steps"] = 1
    cfg["optimizer"]["params"]["lr"] = plan["training"]["lr"]
    cfg["bf16"] = {"enabled": bool(on_gpu)}
    return cfg


def encode(tok, records: list[dict], device) -> dict:
    """Right-padded target prompt + continuation: input_ids, attention_mask, labels (-100 on prompt and
    padding), prompt_mask (True on the prompt's tokens)."""
    from ramoe_ray.taxonomy import continuation_ids

    seqs, n_prompt = [], []
    for r in records:
        p_ids = tok(r["prompt"])["input_ids"]
        c_ids = continuation_ids(tok, p_ids, r["prompt"], r["continuation"])
        seqs.append((p_ids, c_ids))
        n_prompt.append(len(p_ids))
    width = max(len(p) + len(c) for p, c in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    pmask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
        pmask[i, : len(p)] = True
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "prompt_mask": pmask.to(device)}


def _prompts(tok, prompts: list[str], device):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def _routed_batches(engine, tok, records: list[dict], field: str, batch_size: int, device):
    """(records, Routing, mask) per batch of the prompts in ``field``, one captured forward each."""
    from ramoe_ray import models as M

    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        ids, mask = _prompts(tok, [r[field] for r in chunk], device)
        with M.capture(engine.module) as rec:
            engine(input_ids=ids, attention_mask=mask)
        yield chunk, rec.routing(mask), mask


@torch.no_grad()
def english_targets(engine, tok, records: list[dict], batch_size: int, device) -> dict[str, torch.Tensor]:
    """id -> (L, E) soft_importance of the English prompt (``RULES["alignment_target"]``). A collective
    under ZeRO-3: every rank must call it with the same records."""
    from ramoe_ray.losses import soft_importance

    out = {}
    for chunk, routing, mask in _routed_batches(engine, tok, records, "prompt_en", batch_size, device):
        imp = soft_importance(routing.logits, mask)
        for r, row in zip(chunk, imp):
            out[r["id"]] = row.float().cpu()
    return out


@torch.no_grad()
def ci_routing_kl(engine, tok, records: list[dict], targets, band_layers, task_experts, batch_size, device) -> float:
    """The alignment KL over the target prompts of ``records`` (collective under ZeRO-3)."""
    from ramoe_ray.losses import routing_kl

    total, n = 0.0, 0
    for chunk, routing, mask in _routed_batches(engine, tok, records, "prompt", batch_size, device):
        kl = routing_kl(router_logits=routing.logits, mask=mask, ci=torch.ones(len(chunk), dtype=torch.bool),
                        layers=routing.layers, band_layers=band_layers, task_experts=task_experts,
                        target_pattern=torch.stack([targets[r["id"]] for r in chunk]))
        total += kl * len(chunk)
        n += len(chunk)
    return total / n if n else math.nan


def batch_loss(model, batch: dict, ci: torch.Tensor, targets: list, *, lam: float, band_layers, task_experts,
               metrics: bool = False) -> tuple[torch.Tensor, dict]:
    """THE training loss of one batch: LM loss (+ λ · alignment on its ci rows). ``targets``: per row the
    English (L, E) target or None (non-ci rows). Router logits are captured (with graph) only when λ > 0,
    and (detached) when ``metrics`` asks for the routing KL; λ = 0 returns the LM loss itself.
    Returns (loss, {"ce", "align" (λ > 0), "routing_kl" (metrics; nan without a ci row)})."""
    from ramoe_ray import models as M
    from ramoe_ray.losses import alignment_loss, routing_kl, total_loss

    need_capture = lam > 0 or metrics
    module = getattr(model, "module", model)  # a DeepSpeed engine forwards; hooks go on its module
    with M.capture(module, detach=lam == 0) if need_capture else contextlib.nullcontext() as rec:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    parts: dict = {"ce": float(out.loss.detach()), "routing_kl": math.nan}
    target = None
    if need_capture and bool(ci.any()):
        routing = rec.routing(batch["attention_mask"])
        n_layers, n_exp = routing.logits.shape[0], routing.logits.shape[-1]
        filler = torch.full((n_layers, n_exp), 1.0 / n_exp)  # never read: non-ci rows are skipped
        target = torch.stack([t if t is not None else filler for t in targets]).to(routing.logits.device)
        akw = dict(router_logits=routing.logits, mask=batch["prompt_mask"], ci=ci, layers=routing.layers,
                   band_layers=band_layers, task_experts=task_experts, target_pattern=target)

    def align():
        if target is None:
            parts["align"] = 0.0
            return torch.zeros((), device=out.loss.device)
        a = alignment_loss(**akw)
        parts["align"] = float(a.detach())
        return a

    loss = total_loss(lm_loss=out.loss, lam=lam, alignment=align)
    if metrics and target is not None:
        parts["routing_kl"] = routing_kl(**akw)
    return loss, parts


@torch.no_grad()
def mean_ce(engine, tok, records: list[dict], batch_size: int, device) -> float:
    """Token-mean continuation cross-entropy over ``records`` (collective under ZeRO-3)."""
    total, n = 0.0, 0
    for i in range(0, len(records), batch_size):
        b = encode(tok, records[i : i + batch_size], device)
        k = int((b["labels"][:, 1:] != -100).sum())
        total += float(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss) * k
        n += k
    return total / n


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker (module docstring); config = ``prepare``'s plan + run_dir, probe, fail_at_step."""
    clock = [time.perf_counter()]
    phases: dict[str, float] = {}

    def phase(name: str) -> None:  # wall seconds since the previous mark (rank 0's go to the result: bench/sweep.py)
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - clock[0]
        clock[0] = now

    for k, v in _env().items():
        os.environ.setdefault(k, v)
    _accelerator_env()
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from ramoe_ray import lora as LA
    from ramoe_ray import models as M
    from ramoe_ray.cache import write_json_atomic

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if not dist.is_initialized():  # Ray Train local mode: a one-process group for DeepSpeed
        _reset_deepspeed_groups()  # a previous local run's groups died with its process group
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    t = config["training"]
    torch.manual_seed(t["seed"])
    run_dir = Path(config["run_dir"])
    phase("imports_and_process_group")
    ds_cfg = _ds_config(config, on_gpu)
    dschf = HfDeepSpeedConfig(ds_cfg)  # noqa: F841  (alive while the model is built: built partitioned)
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.config.output_router_logits = False
    phase("model_load")
    tok = AutoTokenizer.from_pretrained(config["model_path"])
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    mask = config["experts_mask"]
    LA.apply_expert_lora(model, rank=t["lora_rank"], alpha=t["lora_alpha"], seed=t["seed"],
                         experts_mask={int(k): v for k, v in mask.items()} if mask is not None else None)
    deepspeed.utils.set_z3_leaf_modules(model, [type(next(iter(M.moe_blocks(model).values())))])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=LA.lora_parameters(model), config=ds_cfg)
    phase("lora_and_deepspeed_initialize")

    records = config["records"]
    band_layers = config["band_layers"]
    task_experts = {int(k): v for k, v in config["task_experts"].items()}
    lam = float(config["lam_used"])
    bs = config["batch_size"]
    ebs = int(t.get("eval_batch_size", bs))  # no-grad passes: ZeRO-3's per-forward cost is fixed, so few large batches
    ci_records = [r for r in records if r["ci"]]
    engine.eval()
    # English targets and the ci KL from the BASE model (B = 0: the adapted model is the base model)
    targets = english_targets(engine, tok, ci_records, ebs, device)
    kl_base = ci_routing_kl(engine, tok, ci_records, targets, band_layers, task_experts, ebs, device)
    ce_base = mean_ce(engine, tok, records, ebs, device)
    phase("base_passes")

    start, history, restarts = 0, [], 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = check_checkpoint(d, config["identity"])
            engine.load_checkpoint(d, tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
            start, history, restarts = meta["step"], meta["history"], meta.get("restarts", 0) + 1

    sched = config["schedule"]
    every, ck_every = t["log_every"], t["checkpoint_every"]
    marker = run_dir / ".fault_injected"
    step_times: list[float] = []
    phase("checkpoint_load")
    for step in range(start, len(sched)):
        if config.get("fail_at_step") == step and not marker.exists():
            if rank == 0:
                marker.write_text(str(step))
            raise RuntimeError(f"injected fault at step {step} (test)")
        t0 = time.perf_counter()
        rows = [records[i] for i in sched[step][rank::world]]
        batch = encode(tok, rows, device)
        ci = torch.tensor([r["ci"] for r in rows], dtype=torch.bool, device=device)
        report = (step + 1) % every == 0 or step == len(sched) - 1
        engine.train()
        loss, parts = batch_loss(engine, batch, ci, [targets.get(r["id"]) for r in rows], lam=lam,
                                 band_layers=band_layers, task_experts=task_experts, metrics=report)
        engine.backward(loss)
        engine.step()
        seconds = time.perf_counter() - t0
        step_times.append(seconds)
        if report:
            kl = parts["routing_kl"]
            vals = torch.tensor([float(loss.detach()), parts["ce"], parts.get("align", 0.0),
                                 0.0 if math.isnan(kl) else kl * int(ci.sum()), float(ci.sum()), seconds], dtype=torch.float64)
            dist.all_reduce(vals)
            n_ci = float(vals[4])
            m = {"step": step + 1, "loss": float(vals[0]) / world, "ce": float(vals[1]) / world,
                 "align": float(vals[2]) / world if lam > 0 else math.nan,
                 "routing_kl": float(vals[3]) / n_ci if n_ci else math.nan, "n_ci": int(n_ci),
                 "step_seconds": float(vals[5]) / world, "restarts": restarts}
            history.append(m)
        else:
            m = None
        last = step == len(sched) - 1
        phase("loop")
        if (step + 1) % ck_every == 0 or last:
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="state")
                phase("checkpoint_save")
                if rank == 0:
                    write_json_atomic(Path(d) / META, {"identity": config["identity"], "step": step + 1,
                                                       "history": _jsonable(history), "restarts": restarts})
                ray.train.report(_jsonable(m or {"step": step + 1}), checkpoint=ray.train.Checkpoint.from_directory(d))
        elif m is not None:
            ray.train.report(_jsonable(m))
        phase("checkpoint_and_report")

    engine.eval()
    kl_final = ci_routing_kl(engine, tok, ci_records, targets, band_layers, task_experts, ebs, device)
    ce_final = mean_ce(engine, tok, records, ebs, device)
    phase("final_passes")
    if config.get("probe"):
        ids, pmask = _prompts(tok, config["probe"], device)
        with torch.no_grad():
            logits = engine(input_ids=ids, attention_mask=pmask).logits.float().cpu()
        if rank == 0:
            torch.save(logits, run_dir / "probe_logits.pt")
    adapter = run_dir / "adapter"
    if adapter.exists() and rank == 0:  # a finished attempt's adapter (only when the result file was lost)
        import shutil

        shutil.rmtree(adapter)
    if world > 1:
        dist.barrier()
    LA.save_adapter(engine.module, adapter, config["model_path"])
    phase("save_adapter")
    if rank == 0:
        final = dict(history[-1]) if history else {}
        final.update(routing_kl_ci=kl_final, routing_kl_ci_base=kl_base, ce_train=ce_final, ce_train_base=ce_base)
        write_json_atomic(run_dir / RESULT, _jsonable({"adapter": str(adapter), "final": final, "history": history,
                                                       "restarts": restarts, "world_size": world,
                                                       "step_seconds_rank0": step_times, "phases_rank0": phases}))
    if world > 1:
        dist.barrier()


def _jsonable(obj):
    """NaN -> None (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj
