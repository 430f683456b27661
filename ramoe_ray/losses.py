"""The alignment loss of RA-MoE training (docs/architecture.md, "The method"), and its metric.

For a ci example (correct in English, incorrect in the target language) at band layer l, with S_l the
layer's task experts:

    T_l  = the English routing distribution on S_l, plus one "other" bucket (the mass outside S_l),
           detached: a fixed target
    P̄_l  = the target-language routing distribution of the same example on S_l plus "other",
           averaged over its prompt tokens (with gradient)
    loss = KL(T_l ‖ P̄_l), averaged over the band layers and over the ci examples of the batch

``RULES`` names every choice the design leaves open; the docstrings below give the formulas.

**Scale of T and P̄** (``RULES["alignment_distribution"]``). Both are token-means of the *full*
softmax p = softmax(router logits) over all E experts, the design's "Router probabilities"; T is *not*
the top-k renormalised importance q of ``routing_stats.sequence_importance``. Reasons:

1. Same scale, or the loss is wrong at its optimum. Top-k renormalisation moves every token's mass
   onto its k experts, so q's mass on S_l is systematically larger than p's (e.g. E = 64, k = 8: p's
   top-8 carry perhaps half of the mass, q's carry all of it). With T = q and P̄ = mean p, a target
   language that routes *exactly* like English would still pay KL > 0, and the gradient would push
   it past English — towards sharper routing — rather than towards English's routing
   (``tests/test_losses.py::test_topk_target_is_not_zero_at_perfect_alignment``).
2. P̄ cannot be top-k renormalised instead: renormalised top-k values do not depend on the logit of an
   expert outside the token's top-k, so an under-used task expert — the very one the loss exists to
   raise — would get no gradient.

So T_l is computed from the English router logits exactly as P̄_l is from the target ones
(``soft_importance``), and the loss is 0 exactly when the two bucketed distributions agree. The
top-k importance q stays what stage 2 ranks experts and measures divergence with.

**Source of T** (``RULES["alignment_target_source"]``, ``TARGET_SOURCES``). ``alignment_loss`` accepts
either (B, L, E) — one English distribution per example — or (L, E) — one for all; the caller
chooses. Default ``"example"``: T is the same example's English side (its ``soft_importance`` from
the base model's English forward pass, which stage 1 records anyway). Reasons: a ci pair is defined
per example — its English routing is a routing known to give a correct answer on *this* content —
and different problems legitimately use different experts, which the task mean (``"task_mean"``,
the mean of ``soft_importance`` over the correct English training examples) would flatten: every ci
example would be pulled towards one average, smoother pattern. The task mean remains available (it
needs no per-example English routing, and it is the pattern the task experts were chosen from).

Axis conventions as in ``models.Routing``: router logits (L, B, T, E), L = MoE layers in
``Routing.layers`` order (``layers``); per-sequence distributions (B, L, E) as in ``experts``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

RULES: dict[str, str] = {
    "alignment_distribution": (
        "T and P̄ are token-means of the full softmax p over all E experts (not top-k renormalised), "
        "bucketed to the layer's task experts S_l plus 'other'"
    ),
    "alignment_target_source": (
        "default 'example': T from the same example's English side; 'task_mean': mean over correct English "
        "task examples"
    ),
    "alignment_other_bucket": "mass of the experts outside S_l; no bucket when S_l holds every expert",
    "alignment_tokens": "P̄ averages over the example's tokens where mask is True (non-padding prompt tokens)",
    "alignment_kl": "KL(T || P̄), natural log, T detached; terms with T_j = 0 contribute 0",
    "alignment_average": "unweighted mean over (ci example, band layer) pairs; 0 when the batch has no ci example",
    "alignment_weight": "total = LM loss + λ · alignment; λ = 0 returns the LM loss itself, alignment not computed",
}

TARGET_SOURCES = ("example", "task_mean")
DEFAULT_TARGET_SOURCE = "example"
SUM_TOL = 1e-3  # a target row must sum to 1 within this


def soft_importance(router_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, E) float32: per sequence and MoE layer, the mean of the full softmax p over the tokens
    where ``mask`` is True. This is the distribution both T (from English logits) and P̄ are built from.

    router_logits: (L, B, T, E); mask: (B, T). A sequence with no counted token is an error.
    """
    m = mask.bool()
    n_tok = m.sum(dim=1)
    if (n_tok == 0).any():
        raise ValueError(f"sequences {torch.nonzero(n_tok == 0).flatten().tolist()} have no counted token")
    p = F.softmax(router_logits.float(), dim=-1) * m[None, :, :, None]
    return (p.sum(dim=2) / n_tok[None, :, None]).transpose(0, 1)


def task_mean_pattern(english: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """The ``"task_mean"`` target: (L, E) mean of (N, L, E) English ``soft_importance`` rows over the
    examples answered correctly in English (``correct``: (N,) bool)."""
    correct = correct.bool()
    if not correct.any():
        raise ValueError("no correct English example to average")
    return english[correct].float().mean(dim=0)


def _check(router_logits, mask, ci, layers, band_layers, task_experts, target_pattern) -> None:
    if router_logits.ndim != 4:
        raise ValueError(f"router_logits must be (L, B, T, E), got shape {tuple(router_logits.shape)}")
    n_layers, b, t, n_exp = router_logits.shape
    if tuple(mask.shape) != (b, t):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(b, t)}")
    if tuple(ci.shape) != (b,):
        raise ValueError(f"ci has shape {tuple(ci.shape)}, expected {(b,)}")
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layers given for {n_layers} rows of router_logits")
    if not band_layers:
        raise ValueError("no band layer")
    for l in band_layers:
        if l not in layers:
            raise ValueError(f"band layer {l} is not a MoE layer of router_logits (layers {list(layers)})")
        experts = list(task_experts.get(l, ()))
        if not experts or len(set(experts)) != len(experts) or any(not 0 <= e < n_exp for e in experts):
            raise ValueError(f"band layer {l}: task experts {experts} must be distinct ids in 0..{n_exp - 1}")
    want = {3: (b, n_layers, n_exp), 2: (n_layers, n_exp)}.get(target_pattern.ndim)
    if want is None or tuple(target_pattern.shape) != want:
        raise ValueError(
            f"target_pattern has shape {tuple(target_pattern.shape)}; expected (B, L, E) = {(b, n_layers, n_exp)} "
            f"or (L, E) = {(n_layers, n_exp)}"
        )


def _kl(*, router_logits, mask, ci, layers, band_layers, task_experts, target_pattern) -> torch.Tensor:
    """(n_ci, n_band) KL(T ‖ P̄) of every ci example at every band layer (only ci rows are touched)."""
    _check(router_logits, mask, ci, layers, band_layers, task_experts, target_pattern)
    n_exp = router_logits.shape[-1]
    dev = router_logits.device
    idx = torch.nonzero(ci.to(dev).bool()).flatten()
    m = mask.to(dev).bool().index_select(0, idx)  # (n, T)
    n_tok = m.sum(dim=1)
    if (n_tok == 0).any():
        raise ValueError("a ci example has no counted (non-padding prompt) token")
    log_n = torch.log(n_tok.float())[:, None]
    target = target_pattern.detach().to(dev).float()
    target = target.index_select(0, idx) if target.ndim == 3 else target.unsqueeze(0).expand(len(idx), -1, -1)
    sums = target.sum(dim=-1)
    if (target < 0).any() or ((sums - 1).abs() > SUM_TOL).any():
        raise ValueError("target_pattern rows must be probability distributions over the E experts (>= 0, sum 1)")
    row = {l: j for j, l in enumerate(layers)}
    out = []
    for l in band_layers:
        j = row[l]
        experts = torch.tensor(list(task_experts[l]), device=dev)
        in_s = torch.zeros(n_exp, dtype=torch.bool, device=dev)
        in_s[experts] = True
        logp = F.log_softmax(router_logits[j].index_select(0, idx).float(), dim=-1)  # (n, T, E)
        t = target[:, j]  # (n, E)
        log_q, tq = [logp.index_select(-1, experts)], [t.index_select(-1, experts)]
        if not in_s.all():
            log_q.append(torch.logsumexp(logp.masked_fill(in_s, -math.inf), dim=-1, keepdim=True))
            tq.append(t.masked_fill(in_s, 0.0).sum(dim=-1, keepdim=True))
        log_q = torch.cat(log_q, dim=-1).masked_fill(~m[..., None], -math.inf)  # (n, T, |S|+1)
        log_pbar = torch.logsumexp(log_q, dim=1) - log_n  # log of the token mean, (n, |S|+1)
        tq = torch.cat(tq, dim=-1)
        out.append((torch.xlogy(tq, tq) - tq * log_pbar).sum(dim=-1))
    return torch.stack(out, dim=1)


def alignment_loss(
    *,
    router_logits: torch.Tensor,
    mask: torch.Tensor,
    ci: torch.Tensor,
    layers: Sequence[int],
    band_layers: Sequence[int],
    task_experts: Mapping[int, Sequence[int]],
    target_pattern: torch.Tensor,
) -> torch.Tensor:
    """Mean over the batch's ci examples and the band layers of KL(T_l ‖ P̄_l) (module docstring).

    router_logits: (L, B, T, E) target-language router logits with their graph
      (``models.capture(model, detach=False)``; ``Routing.logits``)
    mask:          (B, T) True on the tokens P̄ averages over: the non-padding *prompt* tokens (pass a
      prompt mask when the sequences also hold the answer)
    ci:            (B,) True for the ci examples; the others are never read
    layers:        decoder-layer index of each row of router_logits (``Routing.layers``)
    band_layers:   decoder-layer indices of the band
    task_experts:  band layer -> its task experts S_l
    target_pattern: English distributions over all E experts on the same L axis, detached inside:
      (B, L, E) per example (default source) or (L, E) for all (task mean); build them with
      ``soft_importance`` / ``task_mean_pattern`` (full softmax, ``RULES["alignment_distribution"]``)

    Returns a float32 scalar; with no ci example, a zero tensor without graph (nothing computed).
    """
    if not bool(ci.any()):
        return torch.zeros((), device=router_logits.device)
    return _kl(
        router_logits=router_logits, mask=mask, ci=ci, layers=layers, band_layers=band_layers,
        task_experts=task_experts, target_pattern=target_pattern,
    ).mean()


@torch.no_grad()
def routing_kl(
    *,
    router_logits: torch.Tensor,
    mask: torch.Tensor,
    ci: torch.Tensor,
    layers: Sequence[int],
    band_layers: Sequence[int],
    task_experts: Mapping[int, Sequence[int]],
    target_pattern: torch.Tensor,
) -> float:
    """The alignment KL as a metric (no graph): its mean over the examples selected by ``ci`` (pass all
    True to report over every example) and the band layers. NaN when no example is selected."""
    if not bool(ci.any()):
        return math.nan
    return float(
        _kl(
            router_logits=router_logits.detach(), mask=mask, ci=ci, layers=layers, band_layers=band_layers,
            task_experts=task_experts, target_pattern=target_pattern,
        ).mean()
    )


def total_loss(*, lm_loss: torch.Tensor, lam: float, alignment: Callable[[], torch.Tensor]) -> torch.Tensor:
    """LM loss + λ · alignment (``RULES["alignment_weight"]``). ``alignment`` is a zero-argument callable
    so that λ = 0 (the SFT baseline) returns ``lm_loss`` itself — bitwise the SFT loss — without
    computing the alignment term."""
    if lam < 0:
        raise ValueError(f"λ = {lam} must be >= 0")
    if lam == 0:
        return lm_loss
    return lm_loss + lam * alignment()
