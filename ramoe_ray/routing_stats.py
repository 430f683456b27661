"""Stage 2's math: importance and frequency, routing divergence, the auto band, task experts, RISE selection.

Pure numpy/scipy functions with keyword arguments, no I/O; stage 1 (taxonomy.py) uses
``sequence_importance``, stage 2 (experts.py) builds experts.json from the rest. Every formula or rule that the RA-MoE paper
does not fix is named in ``RULES`` (logged to MLflow with the run) and spelled out in the docstring of
the function that implements it.

Axis conventions: routing of a batch is (L, B, T, E) as in ``models.Routing`` (L = MoE layers in
``Routing.layers`` order); per-sequence summaries are (N, L, E), one row per example; a layer's
decoder-layer index maps to its row on the L axis through the MoE layer list (``layer_index``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from ramoe_ray.config import band_layers_of

# The named choices of this module (our reconstruction; docs/architecture.md, "The method"). Values are short
# descriptions; the docstrings below give the formulas.
RULES: dict[str, str] = {
    "importance": "token-mean of top-k renormalised softmax p over non-padding tokens (k = model's experts per token)",
    "importance_topk_ties": "equal p: the lower expert id is kept (stable argsort of -p)",
    "frequency": "share of non-padding tokens whose used top-k (Routing.selected) contains the expert",
    "divergence": "JSD(P,Q) / (log E - (H(P)+H(Q))/2), natural log, in [0, 1]",
    "divergence_degenerate": "0.0 when the denominator <= 1e-12 (both uniform, so P == Q)",
    "divergence_pairs": "per layer, unweighted mean over parallel pairs",
    "auto_band_rule": (
        "contiguous window of w = max(1, floor(0.25 n + 0.5)) MoE layers, first and last MoE layer excluded "
        "(all layers when n < 3), lowest mean divergence; ties (isclose rtol 1e-9) -> centre closest to mid-depth, "
        "then shallower"
    ),
    "task_expert_score": "mean importance on correct English task examples - mean importance on English general text",
    "task_expert_ties": "scores equal to 12 decimals: lower expert id first; always top_k experts, even scores <= 0",
    "task_expert_examples": (
        "correct English examples of the split (taxonomy); all English examples when none is correct (recorded)"
    ),
    "rise_specificity": "mean freq on target - unweighted mean over the other languages (English incl.) of their means",
    "rise_overlap": "min over all languages (target included) of the mean freq",
    "rise_languages": "English and every target language of the config, on the split's task examples",
    "rise_score": "specificity; ties (to 12 decimals) -> higher overlap, then shallower layer, then lower expert id",
    "rise_zones": "shallow/middle/deep = depth [0, .375) / [.375, .625) / [.625, 1.0] by the band rule (config.Band.layers)",
    "rise_budget_split": (
        "shares .35/.25/.40 over zones holding MoE layers (renormalised), largest remainder "
        "(ties: larger share, then shallower), capped at zone capacity with the surplus re-split"
    ),
}

RISE_ZONES: dict[str, tuple[float, float]] = {"shallow": (0.0, 0.375), "middle": (0.375, 0.625), "deep": (0.625, 1.0)}
RISE_SHARES: dict[str, float] = {"shallow": 0.35, "middle": 0.25, "deep": 0.40}
DEGENERATE_TOL = 1e-12
TIE_DECIMALS = 12  # scores are compared after rounding to this many decimals (float noise is not a ranking)
AUTO_BAND_FRACTION = 0.25


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or a (possibly GPU, possibly grad-tracking) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------- importance, frequency


def sequence_importance(probs: Any, selected: Any, mask: Any, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence importance and activation frequency of every expert at every MoE layer.

    probs:    (L, B, T, E) softmax over all E experts (``Routing.probs()``), torch or numpy
    selected: (L, B, T, k) expert ids the model used (-1 at padding)
    mask:     (B, T) True on real tokens
    k:        the model's experts per token

    Importance (``RULES["importance"]``): at each real token keep p only on its k largest entries and
    divide by their sum (zeros elsewhere); average over the sequence's real tokens. Rows sum to 1.
    Ties between equal p are broken towards the lower expert id (stable argsort of -p), so the result
    does not depend on torch.topk's unspecified tie order.
    Activation frequency (``RULES["frequency"]``): the share of the sequence's real tokens whose
    ``selected`` experts (what the model actually used, which for group-limited routers may differ from
    the top-k of p) contain the expert. Rows sum to k.

    Returns (importance, frequency), both float32 of shape (B, L, E). A sequence with no real token
    is an error (its summaries are undefined).
    """
    if _is_torch(probs):
        return _sequence_importance_torch(probs, selected, mask, k=k)
    p = to_numpy(probs).astype(np.float64)
    sel = to_numpy(selected).astype(np.int64)
    m = to_numpy(mask).astype(bool)
    n_layers, b, t, n_exp = p.shape
    if sel.shape != (n_layers, b, t, k):
        raise ValueError(f"selected has shape {sel.shape}, expected {(n_layers, b, t, k)} (probs {p.shape}, k={k})")
    if m.shape != (b, t):
        raise ValueError(f"mask has shape {m.shape}, expected {(b, t)}")
    if not 1 <= k <= n_exp:
        raise ValueError(f"k = {k} must be in 1..{n_exp} (the number of experts)")
    n_tok = m.sum(axis=1)
    if (n_tok == 0).any():
        raise ValueError(f"sequences {np.flatnonzero(n_tok == 0).tolist()} have no real token (all padding)")

    top = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    keep = np.zeros_like(p)
    np.put_along_axis(keep, top, np.take_along_axis(p, top, axis=-1), axis=-1)
    total = keep.sum(axis=-1, keepdims=True)
    keep = np.divide(keep, total, out=np.zeros_like(keep), where=total > 0)
    w = m[None, :, :, None]  # (1, B, T, 1)
    importance = (keep * w).sum(axis=2) / n_tok[None, :, None]  # (L, B, E)

    used = (sel[..., None] == np.arange(n_exp)).any(axis=-2)  # (L, B, T, E); -1 matches nothing
    frequency = (used & w).sum(axis=2) / n_tok[None, :, None]
    return importance.transpose(1, 0, 2).astype(np.float32), frequency.transpose(1, 0, 2).astype(np.float32)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _sequence_importance_torch(probs, selected, mask, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``sequence_importance`` on the tensors' own device (the GPU during a taxonomy), same rules
    and the same float64 arithmetic; only the (B, L, E) results are copied to the host."""
    import torch

    p = probs.detach().to(torch.float64)
    sel = selected.detach().to(device=p.device, dtype=torch.int64)
    m = mask.detach().to(device=p.device, dtype=torch.bool)
    n_layers, b, t, n_exp = p.shape
    if tuple(sel.shape) != (n_layers, b, t, k):
        raise ValueError(f"selected has shape {tuple(sel.shape)}, expected {(n_layers, b, t, k)} (probs {tuple(p.shape)}, k={k})")
    if tuple(m.shape) != (b, t):
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected {(b, t)}")
    if not 1 <= k <= n_exp:
        raise ValueError(f"k = {k} must be in 1..{n_exp} (the number of experts)")
    n_tok = m.sum(dim=1)
    if bool((n_tok == 0).any()):
        raise ValueError(f"sequences {torch.nonzero(n_tok == 0).flatten().tolist()} have no real token (all padding)")
    top = torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]  # ties: lower id first
    keep = torch.zeros_like(p).scatter_(-1, top, p.gather(-1, top))
    total = keep.sum(dim=-1, keepdim=True)
    keep = torch.where(total > 0, keep / total.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(keep))
    w = m[None, :, :, None]
    denom = n_tok.to(p.dtype)[None, :, None]
    importance = (keep * w).sum(dim=2) / denom
    used = (sel[..., None] == torch.arange(n_exp, device=p.device)).any(dim=-2)
    frequency = (used & w).sum(dim=2).to(p.dtype) / denom
    return (importance.transpose(0, 1).to(torch.float32).cpu().numpy(),
            frequency.transpose(0, 1).to(torch.float32).cpu().numpy())


# ---------------------------------------------------------------------------------------- divergence


def normalized_jsd(P: Any, Q: Any) -> np.ndarray:
    """Entropy-normalised Jensen–Shannon divergence, row-wise over the last axis (..., E) -> (...).

        D(P, Q) = JSD(P, Q) / (log E − ½ (H(P) + H(Q)))

    with JSD(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = ½ (P + Q), H the Shannon entropy, natural log
    throughout (``scipy.spatial.distance.jensenshannon`` returns √JSD; it is squared here). Since
    JSD = H(M) − ½ (H(P) + H(Q)) and H(M) ≤ log E, the value lies in [0, 1] (clipped for round-off).
    Degenerate case (``RULES["divergence_degenerate"]``): the denominator is 0 only when P and Q are
    both uniform, hence equal; when it is ≤ 1e-12 the result is defined as 0.0.
    Rows are normalised to sum 1 (scipy does so); all-zero rows give NaN.
    """
    P = np.asarray(to_numpy(P), dtype=np.float64)
    Q = np.asarray(to_numpy(Q), dtype=np.float64)
    if P.shape != Q.shape:
        raise ValueError(f"P {P.shape} and Q {Q.shape} differ in shape")
    n_exp = P.shape[-1]
    jsd = jensenshannon(P, Q, axis=-1) ** 2
    denom = math.log(n_exp) - 0.5 * (entropy(P, axis=-1) + entropy(Q, axis=-1))
    safe = denom > DEGENERATE_TOL
    out = np.divide(jsd, denom, out=np.zeros_like(np.asarray(jsd, dtype=np.float64)), where=safe)
    out = np.where(np.isnan(jsd), np.nan, out)
    return np.clip(out, 0.0, 1.0)


def divergence_curve(en_importance: Any, tgt_importance: Any) -> np.ndarray:
    """Per MoE layer, the mean over parallel pairs of ``normalized_jsd`` -> (L,) float64.

    Row i of both (N, L, E) arrays is the same example in English and in the target language.
    """
    en = np.asarray(to_numpy(en_importance), dtype=np.float64)
    tgt = np.asarray(to_numpy(tgt_importance), dtype=np.float64)
    if en.shape != tgt.shape or en.ndim != 3:
        raise ValueError(f"English {en.shape} and target {tgt.shape} importance must be (N, L, E) of the same shape")
    if en.shape[0] == 0:
        raise ValueError("no parallel pairs")
    return normalized_jsd(en, tgt).mean(axis=0)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def auto_band(curve: Any, moe_layers: Sequence[int], num_layers: int) -> list[int]:
    """The 'auto' layer band: the language-universal middle band read off a divergence curve.

    ``curve[j]`` is the divergence at MoE layer ``moe_layers[j]``. Rule (``RULES["auto_band_rule"]``):
    with n MoE layers, candidates are the contiguous windows of w = max(1, floor(0.25 n + 0.5)) MoE
    layers (the width of the default 0.375–0.625 band) that exclude the first and the last MoE layer
    (when n < 3 there is no interior and all MoE layers are candidates; w is capped at the number of
    candidates). The window with the lowest mean divergence wins; means equal within rtol 1e-9 are
    ties, broken by the window whose centre (mean of (l + 0.5) / num_layers over its layers) is
    closest to 0.5, then by the shallower window. Returns decoder-layer indices.
    """
    c = np.asarray(to_numpy(curve), dtype=np.float64)
    layers = list(moe_layers)
    n = len(layers)
    if c.shape != (n,):
        raise ValueError(f"curve has shape {c.shape}, expected ({n},) (one value per MoE layer)")
    if n == 0:
        raise ValueError("no MoE layers")
    if np.isnan(c).any():
        raise ValueError("divergence curve contains NaN")
    lo, hi = (1, n - 1) if n >= 3 else (0, n)
    w = min(max(1, _round_half_up(AUTO_BAND_FRACTION * n)), hi - lo)
    starts = range(lo, hi - w + 1)
    means = np.array([c[s : s + w].mean() for s in starts])
    best = means.min()
    tied = [s for s, v in zip(starts, means) if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-15)]

    def off_centre(s: int) -> float:
        return abs(np.mean([(l + 0.5) / num_layers for l in layers[s : s + w]]) - 0.5)

    s = min(tied, key=lambda s: (off_centre(s), s))
    return layers[s : s + w]


# -------------------------------------------------------------------------------------- task experts


def task_expert_scores(en_task_importance: Any, en_general_importance: Any) -> np.ndarray:
    """(L, E) score of every expert: mean importance over English task examples (the caller passes only
    the correct ones) minus mean importance over English general text (``RULES["task_expert_score"]``)."""
    task = np.asarray(to_numpy(en_task_importance), dtype=np.float64)
    gen = np.asarray(to_numpy(en_general_importance), dtype=np.float64)
    if task.ndim != 3 or gen.ndim != 3 or task.shape[1:] != gen.shape[1:]:
        raise ValueError(f"task {task.shape} and general {gen.shape} importance must be (N, L, E) with the same L, E")
    if task.shape[0] == 0 or gen.shape[0] == 0:
        raise ValueError(f"need at least one task example and one general text (got {task.shape[0]}, {gen.shape[0]})")
    return task.mean(axis=0) - gen.mean(axis=0)


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Expert ids by descending score; scores equal to ``TIE_DECIMALS`` decimals: lower id first."""
    return np.lexsort((np.arange(scores.shape[-1]), -np.round(scores, TIE_DECIMALS)))


def task_experts(
    en_task_importance: Any,
    en_general_importance: Any,
    band_layers: Sequence[int],
    layer_index: Mapping[int, int],
    *,
    top_k: int,
) -> dict[int, list[int]]:
    """Per band layer (decoder index), the ``top_k`` task experts, best first.

    Score = ``task_expert_scores`` (difference of means over examples); ranking by descending score;
    scores equal to 12 decimals (float noise of the means is no ranking) go by lower expert id
    (``RULES["task_expert_ties"]``); always exactly ``top_k`` experts,
    even if some scores are ≤ 0 (the set size is the sweep knob). ``layer_index`` maps a decoder-layer
    index to its row on the L axis. The scores themselves: ``task_expert_scores``.
    """
    scores = task_expert_scores(en_task_importance, en_general_importance)
    n_exp = scores.shape[-1]
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"top_k = {top_k} must be in 1..{n_exp}")
    out: dict[int, list[int]] = {}
    for layer in band_layers:
        if layer not in layer_index:
            raise ValueError(f"band layer {layer} is not a MoE layer (MoE layers: {sorted(layer_index)})")
        out[int(layer)] = [int(e) for e in _ranked(scores[layer_index[layer]])[:top_k]]
    return out


# ---------------------------------------------------------------------------------------------- RISE


def rise_scores(frequencies: Mapping[str, Any], target: str) -> tuple[np.ndarray, np.ndarray]:
    """RISE specificity and overlap (our reconstruction), each (L, E).

    frequencies: language -> (N, L, E) activation frequencies of task examples (English included).
    With f̄_x the mean over examples of language x:
      specificity_t = f̄_t − mean_{x ≠ t} f̄_x   (other languages weighted equally; ``RULES["rise_specificity"]``)
      overlap       = min_x f̄_x                 (over all languages, target included; ``RULES["rise_overlap"]``)
    The selection score (``RULES["rise_score"]``) is the specificity; overlap only breaks its ties.
    """
    if target not in frequencies:
        raise ValueError(f"no frequencies for target language {target!r} (have {sorted(frequencies)})")
    if len(frequencies) < 2:
        raise ValueError("RISE needs the target and at least one other language")
    means = {}
    for lang, f in frequencies.items():
        a = np.asarray(to_numpy(f), dtype=np.float64)
        if a.ndim != 3 or a.shape[0] == 0:
            raise ValueError(f"frequencies[{lang!r}] has shape {a.shape}; expected (N >= 1, L, E)")
        means[lang] = a.mean(axis=0)
    shapes = {m.shape for m in means.values()}
    if len(shapes) != 1:
        raise ValueError(f"languages disagree on (L, E): {sorted(shapes)}")
    others = np.mean([m for lang, m in means.items() if lang != target], axis=0)
    specificity = means[target] - others
    overlap = np.min(np.stack(list(means.values())), axis=0)
    return specificity, overlap


def depth_zones(moe_layers: Sequence[int], num_layers: int) -> dict[str, list[int]]:
    """RISE depth zones (``RULES["rise_zones"]``): MoE layers per zone by the band rule (``config.Band.layers``)."""
    return {z: band_layers_of(a, b, moe_layers, num_layers) for z, (a, b) in RISE_ZONES.items()}


def _largest_remainder(total: int, shares: Mapping[str, float]) -> dict[str, int]:
    s = sum(shares.values())
    quota = {z: round(total * v / s, 9) for z, v in shares.items()}  # round off float noise (2.8000000000000003)
    counts = {z: int(math.floor(q)) for z, q in quota.items()}
    order = list(shares)
    by_remainder = sorted(order, key=lambda z: (-(quota[z] - counts[z]), -shares[z], order.index(z)))
    for z in by_remainder[: total - sum(counts.values())]:
        counts[z] += 1
    return counts


def budget_split(budget: int, capacity: Mapping[str, int], shares: Mapping[str, float] = RISE_SHARES) -> dict[str, int]:
    """Experts per zone, summing exactly to ``budget`` (``RULES["rise_budget_split"]``).

    Zones with capacity 0 (no MoE layer) are dropped and the shares of the rest renormalised; the
    budget is split by the largest-remainder method (floors of budget × share, then one more to the
    largest fractional parts; equal parts: larger share first, then the shallower zone). A zone whose
    count exceeds its capacity (layers × experts) is capped and the surplus is re-split the same way
    among the zones with room left.
    """
    if budget > sum(capacity.values()):
        raise ValueError(f"RISE budget {budget} exceeds the {sum(capacity.values())} (layer, expert) pairs available")
    counts = {z: 0 for z in shares}
    left, open_zones = budget, [z for z in shares if capacity.get(z, 0) > 0]
    while left > 0:
        part = _largest_remainder(left, {z: shares[z] for z in open_zones})
        over = [z for z in open_zones if counts[z] + part[z] > capacity[z]]
        if not over:
            for z in open_zones:
                counts[z] += part[z]
            break
        for z in over:
            left -= capacity[z] - counts[z]
            counts[z] = capacity[z]
            open_zones.remove(z)
    return counts


def rise_select(
    frequencies: Mapping[str, Any],
    *,
    target: str,
    moe_layers: Sequence[int],
    num_layers: int,
    budget: int,
) -> dict[int, list[int]]:
    """The RISE expert selection for one target language: decoder layer -> sorted expert ids.

    ``moe_layers[j]`` is the decoder index of row j of the L axis. The budget is split over the depth
    zones by ``budget_split``; within a zone the (layer, expert) pairs with the highest ``rise_score``
    are taken: specificity descending, then overlap descending (both compared to 12 decimals), then
    shallower layer, then lower expert id. Layers with no chosen expert are absent.
    """
    specificity, overlap = rise_scores(frequencies, target)
    specificity, overlap = np.round(specificity, TIE_DECIMALS), np.round(overlap, TIE_DECIMALS)
    layers = list(moe_layers)
    if specificity.shape[0] != len(layers):
        raise ValueError(f"frequencies have {specificity.shape[0]} layers, moe_layers {len(layers)}")
    n_exp = specificity.shape[1]
    zones = depth_zones(layers, num_layers)
    counts = budget_split(budget, {z: len(ls) * n_exp for z, ls in zones.items()})
    chosen: dict[int, list[int]] = {}
    for z, zone_layers in zones.items():
        pairs = [(l, e) for l in zone_layers for e in range(n_exp)]
        j = {l: layers.index(l) for l in zone_layers}
        pairs.sort(key=lambda p: (-specificity[j[p[0]], p[1]], -overlap[j[p[0]], p[1]], p[0], p[1]))
        for l, e in pairs[: counts[z]]:
            chosen.setdefault(int(l), []).append(int(e))
    return {l: sorted(chosen[l]) for l in sorted(chosen)}


