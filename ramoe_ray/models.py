"""The MoE model families, in one table, and the operations every stage uses on them.

Everything in which the supported architectures (transformers 5) differ lives in ``FAMILIES``:
where a decoder layer keeps its router and its fused experts, which class is the MoE block, which
fused expert parameters LoRA adapts, how the router turns its logits into the
top-k it uses, and a tiny preset. The rest of the package is written once against that table:

- ``capture(model)``: records, per MoE layer, the router logits of every token and the experts it
  selected; ``Routing.probs()`` is softmax over all experts, the same meaning for every family.
- ``steer(model, experts, strength)``: raises chosen experts' router logits in chosen layers,
  redoes the family's top-k from the raised logits, and restores the model exactly on exit.
- ``tiny_config`` / ``build_tiny``: a few-layer, few-expert model of each family built from config.

In transformers 5.23 every family's router returns ``(logits, top-k weights, top-k indices)`` with
raw (pre-softmax) logits first; ``route`` functions below mirror each router's own post-processing
(tests check them bit-for-bit against the routers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------- routing rules
# How each family's router turns logits (tokens, E) into (top-k weights, top-k indices).


def _route_softmax_topk(router: nn.Module, logits: torch.Tensor):
    """OLMoE, Qwen3-MoE: softmax over all experts, top-k, optional renormalisation."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


def _route_mixtral(router: nn.Module, logits: torch.Tensor):
    """Mixtral: softmax, top-k, always renormalised (kept in float32)."""
    probs = F.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights, indices


def _route_gpt_oss(router: nn.Module, logits: torch.Tensor):
    """GPT-OSS: top-k on the logits, softmax over the k selected logits."""
    values, indices = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(values, dim=1, dtype=values.dtype), indices


def _route_deepseek_v2(router: nn.Module, logits: torch.Tensor):
    """DeepSeek-V2: softmax, greedy or group-limited greedy top-k, scaled by routed_scaling_factor."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        per_group = router.num_experts // router.num_group
        group_scores = scores.view(-1, router.num_group, per_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, router.num_group, per_group).reshape(-1, router.num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    elif router.topk_method != "greedy":
        raise ValueError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported (greedy, group_limited_greedy)")
    weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, indices


# ----------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # HF config.model_type
    moe_block: str  # class name of the MoE block
    router: str  # attribute of the MoE block holding the router
    experts: str = "experts"  # attribute of the MoE block holding the fused experts
    lora_targets: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
    # fused layout: False = (E, out, in) used as x @ W.T; True = (E, in, out) used as x @ W (GPT-OSS)
    transposed: bool = False
    route: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _route_softmax_topk
    tiny: dict = field(default_factory=dict)  # HF config fields of the tiny preset


_TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "olmoe", "olmoe", "OlmoeSparseMoeBlock", router="gate",
            tiny=dict(_TINY_COMMON, num_experts=8, norm_topk_prob=False),
        ),
        Family(
            "qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", router="gate",
            tiny=dict(_TINY_COMMON, num_experts=8, moe_intermediate_size=128, head_dim=16, norm_topk_prob=True),
        ),
        Family(
            "mixtral", "mixtral", "MixtralSparseMoeBlock", router="gate", route=_route_mixtral,
            tiny=dict(_TINY_COMMON, num_local_experts=8, head_dim=16),
        ),
        Family(
            "gpt_oss", "gpt_oss", "GptOssMLP", router="router", transposed=True, route=_route_gpt_oss,
            tiny=dict(
                _TINY_COMMON, num_local_experts=8, head_dim=16, sliding_window=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                layer_types=["sliding_attention", "full_attention"] * 2,
            ),
        ),
        Family(
            "deepseek_v2", "deepseek_v2", "DeepseekV2Moe", router="gate", route=_route_deepseek_v2,
            tiny=dict(
                _TINY_COMMON, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=64,
                first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, head_dim=8, topk_method="greedy", routed_scaling_factor=1.0,
                norm_topk_prob=False,
            ),
        ),
    )
}

SUPPORTED = ", ".join(FAMILIES)


def family_for_config(hf_config) -> Family:
    """The family of a HF config; a clear error for dense or unsupported architectures."""
    model_type = getattr(hf_config, "model_type", None)
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    archs = getattr(hf_config, "architectures", None) or [model_type]
    raise ValueError(
        f"model type {model_type!r} ({', '.join(map(str, archs))}) is not a supported MoE family; "
        f"supported families: {SUPPORTED}"
    )


def family_of(model: nn.Module) -> Family:
    return family_for_config(model.config)


# ------------------------------------------------------------------------------------ shapes, loading


@dataclass(frozen=True)
class MoEShape:
    family: str
    num_layers: int
    num_experts: int
    experts_per_token: int
    moe_layers: tuple[int, ...]  # decoder-layer indices that have an MoE block


def shape_of_config(hf_config) -> MoEShape:
    fam = family_for_config(hf_config)
    n = hf_config.num_hidden_layers
    if fam.name == "qwen3_moe":
        step, only_mlp = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or ())
        moe = [i for i in range(n) if i not in only_mlp and (i + 1) % step == 0]
    elif fam.name == "deepseek_v2":
        moe = list(range(hf_config.first_k_dense_replace, n))
    else:
        moe = list(range(n))
    if not hf_config.num_experts or not moe:
        raise ValueError(f"model ({fam.name}) has no MoE layer; only MoE models are supported ({SUPPORTED})")
    return MoEShape(fam.name, n, hf_config.num_experts, hf_config.num_experts_per_tok, tuple(moe))


def moe_shape(model_cfg) -> MoEShape:
    """Reads only the HF config (no weights) of a resolved model (a folder or a hub id, sources.py) and
    checks it against the configured family."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(
        model_cfg.path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    return checked_shape(model_cfg, hf_config)


def checked_shape(model_cfg, hf_config) -> MoEShape:
    """The shape of ``hf_config``, checked against the family ``model_cfg`` names (dense and unsupported
    models are refused)."""
    fam = family_for_config(hf_config)
    if fam.name != model_cfg.family:
        raise ValueError(
            f"{model_cfg.path!r} is a {fam.name} model (model_type {hf_config.model_type!r}) "
            f"but the config says family {model_cfg.family!r}"
        )
    return shape_of_config(hf_config)


def load_model(model_cfg, *, device: str | torch.device = "cpu"):
    """Loads a causal-LM MoE from a resolved model (a folder or a hub id), checked against its family."""
    from transformers import AutoModelForCausalLM

    moe_shape(model_cfg)  # refuses dense / unsupported / mismatched models before loading weights
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path,
        revision=model_cfg.revision,
        dtype=getattr(torch, model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return model.to(device).eval()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order. Training makes each a ZeRO-3 leaf (``train_worker.setup``): DeepSpeed
    gathers a layer's parameters whole on entry instead of hooking each of its submodules. The MoE block is
    nearly all of a layer's parameters, so the gathered unit hardly grows (``memory.model_size``), and a CPU
    training step of the synthetic world's models takes ~25 % less time (bench: 54 -> 41 ms)."""
    return list(model.model.layers)


def zero3_leaf_classes(model: nn.Module) -> list[type]:
    """The classes training marks ZeRO-3 leaves (``deepspeed.utils.set_z3_leaf_modules``): the decoder layers'."""
    return list(dict.fromkeys(type(layer) for layer in decoder_layers(model)))


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> MoE block, for the layers that have one."""
    fam = family_of(model)
    layers = model.model.layers
    return {i: layer.mlp for i, layer in enumerate(layers) if type(layer.mlp).__name__ == fam.moe_block}


def routers(model: nn.Module) -> dict[int, nn.Module]:
    fam = family_of(model)
    return {i: getattr(block, fam.router) for i, block in moe_blocks(model).items()}


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    fam = family_of(model)
    return {i: getattr(block, fam.experts) for i, block in moe_blocks(model).items()}


# ------------------------------------------------------------------------------------------ capture


@dataclass
class Routing:
    """Routing of one batch: ``layers[j]`` is the decoder-layer index of row j of every tensor.

    logits:   (n_moe_layers, batch, seq, E) router logits; 0 at padding positions
    selected: (n_moe_layers, batch, seq, k) experts the model used, sorted ascending; -1 at padding
    mask:     (batch, seq) bool, True on real (non-padding) tokens
    """

    layers: list[int]
    logits: torch.Tensor
    selected: torch.Tensor
    mask: torch.Tensor

    def probs(self) -> torch.Tensor:
        """softmax over all E experts of the router logits (float32); 0 at padding positions."""
        p = F.softmax(self.logits.float(), dim=-1)
        return p * self.mask[None, :, :, None]


class _Recorder:
    def __init__(self) -> None:
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def routing(self, attention_mask: torch.Tensor) -> Routing:
        """Routing of the first forward pass seen (a generation's prefill is its prompt)."""
        if not self.calls:
            raise RuntimeError("capture saw no forward pass")
        mask = attention_mask.bool()
        b, t = mask.shape
        layers = sorted(self.calls)
        logits, selected = [], []
        for i in layers:
            lg, idx = self.calls[i][0]
            if lg.shape[0] != b * t:
                raise ValueError(f"layer {i}: router saw {lg.shape[0]} tokens, attention_mask has {b}x{t}")
            lg = lg.reshape(b, t, -1) * mask[..., None]
            idx = idx.reshape(b, t, -1).sort(dim=-1).values.masked_fill(~mask[..., None], -1)
            logits.append(lg)
            selected.append(idx)
        return Routing(layers, torch.stack(logits), torch.stack(selected), mask)

    def clear(self) -> None:
        self.calls.clear()


@contextlib.contextmanager
def capture(model: nn.Module, *, detach: bool = True) -> Iterator[_Recorder]:
    """Records every MoE layer's router logits and selected experts during forward passes.

    ``detach=False`` keeps the autograd graph (for the alignment loss). Use::

        with capture(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        routing = rec.routing(mask)
    """
    rec = _Recorder()
    handles = []
    for i, router in routers(model).items():

        def hook(module, args, output, i=i):
            logits, _, indices = output
            rec.calls.setdefault(i, []).append((logits.detach() if detach else logits, indices.detach()))

        handles.append(router.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


# -------------------------------------------------------------------------------------------- steer


@contextlib.contextmanager
def steer(model: nn.Module, experts: dict[int, list[int]], strength: float) -> Iterator[None]:
    """Routing steering: in each given decoder layer, add ``strength`` to the router logits of the
    given experts before top-k selection (for every token), redoing the family's top-k. No weight is
    touched; leaving the context removes the hooks, so the model is exactly as before."""
    fam = family_of(model)
    rts = routers(model)
    bad = sorted(set(experts) - set(rts))
    if bad:
        raise ValueError(f"steer: layers {bad} have no MoE router; MoE layers are {sorted(rts)}")
    handles = []
    for layer, ids in experts.items():
        router = rts[layer]
        n = router.num_experts
        if any(not 0 <= e < n for e in ids):
            raise ValueError(f"steer: layer {layer} experts {list(ids)} outside 0..{n - 1}")

        # prepend: steering runs before any capture hook, so capture records the routing actually used
        handles.append(router.register_forward_hook(_steer_hook(fam, list(ids), strength), prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _steer_hook(fam: Family, ids: list[int], strength: float):
    """A router forward hook adding ``strength`` to the logits of experts ``ids`` and redoing the top-k."""

    def hook(module, args, output):
        logits = output[0]
        shift = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        shift[ids] = strength
        steered = logits + shift
        weights, indices = fam.route(module, steered)
        return steered, weights, indices

    return hook


# ------------------------------------------------------------------------------------- tiny presets


def tiny_config(family: str, **overrides):
    """A tiny HF config of a family (<= 4 layers, 8 experts, hidden 64 unless overridden)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported families: {SUPPORTED}")
    fam = FAMILIES[family]
    return AutoConfig.for_model(fam.model_type, **{"vocab_size": 256, **fam.tiny, **overrides})


def build_tiny(family: str, *, seed: int = 0, **overrides):
    """A randomly initialised tiny model of a family (seeded, float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # with the default init (std 0.02) tiny routers are near-uniform and top-k hinges on rounding
    # noise; a wider start gives tests and the demo clearly separated experts
    with torch.no_grad():
        for router in routers(model).values():
            router.weight.normal_(0.0, 0.5)
    return model.eval()
