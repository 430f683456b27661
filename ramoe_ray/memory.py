"""Does a model's plan fit the GPU? Per-GPU memory of its trials, before anything is queued.

Entry: ``check_fit(cfg, hf_configs) -> {model name: Fit}`` (``ConfigError`` with the numbers when a plan
does not fit); ``fit(cfg, model_cfg, hf_config)`` for one model, ``min_workers`` for the smallest worker
count that fits. The sweep runs the check before any trial (``sweep.plan_sweep``), the dry run prints it.

The model is built on the meta device from its HF config (no weights, no download: ``model_size``) and
counted: parameters, the trained ones of each method of the config (expert LoRA on every expert; RISE's
``rise.train: full`` trains K whole experts), and the largest unit ZeRO-3 gathers at once (a decoder
layer is a ZeRO-3 leaf, ``models.decoder_layers``: its attention and all its experts together). Then,
per GPU of a model with GPUs (``RunConfig.resources_for``),
with W = its Ray Train workers, b = ``training.batch_size``, s = ``resources.seq_len``:

- **training worker** = model states + activations.
  Model states: DeepSpeed's own estimator for the trained parameters
  (``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``, no offload: 18 B per trained
  parameter / W + 4 B x the largest gathered unit) + the frozen parameters in bf16, partitioned: 2 B x frozen / W.
  Activations (``ACTIVATION_RULE``): b x s tokens x [L layers x a elements x 2 B + V x 10 B], with per token
  and layer a = 4h + 2(q + kv) + 5E + k(2h + 3i) (h hidden, q/kv the query/key-value widths, E experts,
  k experts per token, i expert width) and V the vocabulary (bf16 logits, their fp32 copy and gradient).
- **evaluation actor** (one GPU each, inference.map_rows): a whole bf16 copy, 2 B x parameters, + its KV cache
  e x (s + new tokens) x L x 2 kv x 2 B + the captured router logits e x s x L x E x 4 B (e = eval_batch_size).

Ray gives each worker or actor whole GPUs, so one GPU holds one of them (gpus_per_worker < 1: 1/g workers
share a GPU and their needs add); a plan fits when each need is at most ``HEADROOM`` of ``gpu_memory_gb``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ramoe_ray import models
from ramoe_ray.config import ConfigError, ModelConfig, RunConfig
from ramoe_ray.inference import MAX_NEW_TOKENS

GB = 1e9
HEADROOM = 0.9  # of a GPU's memory a plan may use: CUDA context, NCCL buffers and allocator fragmentation keep the rest
ACTIVATION_RULE = ("per training example: seq_len x (layers x (4h + 2(q + kv) + 5E + k(2h + 3i)) x 2 B + vocab x 10 B); "
                   "memory-efficient attention (no seq^2 scores), no activation checkpointing")


@dataclass(frozen=True)
class ModelSize:
    """A model counted on the meta device (``model_size``)."""

    total: int  # parameters
    largest_unit: int  # parameters ZeRO-3 gathers at once: the largest decoder layer or other module's own
    lora: int  # expert LoRA of rank 1 on every expert (x lora_rank)
    expert: int  # one expert's parameters (RISE full trains K of them)
    hidden: int
    layers: int
    q_width: int
    kv_width: int
    experts: int
    per_token: int  # experts per token
    expert_width: int  # i
    vocab: int


@dataclass(frozen=True)
class Fit:
    """One model's per-GPU memory (GB) and whether it fits (``fit``)."""

    model: str
    workers: int
    gpus_per_worker: float
    states_gb: float  # model states of one worker (DeepSpeed's estimate + the frozen bf16 share)
    activations_gb: float
    train_gb: float  # per GPU
    eval_gb: float  # per GPU (one evaluation actor)
    trained_params: int  # of the method that trains the most
    size: ModelSize
    gpu_gb: float

    @property
    def usable_gb(self) -> float:
        return HEADROOM * self.gpu_gb

    @property
    def fits(self) -> bool:
        return max(self.train_gb, self.eval_gb) <= self.usable_gb

    def line(self) -> str:
        s = self.size
        return (f"{self.model}: {s.total / 1e9:.2f} B params ({self.trained_params / 1e6:.0f} M trained, largest "
                f"gathered unit {s.largest_unit / 1e6:.0f} M); {self.workers} worker(s) x {self.gpus_per_worker:g} GPU: "
                f"training {self.train_gb:.1f} GB/GPU (states {self.states_gb:.1f} + activations "
                f"{self.activations_gb:.1f}), evaluation actor {self.eval_gb:.1f} GB/GPU; usable "
                f"{self.usable_gb:.0f} of {self.gpu_gb:g} GB: {'fits' if self.fits else 'DOES NOT FIT'}")


def _widths(hf_config) -> tuple[int, int, int]:
    """(hidden, query width, key-value width) of a HF config."""
    h, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    return h, heads * head_dim, kv * head_dim


def _largest_unit(model, leaves: list) -> int:
    """Parameters of the largest unit ZeRO-3 gathers at once: a leaf (a decoder layer, whole), or any other
    module's own parameters (the embeddings, the LM head)."""
    inside = {id(m) for b in leaves for m in b.modules()}
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules() if id(m) not in inside]
    return max([sum(p.numel() for p in b.parameters()) for b in leaves] + own)


def _expert_counts(model) -> tuple[int, int, int]:
    """(LoRA parameters at rank 1 on every expert, one expert's parameters, expert width i)."""
    fam = models.family_of(model)
    targets = {t.rpartition(".")[2] for t in fam.lora_targets}
    lora = expert = width = 0
    for ex in models.experts_modules(model).values():
        params = dict(ex.named_parameters(recurse=False))
        n_exp = next(iter(params.values())).shape[0]
        lora += sum(n_exp * sum(p.shape[1:]) for n, p in params.items() if n in targets)
        expert = max(expert, sum(p.numel() for p in params.values()) // n_exp)
        width = sum(params["down_proj"].shape[1:]) - model.config.hidden_size
    return lora, expert, width


def model_size(hf_config) -> ModelSize:
    """The model of ``hf_config`` built on the meta device (no memory, no weights) and counted."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shape = models.shape_of_config(hf_config)
    lora, expert, width = _expert_counts(model)
    h, q, kv = _widths(hf_config)
    return ModelSize(total=sum(p.numel() for p in model.parameters()),
                     largest_unit=_largest_unit(model, models.decoder_layers(model)), lora=lora, expert=expert,
                     hidden=h, layers=hf_config.num_hidden_layers, q_width=q, kv_width=kv, experts=shape.num_experts,
                     per_token=shape.experts_per_token, expert_width=width, vocab=hf_config.vocab_size)


def trained_params(cfg: RunConfig, size: ModelSize, moe_layers: int) -> int:
    """The most parameters any method of the config trains: expert LoRA (ramoe, sft; rise with
    ``rise.train: lora``) or K whole experts (rise, ``rise.train: full``); 0 for steering alone."""
    counts = [0]
    if any(m in cfg.methods for m in ("ramoe", "sft")) or ("rise" in cfg.methods and cfg.rise.train == "lora"):
        counts.append(size.lora * cfg.training.lora_rank)
    if "rise" in cfg.methods and cfg.rise.train == "full":
        counts.append(cfg.rise.budget_for(moe_layers * size.experts) * size.expert)
    return max(counts)


def states_bytes(total: int, trained: int, largest_unit: int, workers: int) -> float:
    """One worker's model states under ZeRO-3 (module docstring): DeepSpeed's estimator for the trained
    parameters + the frozen ones in bf16, partitioned over the workers."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(trained, largest_unit, num_gpus_per_node=workers, num_nodes=1,
                                                      cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return gpu + 2 * (total - trained) / workers


def activation_bytes(size: ModelSize, batch: int, seq_len: int) -> float:
    """One worker's activations for a batch (``ACTIVATION_RULE``)."""
    s = size
    per_layer = 4 * s.hidden + 2 * (s.q_width + s.kv_width) + 5 * s.experts + s.per_token * (2 * s.hidden + 3 * s.expert_width)
    return batch * seq_len * (s.layers * per_layer * 2 + s.vocab * 10)


def eval_bytes(size: ModelSize, batch: int, seq_len: int) -> float:
    """One evaluation actor: a whole bf16 copy, its KV cache, the captured router logits."""
    s = size
    kv_cache = batch * (seq_len + MAX_NEW_TOKENS) * s.layers * 2 * s.kv_width * 2
    return 2 * s.total + kv_cache + batch * seq_len * s.layers * s.experts * 4


def fit(cfg: RunConfig, model_cfg: ModelConfig, hf_config, workers: int | None = None) -> Fit | None:
    """The model's per-GPU memory with its resources (``workers`` overrides their count); None when the
    model trains without a GPU."""
    res = cfg.resources_for(model_cfg)
    if res.gpus_per_worker <= 0:
        return None
    local = cfg.sweep.train_workers
    w = workers or (max(1, local) if local is not None else res.num_workers)  # 0: the trial process trains
    size = model_size(hf_config)
    trained = trained_params(cfg, size, len(models.shape_of_config(hf_config).moe_layers))
    states = states_bytes(size.total, trained, size.largest_unit, w)
    act = activation_bytes(size, cfg.training.batch_size, res.seq_len)
    sharing = max(1, math.floor(1 / res.gpus_per_worker)) if res.gpus_per_worker < 1 else 1
    return Fit(model=model_cfg.name, workers=w, gpus_per_worker=res.gpus_per_worker, states_gb=states / GB,
               activations_gb=act / GB, train_gb=sharing * (states + act) / GB,
               eval_gb=eval_bytes(size, cfg.training.eval_batch_size, res.seq_len) / GB, trained_params=trained,
               size=size, gpu_gb=res.gpu_memory_gb)


def min_workers(cfg: RunConfig, model_cfg: ModelConfig, hf_config, most: int = 8) -> int | None:
    """The fewest workers (1, 2, 4, ... ``most``) with which the model's training fits; None if none does."""
    w = 1
    while w <= most:
        f = fit(cfg, model_cfg, hf_config, workers=w)
        if f is None or f.fits:
            return w
        w *= 2
    return None


def check_fit(cfg: RunConfig, hf_configs: dict) -> dict[str, Fit]:
    """``fit`` of every model with GPUs (``hf_configs``: model name -> HF config, at least of those); ConfigError
    naming each plan that does not fit, with its numbers and the fewest workers that would."""
    fits = {m.name: f for m in cfg.models if (f := fit(cfg, m, hf_configs.get(m.name))) is not None}
    bad = [m for m in cfg.models if m.name in fits and not fits[m.name].fits]
    if bad:
        lines = [fits[m.name].line() + _advice(cfg, m, hf_configs[m.name]) for m in bad]
        raise ConfigError("the plan does not fit the GPU memory (resources.gpu_memory_gb):\n  " + "\n  ".join(lines))
    return fits


def _advice(cfg: RunConfig, model_cfg: ModelConfig, hf_config) -> str:
    i = cfg.models.index(model_cfg)
    if fit(cfg, model_cfg, hf_config).eval_gb > HEADROOM * cfg.resources.gpu_memory_gb:
        return "; an evaluation actor holds the whole model on one GPU: use larger GPUs or lower training.eval_batch_size"
    w = min_workers(cfg, model_cfg, hf_config)
    if w is None:
        return "; no worker count up to 8 fits: lower training.batch_size or resources.seq_len, or use larger GPUs"
    return f"; it fits with {w} workers: models.{i}.resources.num_workers: {w}"
