"""Full-weight training of chosen experts (RISE) under DeepSpeed ZeRO-3: a full-rank delta per chosen expert.

RISE (github.com/init-neok/rise, ``rise/model_freezer.py``) freezes the model and unfreezes the modules
of its selected experts: their full weights train. transformers 5 fuses a layer's experts into one
tensor per projection, (E, out, in), so one expert cannot be unfrozen alone, and training the fused
tensor would give the optimizer (and ZeRO-3's fp32 master copy) the state of every expert. Instead,
for every MoE layer ``l`` with chosen experts ``S_l`` (sorted), this module registers **on the experts
module itself** (so ZeRO-3 partitions and gathers it with the expert weights), for each of its
parameters ``p`` (``gate_up_proj``, ``down_proj``, and GPT-OSS's expert biases: the whole expert):

    delta_<p>: (|S_l|, *p.shape[1:]), zeros        buffer ``delta_experts``: S_l (non-persistent)

and replaces the module's ``forward`` (as ``lora.py`` does, so it runs after ZeRO-3's gathering
pre-hooks) with one that shadows each parameter by

    p_eff = p.index_add(0, S_l, delta_<p>)         (row S_l[j] of p plus delta_<p>[j]; other rows are p's)

for the duration of the call. Only the deltas are trainable, so optimizer state is proportional to K.
With zero initialisation and no weight decay (``ds_zero3.json``), AdamW on the delta is AdamW on the
chosen rows of ``p``: the gradient w.r.t. ``delta[j]`` is the gradient w.r.t. ``p[S_l[j]]``, so the
trained ``p_eff`` equals RISE's trained weights in exact arithmetic. Unchosen experts and every other
parameter stay bit-identical. Layers without a chosen expert are left untouched (their forward
copies nothing); in the others ``p_eff`` is kept by autograd until backward, as ``lora.py``'s W_eff.

Saving (``save_experts``) writes RISE's artefact in safetensors: the chosen experts' trained weights,
``p_eff[S_l]`` under ``<module path>.<p>``, plus ``ramoe_experts.json`` (family, the experts); loading
(``load_experts``) copies them into a plain model's rows — RISE's ``load_expert_weights`` / merge.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ramoe_ray.cache import atomic_dir
from ramoe_ray.lora import dist_rank, full_shape, gathered
from ramoe_ray.models import experts_modules, family_of

EXPERT_WEIGHTS = "expert_weights.safetensors"
EXPERTS_META = "ramoe_experts.json"
INDEX_BUFFER = "delta_experts"


@dataclass(frozen=True)
class _DeltaState:
    names: tuple[str, ...]  # the experts module's own parameters, each with a delta_<name>
    forward: object  # the module's original (bound) forward


def _delta_forward(self: nn.Module, *args, **kwargs):
    st: _DeltaState = self.ramoe_delta_state
    index = self.get_buffer(INDEX_BUFFER)
    for name in st.names:
        p = self.get_parameter(name)
        self.__dict__[name] = p.index_add(0, index, self.get_parameter(f"delta_{name}").to(p.dtype))
    try:
        return st.forward(*args, **kwargs)
    finally:
        for name in st.names:
            self.__dict__.pop(name, None)


def _checked(model: nn.Module, experts: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """The selection as {MoE layer: sorted unique ids}, empty layers dropped; ValueError when it does not fit."""
    modules = experts_modules(model)
    out = {}
    for layer, ids in experts.items():
        layer, ids = int(layer), sorted({int(e) for e in ids})
        if layer not in modules:
            raise ValueError(f"experts: layer {layer} is not a MoE layer (MoE layers: {sorted(modules)})")
        ex = modules[layer]
        if hasattr(ex, "ramoe_delta_state") or hasattr(ex, "ramoe_lora_state"):
            raise ValueError(f"layer {layer}: an expert adapter is already applied")
        n_exp = full_shape(next(ex.parameters(recurse=False)))[0]
        if any(not 0 <= e < n_exp for e in ids):
            raise ValueError(f"experts: layer {layer} experts {ids} outside 0..{n_exp - 1}")
        if ids:
            out[layer] = ids
    if not out:
        raise ValueError("experts: no expert chosen; there would be nothing to train")
    return out


def apply_expert_delta(model: nn.Module, *, experts: Mapping[int, Sequence[int]]) -> nn.Module:
    """Makes the full weights of ``experts`` (decoder layer -> expert ids) trainable through a zero
    full-rank delta each (module docstring); freezes everything else. In place; returns the model. Call
    before ``deepspeed.initialize``; the model may already be built partitioned (shapes from ``ds_shape``)."""
    chosen = _checked(model, experts)
    modules = experts_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, ids in chosen.items():
        ex = modules[layer]
        names = tuple(n for n, _ in ex.named_parameters(recurse=False))
        for name in names:
            p = ex.get_parameter(name)
            d = torch.zeros((len(ids), *full_shape(p)[1:]), dtype=p.dtype, device=p.device)
            ex.register_parameter(f"delta_{name}", nn.Parameter(d))
        ex.register_buffer(INDEX_BUFFER, torch.tensor(ids, dtype=torch.long, device=p.device), persistent=False)
        ex.ramoe_delta_state = _DeltaState(names, ex.forward)
        ex.forward = types.MethodType(_delta_forward, ex)
    model.enable_input_require_grads()  # as lora.apply_expert_lora: ZeRO-3 leaf hooks need a grad-requiring input
    return model


def _delta_modules(model: nn.Module) -> dict[int, nn.Module]:
    mods = {i: ex for i, ex in experts_modules(model).items() if hasattr(ex, "ramoe_delta_state")}
    if not mods:
        raise ValueError("the model has no expert delta (apply_expert_delta first)")
    return mods


def delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The deltas (the only trainable parameters after ``apply_expert_delta``)."""
    return [ex.get_parameter(f"delta_{n}") for ex in _delta_modules(model).values() for n in ex.ramoe_delta_state.names]


def expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module path>.<name>``: the chosen experts' trained weights p_eff[S_l] (CPU). Under ZeRO-3 this
    gathers the weights and deltas: every rank must call it."""
    paths = {id(m): n for n, m in model.named_modules()}
    out = {}
    for _, ex in sorted(_delta_modules(model).items()):
        st: _DeltaState = ex.ramoe_delta_state
        params = [ex.get_parameter(n) for n in st.names] + [ex.get_parameter(f"delta_{n}") for n in st.names]
        with gathered(params), torch.no_grad():
            index = ex.get_buffer(INDEX_BUFFER)
            for name in st.names:
                p = ex.get_parameter(name)
                rows = p.index_add(0, index, ex.get_parameter(f"delta_{name}").to(p.dtype))[index]
                out[f"{paths[id(ex)]}.{name}"] = rows.cpu().contiguous()
    return out


def save_experts(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str) -> Path | None:
    """Writes ``expert_weights.safetensors`` (``expert_state_dict``) and ``ramoe_experts.json`` (family,
    base model, layer -> expert ids) atomically; an existing ``out_dir`` is an error. Under ZeRO-3 every
    rank must call it; rank 0 writes and gets the path, the others None. Pass ``engine.module``."""
    from safetensors.torch import save_file

    state = expert_state_dict(model)
    if dist_rank() != 0:
        return None
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; expert weights are written once")
    mods = _delta_modules(model)
    meta = {"family": family_of(model).name, "base_model_name_or_path": base_model_name_or_path,
            "experts": {str(i): ex.get_buffer(INDEX_BUFFER).tolist() for i, ex in sorted(mods.items())}}

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / EXPERT_WEIGHTS), metadata={"format": "pt"})
        (tmp / EXPERTS_META).write_text(json.dumps(meta, indent=2))

    return atomic_dir(out_dir, build)


def load_experts(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Copies the expert weights ``save_experts`` wrote into a plain model's rows (in place; returns it).
    ValueError when the folder was written for another family or does not fit the model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / EXPERTS_META).read_text())
    if meta["family"] != family_of(model).name:
        raise ValueError(f"{folder}: expert weights of a {meta['family']} model, this is {family_of(model).name}")
    state = load_file(str(folder / EXPERT_WEIGHTS))
    modules, paths = experts_modules(model), {id(m): n for n, m in model.named_modules()}
    expected = set()
    with torch.no_grad():
        for layer, ids in meta["experts"].items():
            ex = modules[int(layer)]
            for name, p in ex.named_parameters(recurse=False):
                key = f"{paths[id(ex)]}.{name}"
                expected.add(key)
                if key not in state or tuple(state[key].shape) != (len(ids), *p.shape[1:]):
                    raise ValueError(f"{folder}: {key} missing or of the wrong shape for experts {ids}")
                p[torch.tensor(ids)] = state[key].to(p.dtype)
    if set(state) != expected:
        raise ValueError(f"{folder}: weights the model has no chosen expert for: {sorted(set(state) - expected)[:4]}")
    return model
