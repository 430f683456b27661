"""ramoe_ray.stats on constructed cases whose answers are known: a paired effect of exactly 6 points,
McNemar against scipy and a hand sum, seed averaging, wins / ties / losses, Wilcoxon against scipy."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from ramoe_ray.stats import CellSummary, across_cells, headline, mcnemar_exact, mean_sd, paired_bootstrap

N, B01, B10 = 1000, 80, 20  # B right and A wrong on 80 examples, the reverse on 20: Δ = +60 / 1000


def _known_pair(rng_seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One seed each, 1000 examples in shuffled order: 80 (A 0, B 1), 20 (A 1, B 0), 600 both right, 300 both wrong."""
    a = np.array([0] * B01 + [1] * B10 + [1] * 600 + [0] * 300)
    b = np.array([1] * B01 + [0] * B10 + [1] * 600 + [0] * 300)
    order = np.random.default_rng(rng_seed).permutation(N)
    return a[order], b[order]


def test_paired_bootstrap_known_effect_matches_the_paired_normal_interval():
    a, b = _known_pair()
    r = paired_bootstrap(a, b)
    assert r.delta == 0.06 and r.n == N
    # per-example d = b - a is +1 (80), -1 (20), 0 (900): Var(mean d) = ((b01 + b10)/n - Δ²)/n
    se = math.sqrt((B01 + B10) / N**2 - 0.06**2 / N)
    z = sps.norm.ppf(0.975)
    assert r.low == pytest.approx(0.06 - z * se, abs=0.002)
    assert r.high == pytest.approx(0.06 + z * se, abs=0.002)
    # an unpaired interval would be about twice as wide: the pairing is what makes it this narrow
    assert r.high - r.low < 1.2 * 2 * z * se


def test_paired_bootstrap_is_deterministic_given_its_seed_and_reverses_sign():
    a, b = _known_pair()
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    others = {paired_bootstrap(a, b, seed=s) for s in range(6)}  # intervals on the 0.001 grid: some coincide
    assert len(others) > 1 and all(o.low == pytest.approx(0.0408, abs=0.002) for o in others)
    rev = paired_bootstrap(b, a, seed=3)
    fwd = paired_bootstrap(a, b, seed=3)
    assert rev.delta == -fwd.delta
    assert (rev.low, rev.high) == pytest.approx((-fwd.high, -fwd.low), abs=0.002)


def test_paired_bootstrap_level_widens_the_interval():
    a, b = _known_pair()
    r95, r99 = paired_bootstrap(a, b), paired_bootstrap(a, b, level=0.99)
    assert r99.low < r95.low and r99.high > r95.high


def test_seeds_are_averaged_per_example_with_unequal_seed_counts():
    a = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])  # per example: 1, 1/3, 1/3, 0
    b = np.array([[0, 1, 1, 1]])                              # one seed (like steering)
    r = paired_bootstrap(a, b, n_boot=2000)
    assert r.n == 4  # examples, not seeds × examples
    assert r.delta == pytest.approx((-1 + 2 / 3 + 2 / 3 + 1) / 4)
    d = np.array([-1, 2 / 3, 2 / 3, 1])
    ref = sps.bootstrap((d,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(0))
    assert (r.low, r.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_repeating_a_seed_changes_nothing():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, (3, 200)), rng.integers(0, 2, (1, 200))
    r = paired_bootstrap(a, b, n_boot=2000)
    assert r.delta == pytest.approx(b.mean() - a.mean())
    assert paired_bootstrap(a, np.repeat(b, 5, axis=0), n_boot=2000) == r


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="1000 examples and b has 999"):
        paired_bootstrap(np.zeros(1000), np.zeros(999))
    with pytest.raises(ValueError, match="1000 examples and b has 999"):
        mcnemar_exact(np.zeros(1000), np.zeros(999))
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap([0.5, 1.0], [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap(np.zeros((0, 5)), np.zeros((1, 5)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        paired_bootstrap([1], [0])


def test_mcnemar_matches_scipy_and_the_hand_sum():
    a, b = _known_pair()
    p, b01, b10 = mcnemar_exact(a, b)
    assert (b01, b10) == (B01, B10)
    assert p == pytest.approx(sps.binomtest(20, 100, 0.5).pvalue, rel=1e-12)
    hand = 2 * Fraction(sum(math.comb(100, k) for k in range(21)), 2**100)  # 2 · P[Bin(100, ½) ≤ 20]
    assert p == pytest.approx(float(hand), rel=1e-9)
    assert 1e-10 < p < 1e-8  # ~ 1.1e-9: a clear effect
    assert mcnemar_exact(b, a) == (p, B10, B01)


def test_mcnemar_edge_cases():
    same = np.array([1, 0, 1, 1])
    assert mcnemar_exact(same, same) == (1.0, 0, 0)  # no discordant pair
    a, b = np.array([0] * 5 + [1] * 5), np.array([1] * 5 + [0] * 5)
    assert mcnemar_exact(a, b) == (1.0, 5, 5)  # 2 · cdf > 1 is capped at 1
    assert mcnemar_exact(a[None, :].astype(bool), b[None, :]) == (1.0, 5, 5)  # (1, n) and bool accepted
    with pytest.raises(ValueError, match="one seed"):
        mcnemar_exact(np.stack([a, a]), b)


DELTAS = [0.05, 0.02, -0.03, 0.0, 0.01, 0.04]
LOWS = [0.01, -0.01, -0.05, -0.02, 0.0, 0.001]
HIGHS = [0.09, 0.05, -0.01, 0.02, 0.02, 0.08]


def test_across_cells_counts_significant_wins_and_losses():
    s = across_cells(DELTAS, LOWS, HIGHS)
    # wins: low > 0 (cells 0 and 5; cell 4's low is exactly 0, a tie); losses: high < 0 (cell 2)
    assert (s.wins, s.ties, s.losses, s.n) == (2, 3, 1, 6)
    assert s.mean == pytest.approx(np.mean(DELTAS))
    assert s.wilcoxon_p == pytest.approx(sps.wilcoxon(DELTAS).pvalue)
    assert s.note is None and s.level == 0.95


def test_across_cells_interval_resamples_cells():
    d = np.random.default_rng(5).normal(0.01, 0.02, 12)
    s = across_cells(d, d - 0.01, d + 0.01)
    rng = np.random.default_rng(123)  # an independent resampling
    ref = np.percentile(d[rng.integers(0, 12, (20000, 12))].mean(axis=1), [2.5, 97.5])
    se = d.std() / math.sqrt(12)
    assert (s.low, s.high) == pytest.approx(tuple(ref), abs=0.1 * se)
    assert s.low < s.mean < s.high


def test_across_cells_degenerate_cases():
    one = across_cells([0.02], [0.01], [0.03])
    assert (one.low, one.high, one.wilcoxon_p, one.wins) == (None, None, None, 1)
    assert "1 cell" in one.note and "≥ 2 cells" in one.note
    zeros = across_cells([0.0, 0.0, 0.0], [-0.01] * 3, [0.01] * 3)
    assert zeros.wilcoxon_p is None and "every cell Δ is 0" in zeros.note
    assert (zeros.mean, zeros.low, zeros.high, zeros.ties) == (0.0, 0.0, 0.0, 3)
    with pytest.raises(ValueError, match="differ in length"):
        across_cells([0.1, 0.2], [0.0], [0.3, 0.4])
    with pytest.raises(ValueError, match="at least one cell"):
        across_cells([], [], [])
    with pytest.raises(ValueError, match="finite"):
        across_cells([0.1, float("nan")], [0.0, 0.0], [0.2, 0.2])


def test_mean_sd():
    m = mean_sd([0.5, 0.6, 0.7])
    assert m.mean == pytest.approx(0.6) and m.sd == pytest.approx(0.1) and m.n == 3  # ddof = 1
    assert mean_sd([0.42]) == (0.42, None, 1)
    with pytest.raises(ValueError):
        mean_sd([])


def test_headline_text():
    s = CellSummary(mean=0.009, low=-0.012, high=0.030, n=12, wins=1, ties=11, losses=0, wilcoxon_p=0.4,
                    level=0.95, note=None)
    assert headline("RA-MoE", "SFT", s) == \
        "RA-MoE vs SFT: +0.9 points (95 % CI -1.2 to +3.0) over 12 cells; 1 significant win, 0 losses"
    one = across_cells([-0.02], [-0.03], [-0.01])
    assert headline("RA-MoE", "RISE", one) == \
        "RA-MoE vs RISE: -2.0 points (no interval) over 1 cell; 0 significant wins, 1 loss"


def test_headline_sign_is_method_minus_baseline():
    sft, ramoe = _known_pair()  # ramoe is right on 60 more examples
    cell = paired_bootstrap(sft, ramoe)
    text = headline("RA-MoE", "SFT", across_cells([cell.delta] * 3, [cell.low] * 3, [cell.high] * 3))
    assert text.startswith("RA-MoE vs SFT: +6.0 points") and "3 significant wins, 0 losses" in text
