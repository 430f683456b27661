"""Stage 3, one worker: the recipe of one training on one rank (DeepSpeed ZeRO-3 + expert LoRA).

Input: a ``TrainPlan`` (built by ``train.plan_training``: the records, THE schedule, the band, the task
experts, the training knobs), the run folder, a ``WorkerContext`` (rank, world size, the checkpoint to
resume from) and ``report(metrics, checkpoint_dir)``, which receives the metrics of a log step and, every
``checkpoint_every`` steps, a folder holding this rank's part of the checkpoint (valid during the call).
Two callers:

- ``ray_train_loop``, the loop of a Ray Train ``TorchTrainer`` worker group: its context and report wrap
  ``ray.train.get_context`` / ``get_checkpoint`` / ``report``;
- ``train.train_cell`` with ``num_workers=0``: ``run_training`` called directly in that process (a world
  of one, no Ray Train session: a plain process or a Ray Tune trial alike).

``run_training``, step by step:

1. ``setup``: the process group (Ray Train's; else a world of one, created once per process and kept
   for every later training), DeepSpeed's config (ZeRO-3; stage 0 for a CPU training of one rank:
   ``zero_stage``), the model (built partitioned under ZeRO-3, ``HfDeepSpeedConfig``; bf16 on GPU, fp32
   on CPU), the expert adapter (``TrainPlan.adapter_kind``: expert LoRA on every MoE layer, masked to the
   RISE selection for ``rise`` with ``rise.train: lora``; or, for ``rise`` with ``rise.train: full``, a
   full-rank delta on the selected experts, ``expert_delta``), under ZeRO-3 each decoder layer a ZeRO-3
   leaf (``models.decoder_layers``), ``deepspeed.initialize``;
2. ``base_passes``: the English targets, the ci routing KL and the train CE of the BASE model, computed
   by the first training of the cell and read by the others (``base_cache``);
3. ``load_checkpoint`` (when resuming), then ``train_step`` per global batch of the schedule, with
   ``save_checkpoint`` every ``checkpoint_every`` steps and at the end;
4. ``finish``: with ``training.final_train_pass`` the final pass (``split_metrics``: ONE no-grad pass
   over the train split), the probe logits, the adapter (peft format; ``full``: the selected experts'
   trained weights) and the result file;
5. ``teardown``: ``engine.destroy()`` and transformers' ZeRO-3 switch off, so the next training of the
   process starts clean (the process group stays).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ramoe_ray import base_cache, expert_delta, inference, lora, losses, models
from ramoe_ray.base_cache import Baseline
from ramoe_ray.cache import code_digest, write_json_atomic
from ramoe_ray.config import ConfigError, TrainingConfig
from ramoe_ray.inference import continuation_ids
from ramoe_ray.losses import alignment_loss, routing_kl, soft_importance, total_loss

META = "ramoe_meta.json"  # in every checkpoint folder: identity, step, history, restarts
RESULT = "train_result.json"  # in the run folder, written by rank 0 at the end
CHECKPOINT_TAG = "state"  # DeepSpeed's tag (sub-folder) of the engine state in a checkpoint folder

Report = Callable[[dict, "str | None"], None]  # report(metrics, checkpoint_dir or None)


@dataclass
class TrainPlan:
    """The plan of one training (``train.plan_training``): every input a worker needs, checked; nothing
    of the run folder. Layer keys are strings (the plan and the result are JSON-shaped)."""

    identity: dict  # what a checkpoint must share with the run that resumes it (``check_checkpoint``)
    method: str
    lam: float  # λ as asked
    lam_used: float  # λ trained with (0 when the train split holds no ci example)
    language: str
    model_path: str
    experts_json: str  # stage 2's artefact
    band_layers: list[int]
    task_experts: dict[str, list[int]]  # band layer -> its English task experts
    experts_mask: dict[str, list[int]] | None  # rise: layer -> the experts that train; else None (all, LoRA)
    adapter_kind: str  # "lora" (expert LoRA, masked by experts_mask) or "full" (delta on experts_mask's experts)
    steering: dict  # {"experts": {layer: experts}, "strength"}: the steering method's spec
    records: list[dict]  # train examples: id, prompt, continuation, prompt_en, ci
    n_ci: int
    schedule: list[list[int]]  # global batches of record indices (``train.schedule``)
    workers: int  # Ray Train workers; 0 = in the caller's process
    training: TrainingConfig
    seed: int  # this training's seed (LoRA init, torch): one of training.seeds
    batch_size: int  # per worker
    notes: list[str]
    rules: dict[str, str]
    stage_cache: dict[str, bool]  # stages 1-2 reused from the cache (the sweep counts recomputations)
    base_inputs: dict  # what the base passes depend on, the device aside (``base_cache``, ``train.base_inputs``)
    base_cache: str | None  # base_cache's root folder; None: every training computes its base passes
    # ASHA's rungs (asha.py): {"steps": {step: percent}, "rows": validation rows of the target language,
    # "k", "max_new_tokens", "batch_size"}; None: no evaluation during training
    rung_eval: dict | None = None

    def band_experts(self) -> dict[int, list[int]]:
        return {int(l): v for l, v in self.task_experts.items()}

    def ci_records(self) -> list[dict]:
        return [r for r in self.records if r["ci"]]


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    resume_dir: str | None = None  # a checkpoint folder to start from


@dataclass
class Trainee:
    """What ``setup`` builds on one rank."""

    engine: Any  # the DeepSpeed engine (``engine.module``: the model with its expert adapter)
    tok: Any
    device: torch.device
    dtype: torch.dtype  # of the model's weights: bf16 on GPU, fp32 on CPU
    hf_ds_config: Any  # transformers' ZeRO-3 switch: held as long as the engine lives
    zero_stage: int  # DeepSpeed's ZeRO stage (``zero_stage``): 3, or 0 for a CPU training of one rank


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    history: list[dict] = field(default_factory=list)  # the metrics of every log step
    restarts: int = 0
    step_seconds: list[float] = field(default_factory=list)  # this rank's, this attempt's
    rungs: list[dict] = field(default_factory=list)  # ASHA's rung evaluations of this attempt


class Phases:
    """Wall seconds per phase, each since the previous mark (rank 0's go to the result: bench/sweep.py)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


# ------------------------------------------------------------------------------------------ process


def ray_env() -> dict:
    """Environment the driver hands to Ray's processes: the driver's own HF_HUB_OFFLINE (only if set:
    cluster workers must be able to download), and a persistent TORCH_EXTENSIONS_DIR (DeepSpeed's CPU
    comm op is compiled once, ~1 min). DS_ACCELERATOR is NOT decided here: a CPU-only head would force
    it on GPU workers; each process decides for itself (``prepare_process``)."""
    repo_cache = Path(__file__).resolve().parents[1] / ".ramoe_cache" / "torch_extensions"
    env = {"TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(repo_cache))}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


def prepare_process() -> None:
    """In this process, before deepspeed is imported: ``ray_env`` where unset, and DeepSpeed's CPU
    accelerator where there is no GPU."""
    for k, v in ray_env().items():
        os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


COMM_OP_GUARD = ".ramoe_comm_op.flock"  # in TORCH_EXTENSIONS_DIR: held by a process of ours loading the op


def build_comm_op() -> bool:
    """Loads DeepSpeed's CPU shared-memory comm op (``ShareMemCommBuilder``) into this process, compiling it
    into ``ray_env``'s TORCH_EXTENSIONS_DIR if it is not built there (~45 s of a 2-core machine, once).
    scripts/setup.sh calls this so that no training compiles it, and so does every CPU training before
    DeepSpeed's ``init_distributed`` (which then finds the op loaded). False where DeepSpeed's accelerator
    has no such op (a GPU).

    The load goes through torch's JIT, which runs ninja under a lock FILE in the op's build folder, taken by
    every load, even one that finds the build current: a process killed inside (``ray job stop``, Ctrl-C,
    the OOM killer) leaves it behind, and every later training of this machine then waits for it forever,
    silently. So our processes load the op holding an flock on ``COMM_OP_GUARD``, which the kernel frees
    when its holder dies: one that holds it and still finds torch's lock file knows that file is stale."""
    prepare_process()
    import fcntl

    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return False
    _own_ninja_first()
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / COMM_OP_GUARD, "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
        stale = root / builder.name / "lock"
        if stale.exists():
            print(f"removing {stale}: the lock of a comm-op build whose process died", file=sys.stderr)
            stale.unlink()
        builder.load(verbose=False)
    return True


def _own_ninja_first() -> None:
    """Torch's JIT runs the ``ninja`` it finds on PATH. The environment's own (the pip package DeepSpeed
    installs, next to this interpreter) and a system one hash ninja's command lines differently, so a load
    by a process that finds the other one sees every command "changed" and compiles the op again (~70 s
    here): a process of an activated environment (or of a Ray node started from one) finds the
    environment's, one started as ``.venv/bin/python`` the system's, and the two took turns rebuilding it.
    Every load of ours uses the environment's ninja where it has one."""
    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(here) / "ninja").is_file() and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(on_gpu: bool) -> None:
    """DeepSpeed's process group. A Ray Train worker has Ray Train's. Anywhere else the first training
    of the process creates a world of one (DeepSpeed's launcher variables, a free local port) and every
    later training reuses it: it is never destroyed, so DeepSpeed's groups, built on it by the first
    ``deepspeed.initialize``, stay valid for the life of the process."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)


# -------------------------------------------------------------------------------------------- setup


def freeze_long_lived_objects() -> None:
    """Once per process, after its first training (its model dropped): ``gc.freeze()`` what is alive then
    (torch, transformers, DeepSpeed, Ray and what the first training imported lazily: ~630k objects on the
    synthetic world), after a last ``gc.collect()``.
    Python's collector leaves them out of every later collection, and ZeRO-3 runs a full ``gc.collect()`` in
    each ``deepspeed.initialize``: 0.3 s of the 0.35 s it took per training on the synthetic world's models.
    What the caller holds at that point is frozen with it: kept, if it is later dropped inside a reference
    cycle (once per process)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def zero_stage(world_size: int, on_gpu: bool) -> int:
    """DeepSpeed's ZeRO stage of a training: 3 (parameters, gradients and optimizer state partitioned over the
    ranks), except for a CPU training of one rank (a sweep trial's own process, ``num_workers`` 0 or 1). There
    ZeRO-3 has no rank to partition across, and its gather and release hooks around every module made a
    step of the synthetic world's models 1.4x as long (``bench/train.py --zero``); DeepSpeed's engine runs
    it without ZeRO (stage 0) and computes the same losses to the last bit (tests/test_train.py). A GPU
    training of one rank keeps ZeRO-3: bf16 at stage 0 goes through another DeepSpeed optimizer wrapper,
    which has never run on a GPU here."""
    return 0 if world_size == 1 and not on_gpu else 3


def ds_config(plan: TrainPlan, on_gpu: bool, stage: int) -> dict:
    """ramoe_ray/ds_zero3.json with this training's batch size and learning rate; bf16 on GPU only; ``stage``
    0: without ZeRO (``zero_stage``)."""
    cfg = json.loads(lora.DS_ZERO3_CONFIG.read_text())
    cfg["train_micro_batch_size_per_gpu"] = plan.batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg["optimizer"]["params"]["lr"] = plan.training.lr
    cfg["bf16"] = {"enabled": bool(on_gpu)}
    if stage != 3:
        cfg["zero_optimization"] = {"stage": stage}
    return cfg


def load_tokenizer(model_path: str):
    """The model's tokenizer, right padding (a pad token: eos where the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_adapter(model, plan: TrainPlan) -> list:
    """The plan's expert adapter on ``model`` (everything else frozen); returns its trainable parameters."""
    t, mask = plan.training, plan.experts_mask
    mask = {int(k): v for k, v in mask.items()} if mask is not None else None
    if plan.adapter_kind == "full":
        expert_delta.apply_expert_delta(model, experts=mask)
        return expert_delta.delta_parameters(model)
    lora.apply_expert_lora(model, rank=t.lora_rank, alpha=t.lora_alpha, seed=plan.seed, experts_mask=mask)
    return lora.lora_parameters(model)


def setup(plan: TrainPlan, phases: Phases, world_size: int = 1) -> Trainee:
    """Step 1 (module docstring): from the process group to ``deepspeed.initialize``."""
    prepare_process()
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        build_comm_op()  # loaded under its guard, not inside DeepSpeed's init_distributed (build_comm_op)
    join_process_group(on_gpu)
    torch.manual_seed(plan.seed)
    phases.mark("imports_and_process_group")
    stage = zero_stage(world_size, on_gpu)
    config = ds_config(plan, on_gpu, stage)
    hf_ds_config = HfDeepSpeedConfig(config)  # while alive (ZeRO-3), from_pretrained builds the model partitioned
    model = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype)
    model.config.output_router_logits = False
    phases.mark("model_load")
    tok = load_tokenizer(plan.model_path)
    trainable = apply_adapter(model, plan)
    if stage == 3:
        deepspeed.utils.set_z3_leaf_modules(model, models.zero3_leaf_classes(model))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    phases.mark("lora_and_deepspeed_initialize")
    return Trainee(engine=engine, tok=tok, device=device, dtype=dtype, hf_ds_config=hf_ds_config, zero_stage=stage)


def teardown(trainee: Trainee) -> None:
    """Step 5: DeepSpeed's own teardown of the engine (its hooks off the model, the optimizer's state
    released), the references it leaves behind dropped (``release_zero3_references``), and transformers'
    ZeRO-3 switch off. The process group stays (``join_process_group``)."""
    from transformers.integrations import unset_hf_deepspeed_config

    try:
        trainee.engine.destroy()
        release_zero3_references(trainee.engine.module)
    finally:
        unset_hf_deepspeed_config()


def release_zero3_references(model) -> None:
    """Drop the two references to ``model`` that DeepSpeed 0.19's ``engine.destroy()`` leaves (DeepSpeed
    issue #7204: engines created and destroyed in one process accumulate): ZeRO-3's module-level forward
    stack keeps the top module ``DeepSpeedZeRoOffload`` pushed, and the parameter coordinator's unbounded
    ``lru_cache`` (``__params_to_release``, a pure cache) keeps every coordinator and submodule it was called
    with. Left there, every training of a reused trial process stays in memory (on GPU too), and the
    ``gc.collect()`` inside ``deepspeed.initialize`` scans them all: on the synthetic grid it grew from 0.5 s
    to 2.9 s over ~300 trainings of one process. No public API releases them; if a DeepSpeed release
    renames them this does nothing, and ``tests/test_train.py``'s check that no model outlives its training fails."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [m for m in stack if m is not model]
    cached = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(cached, "__closure__", None) or ():  # DeepSpeed's nvtx wrapper around the lru_cache
        with contextlib.suppress(ValueError):  # an empty cell
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()


# ------------------------------------------------------------------------------------------- passes


def encode(tok, records: list[dict], device) -> dict:
    """Right-padded target prompt + continuation: input_ids, attention_mask, labels (-100 on prompt and
    padding), prompt_mask (True on the prompt's tokens)."""
    seqs = []
    for r in records:
        p_ids = tok(r["prompt"])["input_ids"]
        seqs.append((p_ids, continuation_ids(tok, p_ids, r["prompt"], r["continuation"])))
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
def _routed_batches(engine, tok, records: list[dict], key: str, batch_size: int, device):
    """(records, Routing, mask) per batch of the prompts under ``key``, one captured forward each."""
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        ids, mask = _prompts(tok, [r[key] for r in chunk], device)
        with models.capture(engine.module) as rec:
            engine(input_ids=ids, attention_mask=mask)
        yield chunk, rec.routing(mask), mask


@torch.no_grad()
def english_targets(engine, tok, records: list[dict], batch_size: int, device) -> dict[str, torch.Tensor]:
    """id -> (L, E) soft_importance of the English prompt (``train.RULES["alignment_target"]``). A
    collective under ZeRO-3: every rank must call it with the same records."""
    out = {}
    for chunk, routing, mask in _routed_batches(engine, tok, records, "prompt_en", batch_size, device):
        imp = soft_importance(routing.logits, mask)
        for r, row in zip(chunk, imp):
            out[r["id"]] = row.float().cpu()
    return out


@torch.no_grad()
def split_metrics(trainee: Trainee, plan: TrainPlan, targets: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(routing KL over the ci records, token-mean continuation CE over all records) of the model as it is,
    from ONE no-grad pass over the train split (target prompt + continuation, batches of eval_batch_size):
    per batch ``batch_loss``'s step metrics at λ = 0, the KL on the prompt tokens' routing as the loss reads
    it (causal attention: that of the prompt alone). ``train.RULES["metrics"]``; collective under ZeRO-3."""
    engine, tok, device, ebs = trainee.engine, trainee.tok, trainee.device, plan.training.eval_batch_size
    kl_sum, n_ci, ce_sum, n_tok = 0.0, 0, 0.0, 0
    for i in range(0, len(plan.records), ebs):
        rows = plan.records[i : i + ebs]
        batch = encode(tok, rows, device)
        ci = torch.tensor([r["ci"] for r in rows], dtype=torch.bool, device=device)
        _, parts = batch_loss(engine, batch, ci, [targets.get(r["id"]) for r in rows], lam=0.0,
                              band_layers=plan.band_layers, task_experts=plan.band_experts(), metrics=True)
        k = int((batch["labels"][:, 1:] != -100).sum())
        ce_sum, n_tok = ce_sum + parts["ce"] * k, n_tok + k
        if bool(ci.any()):
            kl_sum, n_ci = kl_sum + parts["routing_kl"] * int(ci.sum()), n_ci + int(ci.sum())
    return (kl_sum / n_ci if n_ci else math.nan), ce_sum / n_tok


def compute_baseline(trainee: Trainee, plan: TrainPlan) -> Baseline:
    """The base passes themselves (LoRA B = 0, delta = 0: the adapted model is the base model): the English
    targets, then ``split_metrics``. No-grad passes in few large batches (ZeRO-3's per-forward cost is fixed)."""
    trainee.engine.eval()
    targets = english_targets(trainee.engine, trainee.tok, plan.ci_records(), plan.training.eval_batch_size,
                              trainee.device)
    kl, ce = split_metrics(trainee, plan, targets)
    return Baseline(targets=targets, routing_kl_ci=kl, ce_train=ce)


def code_version() -> str:
    """Hash of the code that determines the base passes (a key input of ``base_cache``)."""
    return code_digest(sys.modules[__name__], base_cache, losses, models, inference, lora, expert_delta)


def base_passes(trainee: Trainee, plan: TrainPlan, context: WorkerContext) -> tuple[Baseline, bool]:
    """Step 2: the base passes of the cell (``base_cache``): read when a training of the cell computed them
    before, else computed here (every rank) and written (rank 0). Returns (baseline, hit)."""
    if plan.base_cache is None:
        return compute_baseline(trainee, plan), False
    inputs = {**plan.base_inputs, **base_cache.compute_inputs(trainee.device, trainee.dtype, context.world_size)}
    final = base_cache.folder(plan.base_cache, inputs)
    with base_cache.first_computes(final, context.rank):
        if base_cache.agree(final.is_dir(), trainee.device, context.world_size):
            return base_cache.load(final), True
        base = compute_baseline(trainee, plan)
        if context.rank == 0:
            base_cache.save(final, base, inputs)
    return base, False


# ------------------------------------------------------------------------------------------- a step


def batch_loss(model, batch: dict, ci: torch.Tensor, targets: list, *, lam: float, band_layers, task_experts,
               metrics: bool = False) -> tuple[torch.Tensor, dict]:
    """THE training loss of one batch: LM loss (+ λ · alignment on its ci rows). ``targets``: per row the
    English (L, E) target or None (non-ci rows). Router logits are captured (with graph) only when λ > 0,
    and (detached) when ``metrics`` asks for the routing KL; λ = 0 returns the LM loss itself.
    Returns (loss, {"ce", "align" (λ > 0), "routing_kl" (metrics; nan without a ci row)})."""
    need_capture = lam > 0 or metrics
    module = getattr(model, "module", model)  # a DeepSpeed engine forwards; hooks go on its module
    with models.capture(module, detach=lam == 0) if need_capture else contextlib.nullcontext() as rec:
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


def _mean_over_ranks(step: int, loss, parts: dict, n_ci: int, seconds: float, plan: TrainPlan, world: int,
                     restarts: int) -> dict:
    """The log step's metrics averaged over the ranks (routing_kl: over the ci rows of the global batch)."""
    import torch.distributed as dist

    kl = parts["routing_kl"]
    vals = torch.tensor([float(loss.detach()), parts["ce"], parts.get("align", 0.0),
                         0.0 if math.isnan(kl) else kl * n_ci, float(n_ci), seconds], dtype=torch.float64)
    dist.all_reduce(vals)
    total_ci = float(vals[4])
    return {"step": step + 1, "loss": float(vals[0]) / world, "ce": float(vals[1]) / world,
            "align": float(vals[2]) / world if plan.lam_used > 0 else math.nan,
            "routing_kl": float(vals[3]) / total_ci if total_ci else math.nan, "n_ci": int(total_ci),
            "step_seconds": float(vals[5]) / world, "restarts": restarts}


def train_step(trainee: Trainee, plan: TrainPlan, targets: dict, step: int, context: WorkerContext,
               progress: Progress) -> dict | None:
    """One optimizer step on this rank's rows (``rank::world``) of global batch ``step``. Returns the
    metrics (averaged over ranks, appended to the history) on a log step, else None."""
    t0 = time.perf_counter()
    engine = trainee.engine
    rows = [plan.records[i] for i in plan.schedule[step][context.rank :: context.world_size]]
    batch = encode(trainee.tok, rows, trainee.device)
    ci = torch.tensor([r["ci"] for r in rows], dtype=torch.bool, device=trainee.device)
    log = (step + 1) % plan.training.log_every == 0 or step == len(plan.schedule) - 1
    engine.train()
    loss, parts = batch_loss(engine, batch, ci, [targets.get(r["id"]) for r in rows], lam=float(plan.lam_used),
                             band_layers=plan.band_layers, task_experts=plan.band_experts(), metrics=log)
    engine.backward(loss)
    engine.step()
    seconds = time.perf_counter() - t0
    progress.step = step + 1
    progress.step_seconds.append(seconds)
    if not log:
        return None
    m = _mean_over_ranks(step, loss, parts, int(ci.sum()), seconds, plan, context.world_size, progress.restarts)
    progress.history.append(m)
    return m


# -------------------------------------------------------------------------------------- checkpoints


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


def load_checkpoint(engine, plan: TrainPlan, resume_dir: str | None, stage: int) -> Progress:
    """The engine state (adapter parameters, optimizer, step) and the progress of a checkpoint folder; a fresh
    Progress without one. Every rank loads (ZeRO-3: each its own partition). ``stage``: this training's ZeRO
    stage, which the checkpoint's must be (DeepSpeed's checkpoint layouts differ; one without the field is
    from ZeRO-3, as every training was before ``zero_stage``)."""
    if resume_dir is None:
        return Progress()
    meta = check_checkpoint(resume_dir, plan.identity)
    if int(meta.get("zero_stage", 3)) != stage:
        raise ConfigError(f"checkpoint {str(resume_dir)!r} was written at DeepSpeed ZeRO stage {meta.get('zero_stage', 3)}, "
                          f"this training runs stage {stage} (zero_stage: 0 for a CPU training of one rank, else 3)")
    engine.load_checkpoint(resume_dir, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    return Progress(step=meta["step"], history=meta["history"], restarts=meta.get("restarts", 0) + 1)


def save_checkpoint(engine, plan: TrainPlan, progress: Progress, context: WorkerContext, report: Report,
                    metrics: dict | None, phases: Phases, stage: int) -> None:
    """Every rank saves its part into a temporary folder (rank 0 adds the META file) and reports it with
    the step's metrics (``{"step"}`` on a step that logs none)."""
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CHECKPOINT_TAG)
        phases.mark("checkpoint_save")
        if context.rank == 0:
            write_json_atomic(Path(d) / META, {"identity": plan.identity, "step": progress.step, "zero_stage": stage,
                                               "history": jsonable(progress.history), "restarts": progress.restarts})
        report(jsonable(metrics or {"step": progress.step}), d)


# ------------------------------------------------------------------------------------------- finish


def _save_probe_logits(trainee: Trainee, probe: list[str], path: Path, rank: int) -> None:
    ids, mask = _prompts(trainee.tok, probe, trainee.device)
    with torch.no_grad():
        logits = trainee.engine(input_ids=ids, attention_mask=mask).logits.float().cpu()
    if rank == 0:
        torch.save(logits, path)


def _save_adapter(trainee: Trainee, plan: TrainPlan, adapter: Path, context: WorkerContext) -> None:
    """The adapter in peft format, or the trained experts' weights (``full``); a collective: every rank
    gathers, rank 0 writes."""
    import torch.distributed as dist

    if adapter.exists() and context.rank == 0:  # a finished attempt's adapter (only when the result file was lost)
        shutil.rmtree(adapter)
    if context.world_size > 1:
        dist.barrier()
    save = expert_delta.save_experts if plan.adapter_kind == "full" else lora.save_adapter
    save(trainee.engine.module, adapter, plan.model_path)


def finish(trainee: Trainee, plan: TrainPlan, base: Baseline, base_hit: bool, progress: Progress, run_dir: Path,
           probe: list[str] | None, context: WorkerContext, phases: Phases) -> None:
    """Step 4: the final pass (``training.final_train_pass``), probe logits (``probe_logits.pt``), the adapter
    and the result file."""
    import torch.distributed as dist

    trainee.engine.eval()
    measured = {}
    if plan.training.final_train_pass:
        kl, ce = split_metrics(trainee, plan, base.targets)
        measured = {"routing_kl_ci": kl, "ce_train": ce}
        phases.mark("final_passes")
    if probe:
        _save_probe_logits(trainee, probe, run_dir / "probe_logits.pt", context.rank)
    adapter = run_dir / "adapter"
    _save_adapter(trainee, plan, adapter, context)
    phases.mark("save_adapter")
    if context.rank == 0:
        final = dict(progress.history[-1]) if progress.history else {}
        final.update(measured, routing_kl_ci_base=base.routing_kl_ci, ce_train_base=base.ce_train)
        write_json_atomic(run_dir / RESULT, jsonable({
            "adapter": str(adapter), "final": final, "history": progress.history, "restarts": progress.restarts,
            "world_size": context.world_size, "zero_stage": trainee.zero_stage, "step_seconds_rank0": progress.step_seconds,
            "phases_rank0": phases.seconds, "base_passes_recomputed": int(not base_hit), "rungs": progress.rungs}))
    if context.world_size > 1:
        dist.barrier()


# -------------------------------------------------------------------------------------------- entry


def rung_accuracy(trainee: Trainee, rung_eval: dict, world_size: int) -> float:
    """The model as trained so far on the rung's validation rows: the share answered correctly, by the
    evaluator's own prediction (``inference.predict_rows``: generation or choice scoring, as in stage 4, without
    the routing capture: a rung needs the answers only).
    Every rank evaluates every row (ZeRO-3 gathers each layer from all ranks; ``synced_gpus`` keeps the
    ranks' generation steps in step)."""
    engine, rows, bs = trainee.engine, rung_eval["rows"], int(rung_eval["batch_size"])
    engine.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            out = inference.predict_rows(engine.module, trainee.tok, rows[i : i + bs], k=int(rung_eval["k"]),
                                         max_new_tokens=int(rung_eval["max_new_tokens"]), synced_gpus=world_size > 1,
                                         routing=False)  # the answers only: no capture, no routing forward
            correct += sum(bool(r["correct"]) for r in out)
    return correct / len(rows)


def _rung(trainee: Trainee, plan: TrainPlan, progress: Progress, context: WorkerContext, report: Report) -> None:
    """After a rung's step: the validation accuracy, reported (to Tune: ``train.train_cell``) and kept."""
    pct = plan.rung_eval["steps"][progress.step]
    t0 = time.perf_counter()
    acc = rung_accuracy(trainee, plan.rung_eval, context.world_size)
    m = {"step": progress.step, "val_acc": acc, "percent_trained": pct, "n_val": len(plan.rung_eval["rows"]),
         "rung_seconds": time.perf_counter() - t0, "seconds_in_loop": float(sum(progress.step_seconds))}
    progress.rungs.append(m)
    # the rungs so far travel with each rung's report: a trial ASHA stops is logged from its last report
    report(jsonable({**m, "rung_history": json.dumps(jsonable(progress.rungs))}), None)


def run_training(plan: TrainPlan, run_dir: str | os.PathLike, probe: list[str] | None, context: WorkerContext,
                 report: Report, on_trained: Callable | None = None) -> None:
    """One rank's whole training (module docstring); rank 0 writes ``run_dir/RESULT`` at the end.
    ``probe``: prompts whose logits (trained model) rank 0 saves as ``run_dir/probe_logits.pt``.
    ``on_trained(model, tok, adapter)``: called after step 4 with the trained model (in eval mode, its adapter
    saved in the folder ``adapter``) and its tokenizer, before teardown releases them (``train.train_cell``)."""
    phases = Phases()
    trainee = setup(plan, phases, context.world_size)
    try:
        base, base_hit = base_passes(trainee, plan, context)
        phases.mark("base_passes")
        progress = load_checkpoint(trainee.engine, plan, context.resume_dir, trainee.zero_stage)
        phases.mark("checkpoint_load")
        last = len(plan.schedule) - 1
        for step in range(progress.step, len(plan.schedule)):
            metrics = train_step(trainee, plan, base.targets, step, context, progress)
            phases.mark("loop")
            if (step + 1) % plan.training.checkpoint_every == 0 or step == last:
                save_checkpoint(trainee.engine, plan, progress, context, report, metrics, phases, trainee.zero_stage)
            elif metrics is not None:
                report(jsonable(metrics), None)
            phases.mark("checkpoint_and_report")
            if plan.rung_eval and progress.step in plan.rung_eval["steps"]:
                _rung(trainee, plan, progress, context, report)
                phases.mark("rung_eval")
        finish(trainee, plan, base, base_hit, progress, Path(run_dir), probe, context, phases)
        if on_trained is not None:
            on_trained(trainee.engine.module, trainee.tok, Path(run_dir) / "adapter")
    finally:
        teardown(trainee)
    del trainee  # the model unreachable: the collection before the freeze frees it
    freeze_long_lived_objects()


def _ray_report(metrics: dict, checkpoint_dir: str | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint)


def ray_train_loop(config: dict) -> None:
    """The loop of a Ray Train ``TorchTrainer`` worker; config: {"plan": TrainPlan, "run_dir", "probe"}.
    After a worker-group restart Ray Train hands the latest reported checkpoint back: the run resumes there."""
    prepare_process()
    import ray.train

    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        context = WorkerContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), resume_dir=resume_dir)
        run_training(config["plan"], config["run_dir"], config["probe"], context, _ray_report)


def jsonable(obj):
    """NaN -> None (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [jsonable(v) for v in obj]
    return obj
