"""Stage 2 pieces on hand-built arrays with known answers (expected values computed by hand)."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import entropy

from ramoe_ray import experts as experts_mod
from ramoe_ray import routing_stats, taxonomy
from ramoe_ray.cache import write_json_atomic
from ramoe_ray.experts import experts_artifact, run_experts
from ramoe_ray.routing_stats import (
    RULES,
    auto_band,
    divergence_curve,
    normalized_jsd,
    pooled_frequency,
    rise_select,
    sequence_importance,
    task_expert_scores,
    task_experts,
)

# ------------------------------------------------------------------------------- importance, frequency


def _batch():
    """1 MoE layer, 2 sequences of 3 positions, E = 4, k = 2. Sequence 0: 2 real tokens + padding;
    sequence 1: 1 real token with a tie in p."""
    probs = np.zeros((1, 2, 3, 4))
    probs[0, 0, 0] = [0.5, 0.3, 0.1, 0.1]  # top-2 {0, 1} -> [5/8, 3/8, 0, 0]
    probs[0, 0, 1] = [0.1, 0.2, 0.3, 0.4]  # top-2 {3, 2} -> [0, 0, 3/7, 4/7]
    probs[0, 0, 2] = [0.25, 0.25, 0.25, 0.25]  # padding: must be ignored
    probs[0, 1, 0] = [0.4, 0.2, 0.2, 0.2]  # tie among 1, 2, 3: lower id kept -> [2/3, 1/3, 0, 0]
    probs[0, 1, 1:] = [0.0, 0.0, 0.0, 1.0]  # padding
    selected = np.full((1, 2, 3, 2), -1)
    selected[0, 0, 0] = [0, 1]
    selected[0, 0, 1] = [1, 3]  # the model used {1, 3}, not the top-2 of p: frequency follows `selected`
    selected[0, 1, 0] = [0, 2]
    mask = np.array([[True, True, False], [True, False, False]])
    return probs, selected, mask


def test_importance_topk_renormalised_padding_ignored():
    probs, selected, mask = _batch()
    imp, freq = sequence_importance(probs, selected, mask, k=2)
    assert imp.shape == (2, 1, 4) and imp.dtype == np.float32
    expected0 = np.array([5 / 8, 3 / 8, 3 / 7, 4 / 7]) / 2
    np.testing.assert_allclose(imp[0, 0], expected0, rtol=1e-6)
    np.testing.assert_allclose(imp[1, 0], [2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(imp.sum(-1), 1.0, rtol=1e-6)


def test_frequency_uses_selected_and_rows_sum_to_k():
    probs, selected, mask = _batch()
    _, freq = sequence_importance(probs, selected, mask, k=2)
    np.testing.assert_allclose(freq[0, 0], [0.5, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(freq[1, 0], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(freq.sum(-1), 2.0)


def test_importance_accepts_torch_and_checks_shapes():
    probs, selected, mask = _batch()
    imp_t, freq_t = sequence_importance(torch.tensor(probs), torch.tensor(selected), torch.tensor(mask), k=2)
    imp_n, freq_n = sequence_importance(probs, selected, mask, k=2)
    np.testing.assert_array_equal(imp_t, imp_n)
    np.testing.assert_array_equal(freq_t, freq_n)
    with pytest.raises(ValueError, match="selected has shape"):
        sequence_importance(probs, selected, mask, k=3)
    with pytest.raises(ValueError, match="no real token"):
        sequence_importance(probs, selected, np.zeros((2, 3), bool), k=2)


def test_importance_torch_path_equals_numpy_path_with_ties_and_padding():
    """The taxonomy computes importance on the model's device (torch); the numpy path is the
    reference. Rounded probabilities make exact ties, which both break towards the lower id."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 7, 8, generator=g), -1).round(decimals=1)
    probs = probs / probs.sum(-1, keepdim=True)
    selected = torch.randint(0, 8, (3, 5, 7, 2), generator=g)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5, 6])[:, None]
    selected[:, ~mask] = -1
    imp_t, freq_t = sequence_importance(probs, selected, mask, k=2)
    imp_n, freq_n = sequence_importance(probs.numpy(), selected.numpy(), mask.numpy(), k=2)
    np.testing.assert_allclose(imp_t, imp_n, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(freq_t, freq_n)


# -------------------------------------------------------------------------------------- divergence


def test_normalized_jsd_identical_is_zero():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(normalized_jsd(p, p), [0.0, 0.0], atol=1e-12)


def test_normalized_jsd_hand_computed_two_experts():
    # P = [1, 0], Q = [1/2, 1/2], M = [3/4, 1/4]
    kl_pm = math.log(1 / 0.75)
    kl_qm = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    jsd = 0.5 * (kl_pm + kl_qm)
    h_p, h_q = 0.0, math.log(2)
    expected = jsd / (math.log(2) - 0.5 * (h_p + h_q))
    assert float(normalized_jsd([1.0, 0.0], [0.5, 0.5])) == pytest.approx(expected, rel=1e-9)
    assert float(normalized_jsd([1.0, 0.0], [0.0, 1.0])) == pytest.approx(1.0)  # disjoint one-hots: the maximum


def test_normalized_jsd_hand_computed_three_experts_and_symmetric():
    # P = [1/2, 1/2, 0], Q = [0, 1/2, 1/2]: JSD = 1/2 log 2, H(P) = H(Q) = log 2
    expected = 0.5 * math.log(2) / (math.log(3) - math.log(2))
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    assert float(normalized_jsd(p, q)) == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(8), size=(5, 3)), rng.dirichlet(np.ones(8), size=(5, 3))
    d = normalized_jsd(a, b)
    assert d.shape == (5, 3)
    np.testing.assert_allclose(d, normalized_jsd(b, a), rtol=1e-12)
    assert (d > 0).all() and (d <= 1).all()


def test_normalized_jsd_of_nearly_equal_rows_is_finite_and_equals_scipys_square():
    """Rows equal up to round-off: scipy's jensenshannon takes the square root of a slightly negative JSD and
    gives NaN (the full synthetic grid's stage 2 failed on it); ours is ~0. Elsewhere it is scipy's value squared."""
    from scipy.spatial.distance import jensenshannon

    p = np.array([0.12754847250006068, 0.19126629019515307, 0.0037155331935617257, 0.00042570314777804874,
                  0.10323885722476081, 0.30576063793039515, 0.12635747228992303, 0.14168703351836762])
    q = np.array([0.12754847249935694, 0.19126629019388763, 0.0037155331929384513, 0.00042570314781937473,
                  0.10323885722243578, 0.3057606379301764, 0.1263574722886771, 0.14168703351763534])
    with np.errstate(invalid="ignore"):
        assert np.isnan(jensenshannon(p, q))  # the failure this guards against
    d = normalized_jsd(p, q)
    assert np.isfinite(d) and 0.0 <= d < 1e-12
    rng = np.random.default_rng(1)
    a, b = rng.dirichlet(np.ones(8), size=50), rng.dirichlet(np.ones(8), size=50)
    denom = math.log(8) - 0.5 * (entropy(a, axis=-1) + entropy(b, axis=-1))
    np.testing.assert_allclose(normalized_jsd(a, b), jensenshannon(a, b, axis=-1) ** 2 / denom, rtol=1e-10)
    assert np.isnan(normalized_jsd(np.zeros(8), b[0]))  # an all-zero row stays NaN, as documented


def test_entropy_is_scipys_bit_for_bit():
    """normalized_jsd's entropies are scipy.stats.entropy's numbers (rows normalised again, the sum of entr), on
    raw and normalised rows and an all-zero row (NaN)."""
    rng = np.random.default_rng(2)
    raw = rng.random((40, 6, 8)) * 3
    raw[0, 0] = 0.0
    for rows in (raw, rng.dirichlet(np.ones(8), size=(40, 6)), rng.dirichlet(np.full(128, 0.1), size=300)):
        with np.errstate(invalid="ignore"):
            assert np.array_equal(routing_stats._entropy(rows), entropy(rows, axis=-1), equal_nan=True)


@pytest.mark.slow
def test_the_inference_path_does_not_import_scipy_stats():
    """scipy.stats costs ~1 s of every process that imports it (each Ray Data actor, trial process, CLI call);
    the routing statistics use scipy.special only."""
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import sys, ramoe_ray.inference, ramoe_ray.trial; "
                             "print('scipy.stats' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


def test_normalized_jsd_degenerate_uniform_is_zero():
    u = np.full(4, 0.25)
    assert float(normalized_jsd(u, u)) == 0.0  # denominator log 4 - log 4 = 0: defined as 0.0
    out = normalized_jsd(np.stack([u, [0.7, 0.1, 0.1, 0.1]]), np.stack([u, u]))
    assert out[0] == 0.0 and 0 < out[1] <= 1


def test_divergence_curve_averages_over_pairs():
    en = np.array([[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (N=2, L=2, E=2)
    tgt = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    # layer 0: pair 0 identical uniform (0, degenerate), pair 1 disjoint one-hots (1) -> 0.5; layer 1: 0
    np.testing.assert_allclose(divergence_curve(en, tgt), [0.5, 0.0], atol=1e-12)
    with pytest.raises(ValueError):
        divergence_curve(en, tgt[:1])


# --------------------------------------------------------------------------------------------- band


def test_auto_band_picks_the_trough():
    curve = [0.9, 0.6, 0.3, 0.1, 0.2, 0.5, 0.7, 0.9]  # w = 2; window means 0.45 .2 .15 .35 .6
    assert auto_band(curve, range(8), 8) == [3, 4]


def test_auto_band_excludes_first_and_last_moe_layer():
    curve = [0.0, 0.5, 0.5, 0.4, 0.45, 0.5, 0.5, 0.0]
    assert auto_band(curve, range(8), 8) == [3, 4]


def test_auto_band_ties_closest_to_middle_then_shallower():
    assert auto_band([0.3] * 8, range(8), 8) == [3, 4]  # centre exactly 0.5
    # n = 7, w = 2: windows [2, 3] and [3, 4] are equally off-centre (1/14) -> the shallower
    assert auto_band([0.3] * 7, range(7), 7) == [2, 3]


def test_auto_band_width_and_small_models():
    assert len(auto_band(np.linspace(0, 1, 10) ** 2, range(10), 10)) == 3  # 0.25 * 10 = 2.5 -> 3 (half up)
    assert auto_band([0.2, 0.1, 0.3], [1, 2, 3], 4) == [2]  # dense layer 0; interior is [2]
    assert auto_band([0.3, 0.1], [0, 1], 2) == [1]  # no interior: all layers are candidates
    assert auto_band([0.3], [0], 1) == [0]


# -------------------------------------------------------------------------------------- task experts


def test_task_experts_picks_planted_experts_and_breaks_ties_by_id():
    rng = np.random.default_rng(1)
    general = rng.dirichlet(np.ones(6), size=(4, 2))  # (N=4, L=2, E=6)
    base = general.mean(axis=0)
    bump = np.zeros((2, 6))
    bump[0, [4, 2]] = [0.2, 0.1]  # layer row 0: experts 4 then 2
    bump[1, [1, 3, 5]] = [0.1, 0.1, 0.1]  # layer row 1: a three-way tie
    task = np.stack([base + bump + d for d in (0.01, -0.01)])  # mean = base + bump
    np.testing.assert_allclose(task_expert_scores(task, general), bump, atol=1e-12)
    got = task_experts(task, general, [5, 6], {5: 0, 6: 1}, top_k=2)
    assert got == {5: [4, 2], 6: [1, 3]}
    assert task_experts(task, general, [6], {5: 0, 6: 1}, top_k=3) == {6: [1, 3, 5]}
    with pytest.raises(ValueError, match="not a MoE layer"):
        task_experts(task, general, [7], {5: 0, 6: 1}, top_k=2)


# ------------------------------------------------------------------------------------------ artefact


def test_experts_artifact_round_trips_and_writes_atomically(tmp_path):
    scores = np.arange(8, dtype=float).reshape(2, 4) / 10
    art = experts_artifact(
        moe_layers=[1, 2],
        band_spec=(0.375, 0.625),
        band_layers=[1],
        task_experts={1: [3, 2]},
        task_scores=scores,
        rise={"sw": {1: [0], 2: [1, 3]}},
        rise_settings={"budget": 3, "alpha": 10.0, "languages": ["en", "sw"]},
        divergence={"sw": np.array([0.25, 0.5])},
        provenance={"taxonomy": "abc123"},
    )
    path = write_json_atomic(tmp_path / "out" / "experts.json", art)
    back = json.loads(path.read_text())
    assert back["band"] == {"spec": [0.375, 0.625], "layers": [1]}
    assert back["task_experts"]["1"]["experts"] == [3, 2]
    assert back["task_experts"]["1"]["scores"] == pytest.approx([0.3, 0.2])
    assert back["rise"]["experts"]["sw"] == {"1": [0], "2": [1, 3]}
    assert back["rise"]["split"] == {"shallow": 1, "middle": 0, "deep": 2}  # zones [1] | [] | [2]
    assert back["rise"]["zones"] == {"shallow": [1], "middle": [], "deep": [2]}
    assert (back["rise"]["budget"], back["rise"]["alpha"], back["rise"]["languages"]) == (3, 10.0, ["en", "sw"])
    assert back["divergence"]["sw"] == {"1": 0.25, "2": 0.5}
    assert back["provenance"] == {"taxonomy": "abc123"}
    assert set(back["rules"]) == set(RULES)
    # a failed write leaves the old file whole and no temp file behind
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("nan")})
    assert json.loads(path.read_text()) == back
    assert [p.name for p in path.parent.iterdir()] == ["experts.json"]


# ------------------------------------------------------------------------------- the stage entry


def _run_cfg(make_config):
    return make_config(task="category", languages=("syn3", "syn5"), rise=dict(budget=6),
                       knobs=dict(bands=[[0.375, 0.625], "auto"], top_k=[2]))


def test_run_experts_agrees_with_its_taxonomy_artefacts(make_config):
    """experts.json, divergence.parquet and the figures, checked against the math applied by hand to
    the taxonomy artefacts the stage names in its provenance; a second call is a cache hit."""
    cfg = _run_cfg(make_config)
    m, t = cfg.models[0], cfg.tasks[0]
    path, hit = run_experts(cfg, m, t, "syn3", cfg.knobs.bands[0], 2, split="test", num_actors=0)
    assert not hit
    art = json.loads(path.read_text())
    plan = taxonomy.plan(cfg, m, t, ["syn3", "syn5"], "test", general=True)
    assert art["provenance"]["taxonomy"] == plan.keys and art["provenance"]["general"] == plan.general_key

    root = Path(cfg.cache_dir) / "taxonomy"
    tax = pd.read_parquet(root / plan.cell_keys["syn3"] / "taxonomy.parquet")
    en = tax[tax.language == "en"].sort_values("id")
    tg = tax[tax.language == "syn3"].sort_values("id")
    gen = taxonomy.routing_array(pd.read_parquet(root / plan.general_key / "rows.parquet"))
    imp_en = taxonomy.routing_array(en)
    layers = list(plan.shape.moe_layers)

    curve = divergence_curve(imp_en, taxonomy.routing_array(tg))
    div = pd.read_parquet(path.parent / "divergence.parquet")
    assert set(div.language) == {"syn3", "syn5"} and len(div) == 2 * len(layers)
    np.testing.assert_allclose(div[div.language == "syn3"].sort_values("layer").divergence, curve)
    assert ((div.divergence >= 0) & (div.divergence <= 1)).all()

    assert art["band"] == {"spec": [0.375, 0.625], "layers": [1]}  # 4 layers: centre 0.375 of layer 1 only
    correct = en.correct.to_numpy(bool)
    task_rows = imp_en[correct] if correct.any() else imp_en
    want = task_experts(task_rows, gen, [1], {l: j for j, l in enumerate(layers)}, top_k=2)
    assert {int(l): v["experts"] for l, v in art["task_experts"].items()} == want
    assert art["cell"]["task_examples"] == ("correct" if correct.any() else "all (no correct English example)")
    # RISE: pooled token frequencies of English and every language of the config, from the same artefacts
    freqs = {}
    for lang, key in (("en", plan.cell_keys["syn3"]), ("syn3", plan.cell_keys["syn3"]), ("syn5", plan.cell_keys["syn5"])):
        df = pd.read_parquet(root / key / "taxonomy.parquet")
        df = df[df.language == lang]
        freqs[lang] = pooled_frequency(taxonomy.routing_array(df, "frequency"), df.n_tokens.to_numpy())
    want_rise = rise_select(freqs, target="syn3", moe_layers=layers, num_layers=plan.shape.num_layers, budget=6)
    assert art["rise"]["experts"]["syn3"] == {str(l): v for l, v in want_rise.items()}
    assert art["rise"]["languages"] == ["en", "syn3", "syn5"] and art["rise"]["budget"] == 6
    assert set(art["rules"]) == set(RULES)

    for name in ("divergence.png", "importance.png"):
        png = (path.parent / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    auto, _ = run_experts(cfg, m, t, "syn3", "auto", 2, split="test", num_actors=0)
    auto_art = json.loads(auto.read_text())
    assert auto != path and auto_art["band"]["layers"] == auto_band(curve, layers, plan.shape.num_layers)
    assert run_experts(cfg, m, t, "syn3", cfg.knobs.bands[0], 2, split="test", num_actors=0) == (path, True)


def test_run_experts_logs_to_the_active_mlflow_run_only(make_config, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = _run_cfg(make_config)
    m, t = cfg.models[0], cfg.tasks[0]
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        run_experts(cfg, m, t, "syn3", "auto", 2, split="test", num_actors=0)  # no active run: nothing logged
        exp = mlflow.create_experiment("experts-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            path, hit = run_experts(cfg, m, t, "syn3", "auto", 2, split="test", num_actors=0)
        assert hit  # logged from the cache as well
        client = MlflowClient()
        where = "experts/m/category/syn3/auto-top2"
        logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(run.info.run_id, where)}
        assert set(logged) == {"experts.json", "divergence.parquet", "divergence.png", "importance.png"}
        assert all(size > 0 for size in logged.values())
        back = json.loads(Path(client.download_artifacts(run.info.run_id, f"{where}/experts.json", str(tmp_path))).read_text())
        assert back == json.loads(path.read_text())
        runs = client.search_runs([exp])
        assert len(runs) == 1  # the call outside the run created none
    finally:
        mlflow.set_tracking_uri(old)


def test_figures_of_the_same_inputs_are_drawn_once(tmp_path, monkeypatch):
    """Stage 2 draws a cell's importance figure and a band's divergence figure once per process: another top-k
    (same inputs) writes the same PNG bytes without drawing; another band draws its divergence figure only."""
    import matplotlib.figure

    drawn = []
    monkeypatch.setattr(experts_mod, "_PNGS", {})  # this process's memo, empty
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: drawn.append(1) or real(self, *a, **k))
    rng = np.random.default_rng(0)
    kw = dict(curves={"en": [0.0] * 4, "syn3": rng.random(4).tolist()}, moe_layers=[0, 1, 2, 3],
              en_importance=rng.random((4, 8)), tgt_importance=rng.random((4, 8)), language="syn3", title="m/t: band x")
    paths = {}
    for name, band in (("k1", [1, 2]), ("k2", [1, 2]), ("other", [2, 3])):
        (tmp_path / name).mkdir()
        before = len(drawn)
        paths[name] = experts_mod.experts_figures(tmp_path / name, band_layers=band, **kw)
        drawn_now = len(drawn) - before
        assert drawn_now == {"k1": 2, "k2": 0, "other": 1}[name], name
    for a, b in zip(paths["k1"], paths["k2"]):
        assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["other"][0].read_bytes() != paths["k1"][0].read_bytes()  # the band is shaded elsewhere
    assert paths["other"][1].read_bytes() == paths["k1"][1].read_bytes()  # the cell's importance: the same
