"""Expert LoRA that trains under DeepSpeed ZeRO-3 and saves in PEFT's ``target_parameters`` format.

Why not peft directly: peft 0.21.2 ``LoraConfig(target_parameters=["experts.gate_up_proj",
"experts.down_proj"])`` has no per-expert mask, which RISE needs (only chosen experts train). It was
also believed not to train under ZeRO-3 (backward fails with ``size of tensor a (0) must match ...``);
the cause is not peft but the frozen embeddings: the first MoE block's input does not require grad,
so DeepSpeed's full backward hook on a ZeRO-3 leaf module (where it reduces and re-partitions the
leaf's grads) fires as soon as the grads w.r.t. the block's *outputs* exist — before the LoRA grads
are accumulated. ``apply_expert_lora`` therefore calls ``model.enable_input_require_grads()``; with it
peft's LoRA trains under ZeRO-3 too (checked by hand on two CPU ranks, leaf or not: the loss falls;
not compared with a reference). This module is function-identical
to peft's (same logits and gradients, tests/test_lora.py) and saves peft's format.

What this module does, for every MoE layer's fused experts module (``models.experts_modules``)
and every fused parameter named in the family's ``lora_targets`` (``experts.gate_up_proj``,
``experts.down_proj``):

- registers the low-rank factors as ``nn.Parameter``\\ s **on the experts module itself**, so ZeRO-3
  partitions them with the expert weights and gathers them whenever it gathers the experts (forward,
  and again in backward, and inside a ZeRO-3 leaf MoE block):

      lora_A_<name>: (E, r, in)      lora_B_<name>: (E, out, r)

  ``in``/``out`` are the projection's input/output features (gate_up: in = hidden, out = 2·I; down:
  in = I, out = hidden), whichever way the family stores the fused weight — peft's orientation;
- a non-persistent buffer ``lora_mask`` (E,) of 0/1: which experts are adapted (RISE trains only
  chosen experts). An unselected expert's effective delta is exactly zero and its factors get an
  exactly-zero gradient (the mask multiplies B before the product);
- replaces the module's ``forward`` (an instance attribute, so it runs *after* every forward pre-hook,
  ZeRO-3's parameter gathering included) with one that computes each effective weight

      W_eff = W + (alpha / r) · (mask·B) @ A              (fused layout (E, out, in))
      W_eff = W + (alpha / r) · ((mask·B) @ A)^T          (GPT-OSS, transposed layout (E, in, out))

  with the same ``torch.baddbmm`` peft uses, shadows the parameter with it for the duration of the
  call (``module.__dict__[name] = W_eff``: instance attributes win over ``nn.Module.__getattr__``,
  which is where parameters are found), runs the family's own forward — whichever experts
  implementation (eager, grouped_mm, batched_mm) it dispatches to reads ``self.gate_up_proj`` /
  ``self.down_proj`` — and removes the shadow. Parameters, hooks and state_dict are untouched (no
  ``torch.nn.utils.parametrize``, which moves the parameter into a submodule that is never called).

Memory note: W_eff is kept by autograd until backward (peft does the same); for real models enable
gradient checkpointing, which keeps only one layer's W_eff alive at a time.

Everything except the LoRA factors is frozen (routers, attention, embeddings, expert biases).
Initialisation is peft's default: A ~ kaiming-uniform(a=√5) on each (r·E, in) block, i.e.
U(−1/√in, 1/√in); B = 0. Under ZeRO-3 the factors are created full-size on every rank from the same
seed (identical values) and partitioned by ``deepspeed.initialize``.

Saving (``save_adapter``) writes exactly what peft's ``get_peft_model_state_dict`` holds for a plain
model adapted with ``LoraConfig(target_modules=[], target_parameters=lora_targets)`` — peft nests one
``ParamWrapper`` per targeted parameter, the first parameter registered on the experts module
innermost, so with two targets the keys of layer i are::

    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight   (E·r, in)   gate_up_proj
    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_B.weight   (out, r·E)  gate_up_proj
    base_model.model.model.layers.{i}.mlp.experts.lora_A.weight              (E·r, in)   down_proj
    base_model.model.model.layers.{i}.mlp.experts.lora_B.weight              (out, r·E)  down_proj

peft's lora_A row ``e·r + j`` is A[e, j]; its lora_B column ``j·E + e`` is B[e, :, j]. peft has no
per-expert mask, so the saved B is the *masked* B (zero for unselected experts): the loaded adapter
has exactly the trained model's deltas. The mask itself is recorded in ``ramoe_lora.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ramoe_ray.cache import atomic_dir
from ramoe_ray.models import Family, experts_modules, family_of

# ZeRO-3 base config: fp32, AdamW with torch_adam (nothing to compile), overlap_comm off; the trainer
# sets batch sizes, lr and (on GPU) bf16. Tests set stage3_param_persistence_threshold = 0 so that even
# tiny parameters are partitioned.
DS_ZERO3_CONFIG = Path(__file__).with_name("ds_zero3.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RAMOE_LORA = "ramoe_lora.json"
MASK_BUFFER = "lora_mask"


@dataclass(frozen=True)
class _LoraState:
    targets: tuple[str, ...]  # parameter names on the experts module, in peft's nesting order (innermost first)
    rank: int
    alpha: float
    scale: float
    transposed: bool
    forward: object  # the module's original (bound) forward


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _param_names(fam: Family, experts: nn.Module) -> tuple[str, ...]:
    """The targeted parameter names of an experts module, in registration order (peft's nesting order)."""
    wanted = set()
    for target in fam.lora_targets:
        owner, _, name = target.rpartition(".")
        if owner != fam.experts:
            raise ValueError(f"{fam.name}: lora target {target!r} is not a parameter of the experts module {fam.experts!r}")
        wanted.add(name)
    names = tuple(n for n, _ in experts.named_parameters(recurse=False) if n in wanted)
    if set(names) != wanted:
        raise ValueError(f"{fam.name}: experts module {type(experts).__name__} lacks {sorted(wanted - set(names))}")
    return names


def _in_out(shape: tuple[int, ...], transposed: bool) -> tuple[int, int, int]:
    """(E, in, out) of a fused expert weight stored (E, out, in), or (E, in, out) when transposed."""
    n_exp, a, b = shape
    return (n_exp, a, b) if transposed else (n_exp, b, a)


def _lora_forward(self: nn.Module, *args, **kwargs):
    st: _LoraState = self.ramoe_lora_state
    mask = self.get_buffer(MASK_BUFFER)
    for name in st.targets:
        w = self.get_parameter(name)
        a = self.get_parameter(f"lora_A_{name}")
        b = self.get_parameter(f"lora_B_{name}") * mask.to(w.dtype)[:, None, None]
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if st.transposed else (b, a)
        # as peft's _LoraFactorsProxy: the fold happens in W's dtype, autocast off
        with torch.autocast(device_type=w.device.type, enabled=False):
            self.__dict__[name] = torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=st.scale)
    try:
        return st.forward(*args, **kwargs)
    finally:
        for name in st.targets:
            self.__dict__.pop(name, None)


def _mask_rows(experts_mask: Mapping[int, Sequence[int]] | None, layer: int, n_exp: int) -> torch.Tensor:
    if experts_mask is None:
        return torch.ones(n_exp)
    row = torch.zeros(n_exp)
    ids = [int(e) for e in experts_mask.get(layer, ())]
    if any(not 0 <= e < n_exp for e in ids):
        raise ValueError(f"experts_mask: layer {layer} experts {ids} outside 0..{n_exp - 1}")
    row[ids] = 1.0
    return row


def apply_expert_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    experts_mask: Mapping[int, Sequence[int]] | None = None,
    seed: int,
) -> nn.Module:
    """Adds expert LoRA to every MoE layer of ``model`` (in place; returns it) and freezes the rest.

    rank, alpha: LoRA rank r and alpha (scale alpha / r, as peft without rsLoRA).
    experts_mask: decoder layer -> expert ids to adapt (the RISE selection); layers not listed get no
      adapted expert. None: every expert of every MoE layer is adapted.
    seed: seeds A's initialisation (use the same seed on every rank under ZeRO-3).
    Call before ``deepspeed.initialize`` (which partitions the new factors under ZeRO-3); the model
    may already be built under ZeRO-3 (``HfDeepSpeedConfig``), shapes are read from ``ds_shape``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    fam = family_of(model)
    modules = experts_modules(model)
    if experts_mask is not None:
        unknown = sorted(set(int(l) for l in experts_mask) - set(modules))
        if unknown:
            raise ValueError(f"experts_mask: layers {unknown} are not MoE layers (MoE layers: {sorted(modules)})")
    plan = {}  # everything is checked before the model is touched
    for layer, ex in sorted(modules.items()):
        if hasattr(ex, "ramoe_lora_state"):
            raise ValueError(f"layer {layer}: expert LoRA is already applied")
        names = _param_names(fam, ex)
        plan[layer] = (names, _mask_rows(experts_mask, layer, full_shape(ex.get_parameter(names[0]))[0]))
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    for layer, (names, mask) in plan.items():
        ex = modules[layer]
        for name in names:
            w = ex.get_parameter(name)
            e, n_in, n_out = _in_out(full_shape(w), fam.transposed)
            bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)) on a (r*E, in) weight, as peft
            a = torch.empty(e, rank, n_in).uniform_(-bound, bound, generator=gen)
            b = torch.zeros(e, n_out, rank)
            ex.register_parameter(f"lora_A_{name}", nn.Parameter(a.to(w.device, w.dtype)))
            ex.register_parameter(f"lora_B_{name}", nn.Parameter(b.to(w.device, w.dtype)))
        ex.register_buffer(MASK_BUFFER, mask.to(w.device), persistent=False)
        ex.ramoe_lora_state = _LoraState(names, rank, float(alpha), scale, fam.transposed, ex.forward)
        ex.forward = types.MethodType(_lora_forward, ex)
    # With everything before the first MoE block frozen, its input would not require grad. A ZeRO-3 leaf
    # module (the MoE block) reduces its parameters' grads in a full backward hook, which then fires as
    # soon as the grads w.r.t. its *outputs* exist, before the LoRA grads are accumulated (backward then
    # fails: "size of tensor a (0) must match"). Making the embeddings' output require grad (the standard
    # PEFT fix, also needed by reentrant gradient checkpointing) makes the hook fire after them.
    model.enable_input_require_grads()
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (the only trainable parameters after ``apply_expert_lora``)."""
    return [p for ex in _lora_modules(model).values() for n, p in ex.named_parameters(recurse=False) if n.startswith("lora_")]


def _lora_modules(model: nn.Module) -> dict[int, nn.Module]:
    mods = {i: ex for i, ex in experts_modules(model).items() if hasattr(ex, "ramoe_lora_state")}
    if not mods:
        raise ValueError("the model has no expert LoRA (apply_expert_lora first)")
    return mods


def gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Context gathering ZeRO-3-partitioned params on every rank (a collective); a no-op otherwise.
    With ``modifier_rank`` set, that rank's in-place changes are partitioned back on exit."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def _peft_prefixes(n_targets: int) -> list[str]:
    """peft nests one ParamWrapper per target, the first target innermost: its keys carry the most
    ``base_layer.`` segments."""
    return ["base_layer." * (n_targets - 1 - i) for i in range(n_targets)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in peft's ``get_peft_model_state_dict`` layout (CPU tensors, B masked).

    Under ZeRO-3 this gathers the factors: every rank must call it.
    """
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for _, ex in sorted(_lora_modules(model).items()):
        st: _LoraState = ex.ramoe_lora_state
        params = [ex.get_parameter(f"lora_{ab}_{n}") for n in st.targets for ab in "AB"]
        with gathered(params), torch.no_grad():
            mask = ex.get_buffer(MASK_BUFFER)
            for name, prefix in zip(st.targets, _peft_prefixes(len(st.targets))):
                a = ex.get_parameter(f"lora_A_{name}").detach()
                b = ex.get_parameter(f"lora_B_{name}").detach() * mask.to(a.dtype)[:, None, None]
                n_exp, r, n_in = a.shape
                n_out = b.shape[1]
                key = f"base_model.model.{names[id(ex)]}.{prefix}"
                out[key + "lora_A.weight"] = a.reshape(n_exp * r, n_in).cpu().clone()
                out[key + "lora_B.weight"] = b.permute(1, 2, 0).reshape(n_out, r * n_exp).cpu().contiguous()
    return out


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copies a peft-layout adapter (``lora_state_dict``'s keys and shapes; e.g. a saved
    ``adapter_model.safetensors``) into the model's factors; every key must match. The mask is kept
    as it is. Under ZeRO-3 every rank must call it with the same state."""
    names = {id(m): n for n, m in model.named_modules()}
    expected = set()
    for _, ex in sorted(_lora_modules(model).items()):
        st: _LoraState = ex.ramoe_lora_state
        params = [ex.get_parameter(f"lora_{ab}_{n}") for n in st.targets for ab in "AB"]
        with gathered(params, modifier_rank=0), torch.no_grad():
            for name, prefix in zip(st.targets, _peft_prefixes(len(st.targets))):
                key = f"base_model.model.{names[id(ex)]}.{prefix}"
                a, b = ex.get_parameter(f"lora_A_{name}"), ex.get_parameter(f"lora_B_{name}")
                n_exp, r, n_in = a.shape
                n_out = b.shape[1]
                ka, kb = key + "lora_A.weight", key + "lora_B.weight"
                expected |= {ka, kb}
                if ka not in state or kb not in state:
                    raise KeyError(f"adapter lacks {ka if ka not in state else kb}")
                if tuple(state[ka].shape) != (n_exp * r, n_in) or tuple(state[kb].shape) != (n_out, r * n_exp):
                    raise ValueError(
                        f"{key}: adapter shapes {tuple(state[ka].shape)}, {tuple(state[kb].shape)} do not fit "
                        f"E={n_exp}, r={r}, in={n_in}, out={n_out}"
                    )
                a.copy_(state[ka].reshape(n_exp, r, n_in))
                b.copy_(state[kb].reshape(n_out, r, n_exp).permute(2, 0, 1))
    extra = sorted(set(state) - expected)
    if extra:
        raise KeyError(f"adapter keys the model has no factor for: {extra[:4]}{' ...' if len(extra) > 4 else ''}")


def dist_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str) -> Path | None:
    """Writes the adapter in PEFT format: ``adapter_model.safetensors`` + ``adapter_config.json``
    (``LoraConfig(r, lora_alpha, target_modules=[], target_parameters=<family lora_targets>)``), so
    ``PeftModel.from_pretrained(plain_model, out_dir)`` loads it; plus ``ramoe_lora.json`` (family,
    rank, alpha, the experts mask). Atomic (temp folder + rename); an existing ``out_dir`` is an error.

    Under ZeRO-3 every rank must call it (the factors are gathered collectively); rank 0 writes and
    gets the path, other ranks get None (no barrier: synchronise before reading it from another rank).
    Pass the bare model (``engine.module``), not the engine. Save adapters with this, not with the
    model's ``save_pretrained`` (whose state dict would carry the factors under non-peft names).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    fam = family_of(model)
    state = lora_state_dict(model)
    if dist_rank() != 0:
        return None
    mods = _lora_modules(model)
    st: _LoraState = next(iter(mods.values())).ramoe_lora_state
    mask = {
        str(i): [int(e) for e in torch.nonzero(ex.get_buffer(MASK_BUFFER)).flatten().tolist()] for i, ex in sorted(mods.items())
    }
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; adapters are written once")
    alpha = int(st.alpha) if float(st.alpha).is_integer() else st.alpha

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = LoraConfig(
            r=st.rank,
            lora_alpha=alpha,
            target_modules=[],
            target_parameters=list(fam.lora_targets),
            base_model_name_or_path=base_model_name_or_path,
        )
        cfg.save_pretrained(str(tmp))
        (tmp / RAMOE_LORA).write_text(
            json.dumps({"family": fam.name, "rank": st.rank, "alpha": st.alpha, "experts_mask": mask}, indent=2)
        )

    return atomic_dir(out_dir, build)
