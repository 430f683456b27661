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
from scipy.special import entr, rel_entr

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
    "rise_frequency": (
        "a[lang][l, i] = share of the language's real prompt tokens, pooled over all its examples of the split, whose "
        "used top-k (Routing.selected) holds expert i"
    ),
    "rise_languages": (
        "the languages of the mean and the CV: rise.languages = 'all' (English + every target language of the config) "
        "or 'pair' (English + the target, RISE's run_rise.sh default)"
    ),
    "rise_specificity": "Spec = S (1 + alpha a_target), S = a_target / mean over languages (1e-8 where the mean is 0)",
    "rise_overlap": (
        "Ovlp = O (1 + alpha mean), O = 1 / (1 + CV), CV = population std / mean over languages "
        "(1e-8 where the mean is 0)"
    ),
    "rise_zones": (
        "the L MoE layers in order: shallow [0, L1), middle [L1, L2), deep [L2, L); L1 = round(0.375 L), "
        "L2 = round(0.625 L), Python round (halves to even)"
    ),
    "rise_budget_split": (
        "floor(0.35 K) shallow, floor(0.25 K) middle, the rest deep (exact integers); a zone over its capacity is "
        "capped and the excess goes, repeatedly, to the zone with the most room left (ties: shallower)"
    ),
    "rise_ranking": (
        "shallow and deep by Spec, middle by Ovlp; candidates pooled over the zone's layers, highest first; equal "
        "scores keep (layer, expert) order (stable sort)"
    ),
}

RISE_ALPHA = 10.0  # α of the composite scores (RISE's default; config rise.alpha)
RISE_EPS = 1e-8  # replaces a zero mean in S and CV (rise/expert_selector.py)
RISE_ZONE_BOUNDS = (0.375, 0.625)  # shallow / middle / deep boundaries, fractions of the MoE layers
RISE_BUDGET_PERCENT = {"shallow": 35, "middle": 25}  # floor(K · share); deep takes the rest
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


def _entropy(P: np.ndarray) -> np.ndarray:
    """Shannon entropy (natural log) of each row over the last axis, as ``scipy.stats.entropy`` computes it
    (rows normalised again, then the sum of ``entr``): the same numbers without importing scipy.stats, ~1 s of
    every process that imports this module (Ray Data actors, trial processes, the CLI)."""
    with np.errstate(invalid="ignore"):
        return entr(P / P.sum(axis=-1, keepdims=True)).sum(axis=-1)


def normalized_jsd(P: Any, Q: Any) -> np.ndarray:
    """Entropy-normalised Jensen–Shannon divergence, row-wise over the last axis (..., E) -> (...).

        D(P, Q) = JSD(P, Q) / (log E − ½ (H(P) + H(Q)))

    with JSD(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M), M = ½ (P + Q), H the Shannon entropy, natural log
    throughout: scipy's ``jensenshannon`` formula (the sum of ``rel_entr``) without its square root, which
    turned a round-off negative JSD of nearly equal rows into NaN. Since JSD = H(M) − ½ (H(P) + H(Q)) and
    H(M) ≤ log E, the value lies in [0, 1] (clipped for round-off).
    Degenerate case (``RULES["divergence_degenerate"]``): the denominator is 0 only when P and Q are
    both uniform, hence equal; when it is ≤ 1e-12 the result is defined as 0.0.
    Rows are normalised to sum 1 (scipy does so); all-zero rows give NaN.
    """
    P = np.asarray(to_numpy(P), dtype=np.float64)
    Q = np.asarray(to_numpy(Q), dtype=np.float64)
    if P.shape != Q.shape:
        raise ValueError(f"P {P.shape} and Q {Q.shape} differ in shape")
    n_exp = P.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero row: NaN, as documented
        P, Q = P / P.sum(axis=-1, keepdims=True), Q / Q.sum(axis=-1, keepdims=True)
        M = 0.5 * (P + Q)
        jsd = 0.5 * (rel_entr(P, M).sum(axis=-1) + rel_entr(Q, M).sum(axis=-1))
    denom = math.log(n_exp) - 0.5 * (_entropy(P) + _entropy(Q))
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


def pooled_frequency(frequency: Any, n_tokens: Any) -> np.ndarray:
    """RISE's activation frequency of one language (``RULES["rise_frequency"]``), (L, E) float64:

        a[l, i] = (number of the language's real prompt tokens whose top-k at layer l holds expert i)
                  / (number of its real prompt tokens),  pooled over all its examples

    frequency: (N, L, E) per-example shares (``sequence_importance``); n_tokens: (N,) real tokens of
    each example. The counts are recovered exactly as round(share · n_tokens) (the shares are float32).
    """
    f = np.asarray(to_numpy(frequency), dtype=np.float64)
    n = np.asarray(to_numpy(n_tokens), dtype=np.int64)
    if f.ndim != 3 or f.shape[0] == 0 or n.shape != (f.shape[0],):
        raise ValueError(f"frequency {f.shape} and n_tokens {n.shape}: expected (N >= 1, L, E) and (N,)")
    if (n < 1).any():
        raise ValueError("every example needs at least one real token")
    counts = np.rint(f * n[:, None, None]).sum(axis=0)
    return counts / n.sum()


def _stacked(frequencies: Mapping[str, Any], target: str) -> tuple[np.ndarray, np.ndarray]:
    """(target's (L, E), all languages' (n_lang, L, E) in sorted language order), checked."""
    if target not in frequencies:
        raise ValueError(f"no frequencies for target language {target!r} (have {sorted(frequencies)})")
    if len(frequencies) < 2:
        raise ValueError("RISE needs the target and at least one other language")
    arrays = {lang: np.asarray(to_numpy(frequencies[lang]), dtype=np.float64) for lang in sorted(frequencies)}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"frequencies must be (L, E) arrays of one shape; got {sorted(shapes)}")
    return arrays[target], np.stack(list(arrays.values()))


def rise_scores(frequencies: Mapping[str, Any], target: str, *,
                alpha: float = RISE_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """RISE's composite scores (Eq. 8 of arXiv 2604.03592; ``rise/expert_selector.py``), each (L, E).

    frequencies: language -> (L, E) ``pooled_frequency`` (target included); ā = the unweighted mean over
    the languages given, σ their population standard deviation; a zero denominator is replaced by 1e-8:
      S    = a_target / ā                         Spec = S · (1 + α · a_target)   (``RULES["rise_specificity"]``)
      CV   = σ / ā,   O = 1 / (1 + CV)            Ovlp = O · (1 + α · ā)          (``RULES["rise_overlap"]``)
    Returns (Spec, Ovlp).
    """
    a_t, stack = _stacked(frequencies, target)
    mean = stack.mean(axis=0)
    safe = np.where(mean > 0, mean, RISE_EPS)
    spec = a_t / safe * (1.0 + alpha * a_t)
    ovlp = 1.0 / (1.0 + stack.std(axis=0) / safe) * (1.0 + alpha * mean)
    return spec, ovlp


def depth_zones(moe_layers: Sequence[int]) -> dict[str, list[int]]:
    """RISE's depth zones (``RULES["rise_zones"]``): the L MoE layers in order, shallow = the first
    L1 = round(0.375 L), middle = up to L2 = round(0.625 L), deep = the rest (Python's round: halves go
    to even, so L = 4 has no middle layer). Returns decoder-layer indices per zone."""
    layers = [int(l) for l in moe_layers]
    l1, l2 = round(RISE_ZONE_BOUNDS[0] * len(layers)), round(RISE_ZONE_BOUNDS[1] * len(layers))
    return {"shallow": layers[:l1], "middle": layers[l1:l2], "deep": layers[l2:]}


def budget_split(budget: int, capacity: Mapping[str, int]) -> dict[str, int]:
    """Experts per zone, summing to ``budget`` (``RULES["rise_budget_split"]``): floor(0.35 K) shallow,
    floor(0.25 K) middle, the rest deep; a zone asked for more than its capacity (layers × experts) is
    capped, and the excess goes, repeatedly, to the zone with the most room left (ties: the shallower)."""
    if not 1 <= budget <= sum(capacity.values()):
        raise ValueError(f"RISE budget {budget}: allowed 1..{sum(capacity.values())} (the routed experts available)")
    shallow, middle = budget * RISE_BUDGET_PERCENT["shallow"] // 100, budget * RISE_BUDGET_PERCENT["middle"] // 100
    counts = {"shallow": shallow, "middle": middle, "deep": budget - shallow - middle}
    excess = 0
    for z in counts:
        excess += max(0, counts[z] - capacity[z])
        counts[z] = min(counts[z], capacity[z])
    while excess:
        room = {z: capacity[z] - counts[z] for z in counts}
        z = max(room, key=room.get)
        take = min(room[z], excess)
        counts[z] += take
        excess -= take
    return counts


def rise_select(
    frequencies: Mapping[str, Any],
    *,
    target: str,
    moe_layers: Sequence[int],
    num_layers: int,
    budget: int,
    alpha: float = RISE_ALPHA,
) -> dict[int, list[int]]:
    """RISE's experts for one target language (Algorithm 1): decoder layer -> sorted expert ids.

    frequencies: language -> (L, E) ``pooled_frequency``; row j is decoder layer ``moe_layers[j]`` (of
    ``num_layers``). The budget K is split over ``depth_zones`` by ``budget_split``; within a zone the
    candidates of all its layers are pooled and the highest scores taken — Spec in the shallow and deep
    zones, Ovlp in the middle (``rise_scores``); equal scores keep (layer, expert) order (a stable sort,
    ``RULES["rise_ranking"]``). Layers with no chosen expert are absent.
    """
    n_layers, n_exp = _stacked(frequencies, target)[0].shape
    layers = [int(l) for l in moe_layers]
    if n_layers != len(layers) or any(not 0 <= l < num_layers for l in layers):
        raise ValueError(f"frequencies have {n_layers} layers; moe_layers {layers} (of {num_layers} decoder layers)")
    zones = depth_zones(layers)
    counts = budget_split(budget, {z: len(ls) * n_exp for z, ls in zones.items()})  # a bad K fails before scoring
    spec, ovlp = rise_scores(frequencies, target, alpha=alpha)
    row = {l: j for j, l in enumerate(layers)}
    chosen: dict[int, list[int]] = {}
    for zone, zone_layers in zones.items():
        score = ovlp if zone == "middle" else spec
        pairs = [(l, e) for l in zone_layers for e in range(n_exp)]
        pairs.sort(key=lambda p: -score[row[p[0]], p[1]])  # stable: ties stay in (layer, expert) order
        for l, e in pairs[: counts[zone]]:
            chosen.setdefault(l, []).append(e)
    return {l: sorted(chosen[l]) for l in sorted(chosen)}
