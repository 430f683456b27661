"""Paired comparison statistics for the report: pure functions of per-example correctness arrays.

Inputs are 0/1 correctness arrays from test evaluations, aligned by example id (column j is the same
example for every method and seed), one row per seed. Differences are fractions (0.06 = 6 accuracy
points); the report formats points. The sign is always B − A: pass the baseline as A and RA-MoE as B.

- ``paired_bootstrap``: Δ = B − A on one cell, with a percentile-bootstrap interval over examples;
- ``mcnemar_exact``: exact McNemar test of one seed against one seed;
- ``across_cells``: mean Δ over cells (bootstrap interval over cells), significant wins / ties /
  losses, Wilcoxon signed-rank p;
- ``mean_sd``: mean and sample standard deviation over seeds;
- ``headline``: the one-line summary of ``across_cells``.

Nothing here reads files or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

N_BOOT = 10_000
LEVEL = 0.95
DRAWS_PER_BATCH = 2_000_000  # bootstrap indices held in memory at once (16 MB of int64)


@dataclass(frozen=True)
class PairedDelta:
    """Δ = mean(B − A) over examples (fraction) and its percentile-bootstrap interval; n examples."""
    delta: float
    low: float
    high: float
    n: int


class McNemar(NamedTuple):
    """Exact two-sided p; b01 = examples A got wrong and B right, b10 = the reverse."""
    p: float
    b01: int
    b10: int


class MeanSD(NamedTuple):
    """Mean over seeds; sample sd (ddof=1), None for a single seed; n seeds."""
    mean: float
    sd: float | None
    n: int


@dataclass(frozen=True)
class CellSummary:
    """Δ over cells: mean, its bootstrap interval (None below 2 cells), significant wins (cell interval
    above 0) / ties / losses (below 0), Wilcoxon signed-rank p (None when undefined) and why anything is None."""
    mean: float
    low: float | None
    high: float | None
    n: int
    wins: int
    ties: int
    losses: int
    wilcoxon_p: float | None
    level: float
    note: str | None


def _correctness(x, name: str) -> np.ndarray:
    """(seeds, examples) float array of 0/1; a 1-D array is one seed."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (seeds, examples) array, got shape {np.shape(x)}")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name}: correctness must be 0/1 (or bool)")
    return arr


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _correctness(a, "a"), _correctness(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has {a.shape[1]} examples and b has {b.shape[1]}; both must hold the same examples "
                         f"in the same order (align them by example id)")
    return a, b


def _mean_interval(x: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``x`` (resampling its entries; deterministic given seed)."""
    res = stats.bootstrap((x,), np.mean, n_resamples=n_boot, batch=max(1, DRAWS_PER_BATCH // len(x)),
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_bootstrap(a, b, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> PairedDelta:
    """Δ = B − A on the same examples: each example's correctness is averaged over its method's seeds
    (the two may have different seed counts), Δ is the mean per-example difference and the interval a
    percentile bootstrap resampling examples. ``a``, ``b``: (seeds, examples) 0/1 arrays, or 1-D for one seed."""
    a, b = _pair(a, b)
    d = b.mean(axis=0) - a.mean(axis=0)
    if len(d) < 2:
        raise ValueError("paired_bootstrap needs at least 2 examples")
    low, high = _mean_interval(d, n_boot, seed, level)
    return PairedDelta(delta=float(d.mean()), low=low, high=high, n=len(d))


def mcnemar_exact(a, b) -> McNemar:
    """Exact two-sided McNemar test of one seed of A against one seed of B on the same examples:
    p = min(1, 2 · P[Binomial(b01 + b10, 1/2) ≤ min(b01, b10)]); p = 1 without discordant pairs."""
    a, b = _pair(a, b)
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError(f"mcnemar_exact compares one seed with one seed; got {a.shape[0]} and {b.shape[0]}")
    b01 = int(((a[0] == 0) & (b[0] == 1)).sum())
    b10 = int(((a[0] == 1) & (b[0] == 0)).sum())
    if b01 + b10 == 0:
        return McNemar(1.0, 0, 0)
    return McNemar(float(stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue), b01, b10)


def _wilcoxon(d: np.ndarray) -> tuple[float | None, str | None]:
    """Two-sided Wilcoxon signed-rank p of the cell Δs (zeros dropped, scipy's default), or None and why."""
    if len(d) < 2:
        return None, "Wilcoxon needs ≥ 2 cells"
    if not d.any():
        return None, "Wilcoxon undefined: every cell Δ is 0"
    return float(stats.wilcoxon(d).pvalue), None


def across_cells(deltas, lows, highs, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> CellSummary:
    """Summary of per-cell Δs (one per cell, with each cell's own interval from ``paired_bootstrap``):
    the mean Δ with a percentile-bootstrap interval resampling cells, the count of cells whose interval
    lies above 0 (wins), below 0 (losses) or contains 0 (ties), and the Wilcoxon signed-rank p."""
    d, lo, hi = (np.asarray(x, dtype=float).ravel() for x in (deltas, lows, highs))
    if not len(d) == len(lo) == len(hi):
        raise ValueError(f"deltas, lows, highs differ in length: {len(d)}, {len(lo)}, {len(hi)}")
    if len(d) == 0 or not np.isfinite(np.concatenate([d, lo, hi])).all():
        raise ValueError("across_cells needs at least one cell, with finite Δ and interval")
    notes = []
    low = high = None
    if len(d) >= 2:
        low, high = _mean_interval(d, n_boot, seed, level)
    else:
        notes.append("no interval over cells: 1 cell")
    p, why = _wilcoxon(d)
    notes += [why] if why else []
    wins, losses = int((lo > 0).sum()), int((hi < 0).sum())
    return CellSummary(mean=float(d.mean()), low=low, high=high, n=len(d), wins=wins, ties=len(d) - wins - losses,
                       losses=losses, wilcoxon_p=p, level=level, note="; ".join(notes) or None)


def mean_sd(values) -> MeanSD:
    """Mean and sample standard deviation (ddof=1) over seeds; sd is None for a single seed."""
    v = np.asarray(values, dtype=float).ravel()
    if len(v) == 0 or not np.isfinite(v).all():
        raise ValueError("mean_sd needs at least one finite value")
    return MeanSD(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))


def _plural(n: int, word: str, words: str) -> str:
    return f"{n} {word if n == 1 else words}"


def headline(method: str, baseline: str, summary: CellSummary) -> str:
    """'RA-MoE vs SFT: +0.9 points (95 % CI -1.2 to +3.0) over 12 cells; 1 significant win, 0 losses'.
    ``summary`` must come from Δs of ``method`` − ``baseline`` (baseline as A, method as B)."""
    ci = (f"{100 * summary.level:g} % CI {100 * summary.low:+.1f} to {100 * summary.high:+.1f}"
          if summary.low is not None else "no interval")
    return (f"{method} vs {baseline}: {100 * summary.mean:+.1f} points ({ci}) over {_plural(summary.n, 'cell', 'cells')}; "
            f"{_plural(summary.wins, 'significant win', 'significant wins')}, {_plural(summary.losses, 'loss', 'losses')}")
