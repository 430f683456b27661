"""ramoe report: a real sqlite MLflow store holding a fake sweep (parent + trials with the sweep's
schema: grid trials, the selected configuration of each trained method retrained with a second seed,
test predictions per example with constructed effects), read back by ramoe_ray.report. The numbers are
recomputed here, from mlflow.search_runs and from the correctness arrays the fixture constructed."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
from matplotlib.container import ErrorbarContainer  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy import stats  # noqa: E402

from ramoe_ray import report as rreport  # noqa: E402
from ramoe_ray import stats as rstats  # noqa: E402
from ramoe_ray.cli import main  # noqa: E402
from ramoe_ray.config import ConfigError, RiseConfig, config_from_dict  # noqa: E402
from ramoe_ray.report import NA_CORR, build_report, draw_scatter  # noqa: E402

MODELS = {"m1": {"tasks": ["arith", "passage"], "moe_layers": [1, 2, 3], "band": [2]},
          "m2": {"tasks": ["arith"], "moe_layers": [0, 1, 2, 3], "band": [1, 2]}}
LANGS = ["syn2", "syn4", "syn6"]
SEEDS = ["7", "8"]  # training.seeds; steering children have seed "none"
N_EX = 200
IDS = [f"ex{i:03d}" for i in range(N_EX)]
MISSING = ("m2", "arith", "syn6")  # its only RA-MoE trial failed
KNOWN = ("m1", "arith", "syn2")  # per seed RA-MoE right on 40 examples SFT got wrong, wrong on 10 it got right: +30
LOSS = ("m1", "arith", "syn6")  # -24 examples per seed
ONE_SFT_SEED = ("m2", "arith", "syn2")  # the SFT replicate (seed 8) failed
NO_RISE_PREDICTIONS = ("m2", "arith", "syn4")  # the RISE replicate has no predictions artefact
# per cell: ci proportion and (examples RA-MoE gets right and SFT wrong, the reverse), the same for each seed
EFFECTS = {("m1", "arith", "syn2"): (0.45, 40, 10), ("m1", "arith", "syn4"): (0.20, 10, 10),
           ("m1", "arith", "syn6"): (0.05, 6, 30), ("m1", "passage", "syn2"): (0.40, 30, 6),
           ("m1", "passage", "syn4"): (0.15, 9, 8), ("m1", "passage", "syn6"): (0.30, 12, 9),
           ("m2", "arith", "syn2"): (0.35, 20, 8), ("m2", "arith", "syn4"): (0.25, 14, 10),
           ("m2", "arith", "syn6"): (0.10, 0, 0)}
PNG = b"\x89PNG\r\n\x1a\n"


def _config(uri, out, name="rep", experiment="exp"):
    return config_from_dict(dict(
        name=name, languages=LANGS, output_dir=str(out), tracking={"mlflow_uri": uri, "experiment": experiment},
        training={"seeds": [int(s) for s in SEEDS]},
        models=[{"name": "m1", "family": "olmoe", "path": "synthetic:olmoe"},
                {"name": "m2", "family": "qwen3_moe", "path": "synthetic:qwen3_moe"}],
        tasks=[{"name": "arith", "format": "generative_numeric", "source": "synthetic:arith"},
               {"name": "passage", "format": "passage_multiple_choice", "source": "synthetic:passage"}]))


def _child(client, exp, parent, *, model, task, lang, method, key, selected, val, test=None, divs=None,
           params=None, status="FINISHED", error=None, ci=0.0, seed="7", replicate_of=None):
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, "ramoe.kind": "trial", "model": model, "task": task, "language": lang,
            "method": method, "trial_key": key, "selected": "true" if selected else "false"}
    if error:
        tags["error"] = error
    if replicate_of:
        tags["ramoe.replicate_of"] = replicate_of
    run = client.create_run(exp, tags=tags, run_name=key)
    metrics = {"val_acc": val, "val_acc_en": 0.9, "ci_proportion": ci, "routing_kl_ci": 0.1, "routing_kl_ci_base": 0.2}
    if test is not None:
        metrics.update(test_acc=test, test_acc_en=0.95)
    for layer, d in (divs or {}).items():
        metrics[f"test_div_L{layer}"] = d
    p = {"lam": "0.0", "band": "auto", "top_k": "2", "strength": "0.0",
         "seed": "none" if method == "steering" else seed} | (params or {})
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in p.items()], tags=[])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _log_json(client, run_id, tmp, name, obj, artifact_path=None):
    f = tmp / name
    f.write_text(json.dumps(obj) if name.endswith(".json") else yaml.safe_dump(obj))
    client.log_artifact(run_id, str(f), artifact_path)


def _log_predictions(client, run_id, tmp, lang, correct, reverse=False):
    """test/predictions.json as the sweep logs it (``reverse``: the ids out of order, to check alignment by id)."""
    order = list(range(N_EX))[::-1] if reverse else list(range(N_EX))
    obj = {"language": lang, "ids": [IDS[i] for i in order], "correct": [int(correct[i]) for i in order],
           "predictions": [str(int(correct[i])) for i in order], "answers": ["1"] * N_EX}
    (tmp / run_id).mkdir()
    _log_json(client, run_id, tmp / run_id, "predictions.json", obj, "test")


def _flip(rng, x, up, down):
    """x with ``up`` of its wrong examples made right and ``down`` of its right ones made wrong."""
    y = x.copy()
    y[rng.choice(np.flatnonzero(x == 0), up, replace=False)] = 1
    y[rng.choice(np.flatnonzero(x == 1), down, replace=False)] = 0
    return y


def _correctness(rng, cell):
    """method -> {seed: 0/1 correctness over IDS}: SFT's seed 8 is seed 7 with 8 examples made right and 3
    wrong; RA-MoE is each SFT seed with the cell's EFFECTS; RISE each SFT seed with 6 up, 4 down; steering (no
    seed) SFT seed 7 with 7 up, 5 down."""
    _, up, down = EFFECTS[cell]
    sft7 = (rng.random(N_EX) < rng.uniform(0.3, 0.5)).astype(int)
    sft = {"7": sft7, "8": _flip(rng, sft7, 8, 3)}
    return {"sft": sft, "ramoe": {s: _flip(rng, sft[s], up, down) for s in SEEDS},
            "rise": {s: _flip(rng, sft[s], 6, 4) for s in SEEDS}, "steering": {"none": _flip(rng, sft7, 7, 5)}}


def _method_runs(client, exp, parent, tmp, cell, method, by_seed, ci, layers, base_div):
    """The selected trial (first seed), its replicates, a decoy; returns (trials logged, failed)."""
    model, task, lang = cell
    k = f"{model}-{task}-{lang}-{method}"
    common = dict(model=model, task=task, lang=lang, method=method, ci=ci)
    if cell == MISSING and method == "ramoe":
        _child(client, exp, parent, **common, key=k + "-0", selected=False, val=0.0, status="FAILED",
               error="RuntimeError: worker died\n|trace")
        return 1, 1
    n, failed = 0, 0
    for i, (seed, x) in enumerate(by_seed.items()):
        if i and cell == ONE_SFT_SEED and method == "sft":
            _child(client, exp, parent, **common, key=f"{k}-0@{seed}", selected=False, val=0.6, status="FAILED",
                   error="OOM", seed=seed, replicate_of=k + "-0")
            n, failed = n + 1, failed + 1
            continue
        divs = {l: d * 0.5 for l, d in zip(layers, base_div)} if method == "ramoe" else None
        rid = _child(client, exp, parent, **common, key=f"{k}-0@{seed}" if i else k + "-0", selected=i == 0, val=0.6, test=x.mean(), divs=divs,
                     params={"lam": "0.5", "band": "0.375-0.625"}, seed=seed, replicate_of=(k + "-0") if i else None)
        if not (i and cell == NO_RISE_PREDICTIONS and method == "rise"):
            _log_predictions(client, rid, tmp, lang, x, reverse=(cell == KNOWN and method == "ramoe" and i == 1))
        n += 1
    # a decoy: lower validation accuracy, higher test accuracy, not selected, no replicates
    _child(client, exp, parent, **common, key=k + "-1", selected=False, val=0.5,
           test=min(1.0, float(by_seed[next(iter(by_seed))].mean()) + 0.2), divs={l: 0.99 for l in layers},
           params={"lam": "1.0"})
    return n + 1, failed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The sqlite store: sweep 'rep' (a partial sweep of its 2 models x 2 tasks x 3 languages: m2/passage
    never ran; 4 methods, 2 seeds, decoys, a failed trial and a failed replicate, one cell without RA-MoE, one
    replicate without predictions), a later sweep 'other' (2 cells, no resolved config, no predictions) and
    an experiment without any sweep. ``truth``: the correctness arrays behind every logged test run."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(tmp / "artifacts").as_uri())
    empty = client.create_experiment("empty", artifact_location=(tmp / "artifacts-empty").as_uri())
    client.set_terminated(client.create_run(empty, tags={"ramoe.kind": "trial"}).info.run_id)
    cfg = _config(uri, tmp / "runs")

    rng = np.random.default_rng(3)
    parent = client.create_run(exp, tags={"ramoe.kind": "sweep", "ramoe.sweep": "rep"}, run_name="sweep").info.run_id
    cells, truth, n_trials, n_failed = [], {}, 0, 0
    for model, spec in MODELS.items():
        layers = spec["moe_layers"]
        for task in spec["tasks"]:
            for lang in LANGS:
                cell = (model, task, lang)
                ci = EFFECTS[cell][0]
                base_div = rng.uniform(0.2, 0.6, len(layers)).round(4).tolist()
                cells.append({"model": model, "task": task, "language": lang, "family": "olmoe", "ci_proportion": ci,
                              "categories": {"cc": 10, "ci": 5, "ic": 2, "ii": 3}, "n_train": 20,
                              "moe_layers": layers, "band_layers": spec["band"], "divergence_base": base_div})
                truth[cell] = _correctness(rng, cell)
                for method, by_seed in truth[cell].items():
                    n, f = _method_runs(client, exp, parent, tmp, cell, method, by_seed, ci, layers, base_div)
                    n_trials, n_failed = n_trials + n, n_failed + f
    client.log_param(parent, "ramoe.expected_trials", n_trials)
    _log_json(client, parent, tmp, "cells.json", cells, "cells")
    _log_json(client, parent, tmp, "config.resolved.yaml", cfg.model_dump(mode="json"))

    other = client.create_run(exp, tags={"ramoe.kind": "sweep", "ramoe.sweep": "other"}).info.run_id
    other_cells = []
    for lang in LANGS[:2]:
        other_cells.append({"model": "m1", "task": "arith", "language": lang, "ci_proportion": 0.2, "moe_layers": [1],
                            "band_layers": [1], "divergence_base": [0.4]})
        for method, a in (("sft", 0.3), ("ramoe", 0.4)):
            _child(client, exp, other, model="m1", task="arith", lang=lang, method=method, key=f"o-{lang}-{method}",
                   selected=True, val=0.5, test=a, divs={1: 0.2}, ci=0.2)
    (tmp / "other").mkdir()
    _log_json(client, other, tmp / "other", "cells.json", other_cells, "cells")  # no resolved config
    return {"uri": uri, "tmp": tmp, "cfg": cfg, "parent": parent, "other": other, "client": client, "exp": exp,
            "n_trials": n_trials, "n_failed": n_failed, "truth": truth}


@pytest.fixture(scope="module")
def report(store):
    return build_report(store["cfg"], out_dir=store["tmp"] / "report")  # the default: newest sweep named 'rep'


def _search(store, run_id=None):
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])
    try:
        return mlflow.search_runs(experiment_ids=[store["exp"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id or store['parent']}'")
    finally:
        mlflow.set_tracking_uri(old)


def _selected_from_search(store, run_id=None):
    """(model, task, language, method) -> the selected finished trial's row, via mlflow.search_runs."""
    df = _search(store, run_id)
    df = df[(df["tags.selected"] == "true") & (df["status"] == "FINISHED")]
    return {(r["tags.model"], r["tags.task"], r["tags.language"], r["tags.method"]): r for _, r in df.iterrows()}


def _seed_accs_from_search(store):
    """(model, task, language, method) -> test_acc of the selected trial and of each finished replicate
    (tag ramoe.replicate_of = the selected trial's trial_key), via mlflow.search_runs."""
    df = _search(store)
    df = df[df["status"] == "FINISHED"]
    out = {}
    for key, r in _selected_from_search(store).items():
        reps = df[df.get("tags.ramoe.replicate_of", "") == r["tags.trial_key"]]
        out[key] = [r["metrics.test_acc"], *reps["metrics.test_acc"]]
    return out


def _matrices(store, cell, baseline):
    """(A, B): the fixture's correctness of the baseline's and RA-MoE's logged test runs, seeds x examples."""
    t = store["truth"][cell]
    base = {s: x for s, x in t[baseline].items() if not (cell == ONE_SFT_SEED and baseline == "sft" and s == "8")}
    return np.array(list(base.values()), dtype=float), np.array(list(t["ramoe"].values()), dtype=float)


def _paired_cells(store, baseline):
    """The cells where RA-MoE and ``baseline`` both have test predictions."""
    return [c for c in EFFECTS if c != MISSING and not (c == NO_RISE_PREDICTIONS and baseline == "rise")]


def test_table_mean_sd_over_seeds_and_delta_match_search_runs(store, report):
    accs = _seed_accs_from_search(store)
    assert report["sweep"]["run_id"] == store["parent"]
    assert len(report["cells"]) == 12  # the resolved config's grid: m2/passage was never run (all "—")
    assert all(v is None for k, r in report["cells"].items() if k[:2] == ("m2", "passage")
               for v in (r["sft"], r["ramoe"], r["delta"]))
    for (m, t, l), row in report["cells"].items():
        for method in ("sft", "steering", "rise", "ramoe"):
            a = accs.get((m, t, l, method))
            if a is None:
                assert row[method] is None
                continue
            assert len(row[f"{method}_seeds"]) == len(a)
            assert row[method] == pytest.approx(np.mean(a))
            assert row[f"{method}_sd"] == (pytest.approx(np.std(a, ddof=1)) if len(a) > 1 else None)
        if (m, t, l, "ramoe") in accs and (m, t, l, "sft") in accs:
            expected = 100 * (np.mean(accs[(m, t, l, "ramoe")]) - np.mean(accs[(m, t, l, "sft")]))
            assert row["delta"] == pytest.approx(expected)
        else:
            assert row["delta"] is None
    # seeds: two per trained method, one for steering, one where the SFT replicate failed
    assert [len(accs[KNOWN + (x,)]) for x in ("sft", "steering", "rise", "ramoe")] == [2, 1, 2, 2]
    assert len(accs[ONE_SFT_SEED + ("sft",)]) == 1
    assert np.std(accs[KNOWN + ("sft",)], ddof=1) == pytest.approx(0.025 / math.sqrt(2))  # seed 8: 5 more right
    # the decoys (not selected, higher test accuracy) were ignored: the values are those of the selected trials
    row = report["cells"][KNOWN]
    assert row["ramoe"] == pytest.approx(np.mean([x.mean() for x in store["truth"][KNOWN]["ramoe"].values()]))
    assert row["ramoe_params"]["lam"] == "0.5"
    md = report["markdown"]
    s, ra = accs[("m1", "passage", "syn4", "sft")], accs[("m1", "passage", "syn4", "ramoe")]
    st = accs[("m1", "passage", "syn4", "steering")]
    ci = report["cells"][("m1", "passage", "syn4")]["ci_proportion"]
    section = md.split("### m1 / passage")[1].split("###")[0]
    line = next(x for x in section.splitlines() if x.startswith("| syn4 |"))
    assert line.startswith(f"| syn4 | {100 * np.mean(s):.1f} ± {100 * np.std(s, ddof=1):.1f} | {100 * st[0]:.1f} |")
    assert f"| {100 * np.mean(ra):.1f} ± {100 * np.std(ra, ddof=1):.1f} | " \
           f"{100 * (np.mean(ra) - np.mean(s)):+.1f} | {ci:.3f} |" in line
    one = next(x for x in md.split("### m2 / arith")[1].splitlines() if x.startswith("| syn2 |"))
    assert one.startswith(f"| syn2 | {100 * accs[ONE_SFT_SEED + ('sft',)][0]:.1f} (1 seed) |")
    assert "retrained with each other seed (training.seeds = 7, 8: mean ± sample sd" in md
    assert "### m1 / passage" in md and "### m2 / arith" in md
    assert f"{store['n_trials'] - store['n_failed']} finished, {store['n_failed']} failed" in md
    assert "| m2/arith/syn2 | sft (seed 8 replicate) | OOM |" in md  # the failed replicate, in the failed table


def test_correlations_equal_scipy_on_search_runs(store, report):
    accs = _seed_accs_from_search(store)
    sel = _selected_from_search(store)
    cells = json.loads((store["tmp"] / "report" / "report.json").read_text())["cells"]
    keys = sorted({k[:3] for k in accs if k[:3] + ("ramoe",) in accs and k[:3] + ("sft",) in accs})
    x = np.array([sel[k + ("ramoe",)]["metrics.ci_proportion"] for k in keys])
    y = np.array([100 * (np.mean(accs[k + ("ramoe",)]) - np.mean(accs[k + ("sft",)])) for k in keys])
    assert len(keys) == 8 and report["pearson"]["n"] == 8
    assert report["pearson"]["r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert report["spearman"]["r"] == pytest.approx(stats.spearmanr(x, y).statistic)
    for c in (report["pearson"], report["spearman"]):
        assert -1 <= c["low"] <= c["r"] <= c["high"] <= 1
    assert report["pearson"]["r"] > 0.5  # the constructed gains grow with the ci proportion
    assert f"{report['pearson']['r']:.3f}" in report["markdown"]
    assert "bootstrap, 2000 paired resamples" in report["markdown"]
    assert set(cells) == {"/".join(k) for k in report["cells"]}  # report.json holds the same cells


def _mcnemar_by_hand(a, b):
    """(b01, b10, exact two-sided p): A wrong and B right, the reverse; scipy's binomial test."""
    b01, b10 = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    return b01, b10, (1.0 if b01 + b10 == 0 else stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue)


def test_known_effect_delta_interval_and_mcnemar(report):
    """KNOWN: per seed RA-MoE is right on 40 examples SFT missed and wrong on 10 it got: Δ = +30 / 200."""
    c = report["cells"][KNOWN]["vs"]["sft"]
    assert c["available"] and c["n"] == N_EX and c["seeds"] == [2, 2]
    assert c["delta"] == pytest.approx(15.0)
    p_hand = 2 * sum(math.comb(50, k) for k in range(11)) / 2 ** 50  # 2 P[Binomial(50, ½) ≤ 10]
    assert [(m["ramoe_seed"], m["baseline_seed"], m["b01"], m["b10"]) for m in c["mcnemar"]] == \
        [("7", "7", 40, 10), ("8", "8", 40, 10)]  # seed 8's ids were logged in reverse order: aligned by id
    assert all(m["p"] == pytest.approx(p_hand, rel=1e-9) for m in c["mcnemar"])
    assert c["low"] > 0 and c["mark"] == "▲"
    loss = report["cells"][LOSS]["vs"]["sft"]
    assert loss["delta"] == pytest.approx(-12.0) and loss["high"] < 0 and loss["mark"] == "▼"
    table = report["markdown"].split("### RA-MoE vs SFT")[1].split("###")[0]
    line = next(x for x in table.splitlines() if x.startswith("| m1/arith/syn2 |"))
    assert f"| 200 | 2 / 2 | +15.0 ▲ | [{c['low']:+.1f}, {c['high']:+.1f}] | 7: {p_hand:.2g} (+40/−10); 8: " in line
    assert "| m1/arith/syn6 | 200 | 2 / 2 | -12.0 ▼ |" in table
    row = next(x for x in report["markdown"].split("### m1 / arith")[1].splitlines() if x.startswith("| syn2 |"))
    assert "| +15.0 ▲ |" in row
    saved = json.loads(Path(report["paths"]["json"]).read_text())  # report.json carries the same numbers
    assert saved["cells"]["/".join(KNOWN)]["vs"]["sft"] == json.loads(json.dumps(c))
    assert saved["headline"] == report["headline"] and set(saved["paired"]["summary"]) == {"sft", "steering", "rise"}


@pytest.mark.parametrize("baseline", ["sft", "steering", "rise"])
def test_every_cell_delta_interval_and_mcnemar_equal_a_recomputation(store, report, baseline):
    z = stats.norm.ppf(0.975)
    for cell in _paired_cells(store, baseline):
        a, b = _matrices(store, cell, baseline)
        c = report["cells"][cell]["vs"][baseline]
        d = b.mean(axis=0) - a.mean(axis=0)  # per example, seeds averaged: the bootstrap resamples these
        assert c["delta"] == pytest.approx(100 * d.mean(), abs=1e-9)
        assert c["delta"] == pytest.approx(100 * (b.mean() - a.mean()), abs=1e-9)  # = difference of seed means
        se = 100 * d.std() / math.sqrt(N_EX)
        assert c["low"] == pytest.approx(c["delta"] - z * se, abs=0.75)
        assert c["high"] == pytest.approx(c["delta"] + z * se, abs=0.75)
        assert c["high"] - c["low"] == pytest.approx(2 * z * se, rel=0.1)
        ref = rstats.paired_bootstrap(a, b)
        assert (c["low"], c["high"]) == pytest.approx((100 * ref.low, 100 * ref.high), abs=1e-9)
        if baseline == "steering":  # no seed: every RA-MoE seed against its one run
            pairs = [(0, 0), (0, 1)]
        else:
            pairs = [(0, 0)] if cell == ONE_SFT_SEED and baseline == "sft" else [(0, 0), (1, 1)]
        got = [(m["b01"], m["b10"], m["p"]) for m in c["mcnemar"]]
        want = [_mcnemar_by_hand(a[i], b[j]) for i, j in pairs]
        assert got == [pytest.approx(w, rel=1e-12) for w in want], cell
        assert [m["ramoe_seed"] for m in c["mcnemar"]] == [SEEDS[j] for _, j in pairs]


@pytest.mark.parametrize("baseline", ["sft", "steering", "rise"])
def test_across_cells_wins_wilcoxon_and_headline(store, report, baseline):
    cells = _paired_cells(store, baseline)
    deltas, signs = [], []
    for cell in cells:
        a, b = _matrices(store, cell, baseline)
        ref = rstats.paired_bootstrap(a, b)
        deltas.append((b.mean(axis=0) - a.mean(axis=0)).mean())
        signs.append(1 if ref.low > 0 else -1 if ref.high < 0 else 0)
    deltas = np.array(deltas)
    s = report["paired"]["summary"][baseline]
    assert s["cells"] == len(cells)
    assert s["mean"] == pytest.approx(100 * deltas.mean())
    assert (s["wins"], s["ties"], s["losses"]) == (signs.count(1), signs.count(0), signs.count(-1))
    assert s["wilcoxon_p"] == pytest.approx(stats.wilcoxon(deltas).pvalue)
    boot = stats.bootstrap((deltas,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                           rng=np.random.default_rng(0))
    assert (s["low"], s["high"]) == pytest.approx((100 * boot.confidence_interval.low,
                                                   100 * boot.confidence_interval.high))
    if baseline == "sft":  # the constructed effects: KNOWN and m1/passage/syn2 up, LOSS down
        assert signs[list(EFFECTS).index(KNOWN)] == 1 and signs[list(EFFECTS).index(LOSS)] == -1
        assert signs.count(1) >= 2 and signs.count(0) >= 3
    label = {"sft": "SFT", "steering": "Steering", "rise": "RISE"}[baseline]
    line = next(h for h in report["headline"] if h.startswith(f"RA-MoE vs {label}:"))
    m = re.fullmatch(rf"RA-MoE vs {label}: ([+-]\d+\.\d) points \(95 % CI ([+-]\d+\.\d) to ([+-]\d+\.\d)\) over "
                     r"(\d+) cells; (\d+) significant wins?, (\d+) loss(?:es)?", line)
    assert m, line
    assert m.groups() == (f"{100 * deltas.mean():+.1f}", f"{100 * boot.confidence_interval.low:+.1f}",
                          f"{100 * boot.confidence_interval.high:+.1f}", str(len(cells)), str(signs.count(1)),
                          str(signs.count(-1)))
    top = report["markdown"].split("## ")[0]  # the headline sits above every section
    assert f"- **{line}**" in top
    section = report["markdown"].split(f"### RA-MoE vs {label}")[1].split("###")[0]
    w, t, lo = signs.count(1), signs.count(0), signs.count(-1)
    assert (f"- across {len(cells)} cells: mean Δ {100 * deltas.mean():+.1f} points (95 % CI "
            f"[{100 * boot.confidence_interval.low:+.1f}, {100 * boot.confidence_interval.high:+.1f}]); "
            f"{w} significant win{'s' * (w != 1)}, {t} tie{'s' * (t != 1)}, {lo} significant loss{'es' * (lo != 1)}; "
            f"Wilcoxon signed-rank p = {stats.wilcoxon(deltas).pvalue:.2g}") in section


def test_cell_without_predictions_is_unavailable_and_left_out(report):
    c = report["cells"][NO_RISE_PREDICTIONS]["vs"]
    assert c["sft"]["available"] and not c["rise"]["available"]
    assert "no test/predictions.json artefact" in c["rise"]["note"]
    assert report["paired"]["summary"]["rise"]["unavailable"] == ["/".join(NO_RISE_PREDICTIONS)]
    table = report["markdown"].split("### RA-MoE vs RISE")[1].split("###")[0]
    line = next(x for x in table.splitlines() if x.startswith("| m2/arith/syn4 |"))
    assert "unavailable: no test/predictions.json artefact" in line
    assert "left out: m2/arith/syn4" in table
    assert "/".join(MISSING) not in table  # no RA-MoE result: no row at all


def test_scatter_draws_each_cells_interval_as_error_bars(store, report):
    fig = draw_scatter(report)
    ax = fig.axes[0]
    bars = []
    for cont in ax.containers:
        if isinstance(cont, ErrorbarContainer):
            bars += [(seg[0][0], seg[0][1], seg[1][1]) for seg in cont.lines[2][0].get_segments()]
    want = []
    for cell in _paired_cells(store, "sft"):
        a, b = _matrices(store, cell, "sft")
        ref = rstats.paired_bootstrap(a, b)
        want.append((EFFECTS[cell][0], 100 * ref.low, 100 * ref.high))
    assert len(bars) == len(want) == 8 and np.allclose(sorted(bars), sorted(want))
    assert "Δ test accuracy, RA-MoE − SFT (points, mean over seeds)" == ax.get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_partial_cell_shows_dash_and_is_left_out_of_the_scatter(report):
    row = report["cells"][MISSING]
    assert row["ramoe"] is None and row["delta"] is None and row["sft"] is not None
    md = report["markdown"]
    section = md.split("### m2 / arith")[1].split("###")[0]
    line = next(x for x in section.splitlines() if x.startswith("| syn6 |"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[4] == "—" and cols[5] == "—" and cols[1] != "—"  # RA-MoE and Δ
    assert MISSING not in {(p["model"], p["task"], p["language"]) for p in report["scatter"]["points"]}
    assert report["partial"] and "partial sweep" in md and "m2/arith/syn6 ramoe" in md
    assert "m2/passage/syn4 (all methods)" in md
    assert "worker died \\|trace" in md  # the failed trial and its error, one line


def test_figures_and_artifacts_logged_to_the_parent(store, report):
    paths = report["paths"]
    assert set(paths["divergence"]) == {"m1", "m2"}
    for p in [paths["scatter"], paths["delta"], *paths["divergence"].values()]:
        data = open(p, "rb").read()
        assert data[:8] == PNG and len(data) > 1000
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert {"report/report.md", "report/scatter.png", "report/delta.png", "report/divergence_m1.png",
            "report/divergence_m2.png"} <= logged
    assert "![Δ per cell](delta.png)" in report["markdown"]
    # divergence: mean over tasks of the selected RA-MoE trials (0.5 x base), the decoys (0.99) ignored
    div = report["divergence"]["m1"]
    assert div["layers"] == [1, 2, 3]
    assert np.allclose(div["ramoe"]["syn2"], 0.5 * np.array(div["base"]["syn2"]))
    assert "syn6" not in report["divergence"]["m2"]["ramoe"] and "syn6" in report["divergence"]["m2"]["base"]


def test_explicit_sweep_with_too_few_cells(store, tmp_path):
    rep = build_report(store["cfg"], sweep_run_id=store["other"], out_dir=tmp_path)
    assert rep["sweep"]["name"] == "other" and len(rep["cells"]) == 2
    assert rep["pearson"]["r"] is None and f"Pearson r: {NA_CORR}" in rep["markdown"]
    assert rep["cells"][("m1", "arith", "syn2")]["delta"] == pytest.approx(10.0)
    assert (tmp_path / "scatter.png").read_bytes()[:8] == PNG


def test_sweep_without_predictions_renders_with_intervals_unavailable(store, tmp_path):
    """A sweep logged before test predictions were recorded: tables and headline say so, nothing crashes."""
    rep = build_report(store["cfg"], sweep_run_id=store["other"], out_dir=tmp_path)
    c = rep["cells"][("m1", "arith", "syn2")]["vs"]["sft"]
    assert not c["available"] and "no test/predictions.json artefact" in c["note"]
    assert rep["headline"][0] == "RA-MoE vs SFT: no paired comparison (test predictions unavailable in every cell)"
    md = rep["markdown"]
    assert f"- **{rep['headline'][0]}**" in md.split("## ")[0]
    assert "| m1/arith/syn2 | — | 1 / 1 | +10.0 | unavailable: no test/predictions.json artefact" in md
    assert rep["paths"]["delta"] is None and not (tmp_path / "delta.png").exists()
    assert all(p["low"] is None for p in rep["scatter"]["points"])
    assert json.loads((tmp_path / "report.json").read_text())["paired"]["summary"]["sft"]["cells"] == 0


def test_errors_name_what_exists(store, tmp_path):
    with pytest.raises(ConfigError, match="no-such-run.*no such run.*" + store["parent"]):
        build_report(store["cfg"], sweep_run_id="no-such-run", out_dir=tmp_path)
    child = _selected_from_search(store)[("m1", "arith", "syn2", "sft")]["run_id"]
    with pytest.raises(ConfigError, match="not a sweep parent"):
        build_report(store["cfg"], sweep_run_id=child, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="'empty' holds no sweep"):
        build_report(_config(store["uri"], tmp_path, experiment="empty"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="'nope' does not exist.*exp"):
        build_report(_config(store["uri"], tmp_path, experiment="nope"), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="no sweep of config 'third'.*" + store["other"]):
        build_report(_config(store["uri"], tmp_path, name="third"), out_dir=tmp_path)
    missing_db = f"sqlite:///{tmp_path}/none/mlflow.db"
    with pytest.raises(ConfigError, match="no MLflow database"):
        build_report(_config(missing_db, tmp_path), out_dir=tmp_path)
    assert not (tmp_path / "none").exists()


def test_cli_prints_the_table(store, tmp_path, capsys):
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump(store["cfg"].model_dump(mode="json")))
    out = tmp_path / "out"
    assert main(["report", str(path), "--sweep", store["parent"], "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| language | SFT | Steering | RISE | RA-MoE (best) | Δ vs SFT (points) | ci proportion |" in text
    assert (out / "report.md").read_text() in text
    assert main(["report", str(path), "--sweep", "deadbeef", "tracking.experiment=exp"]) == 2
    assert "deadbeef" in capsys.readouterr().err


def test_rise_lora_sweep_is_named_rise_lora_everywhere(store, tmp_path, monkeypatch):
    """A sweep whose own resolved config (config.resolved.yaml) trains RISE with LoRA (``rise.train: lora``):
    headline, accuracy tables, paired-comparison sections and forest-plot titles say RISE-LoRA, though the
    config given to the report says full; the labels come from the sweep's config, the given one only when
    the sweep logged none."""
    client, uri = store["client"], store["uri"]
    exp = client.create_experiment("exp-lora", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = _config(uri, tmp_path / "runs", name="lora", experiment="exp-lora")
    assert cfg.rise.train == "full"
    langs = ["syn2", "syn4"]
    dump = cfg.model_dump(mode="json")
    resolved = dump | {"models": dump["models"][:1], "tasks": dump["tasks"][:1], "languages": langs,
                       "training": dump["training"] | {"seeds": [7]}, "rise": dump["rise"] | {"train": "lora"}}
    parent = client.create_run(exp, tags={"ramoe.kind": "sweep", "ramoe.sweep": "lora"}).info.run_id
    rng = np.random.default_rng(5)
    for lang in langs:
        sft = (rng.random(N_EX) < 0.4).astype(int)
        for method, x in (("sft", sft), ("steering", _flip(rng, sft, 5, 5)), ("rise", _flip(rng, sft, 8, 4)),
                          ("ramoe", _flip(rng, sft, 20, 5))):
            rid = _child(client, exp, parent, model="m1", task="arith", lang=lang, method=method,
                         key=f"lora-{lang}-{method}", selected=True, val=0.6, test=x.mean(), divs={1: 0.2}, ci=0.3)
            _log_predictions(client, rid, tmp_path, lang, x)
    client.log_param(parent, "ramoe.expected_trials", 8)
    _log_json(client, parent, tmp_path, "cells.json", [
        {"model": "m1", "task": "arith", "language": lang, "ci_proportion": 0.3, "moe_layers": [1],
         "band_layers": [1], "divergence_base": [0.4]} for lang in langs], "cells")
    _log_json(client, parent, tmp_path, "config.resolved.yaml", resolved)

    titles = []
    save = rreport._save

    def spy(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, path)

    monkeypatch.setattr(rreport, "_save", spy)
    rep = build_report(cfg, sweep_run_id=parent, out_dir=tmp_path / "report")
    md = rep["markdown"]
    assert rep["labels"] == {"sft": "SFT", "steering": "Steering", "rise": "RISE-LoRA", "ramoe": "RA-MoE"}
    line = next(h for h in rep["headline"] if "RISE" in h)
    assert line.startswith("RA-MoE vs RISE-LoRA: ") and f"- **{line}**" in md.split("## ")[0]
    assert rep["paired"]["summary"]["rise"]["cells"] == 2
    assert md.count("| language | SFT | Steering | RISE-LoRA | RA-MoE (best) | Δ vs SFT (points) | ci proportion |") == 1
    assert "### RA-MoE vs RISE-LoRA" in md and "| cell | examples | seeds (RA-MoE / RISE-LoRA) |" in md
    assert "| RISE |" not in md and not re.search(r"\bRISE\b(?!-LoRA)", md)
    assert any(t.startswith("RA-MoE − RISE-LoRA\n") for t in titles)  # the forest plot
    assert not any(re.search(r"\bRISE\b(?!-LoRA)", t) for t in titles)
    assert json.loads(Path(rep["paths"]["json"]).read_text())["labels"]["rise"] == "RISE-LoRA"

    # the sweep's resolved config first: a LoRA config given, a sweep that trained RISE fully (or logged a
    # resolved config from before rise.train: the default, full) is RISE; a sweep without one: the given config
    lora = cfg.model_copy(update={"rise": RiseConfig(train="lora")})
    data = rreport.collect(cfg, parent)
    data["resolved"]["rise"]["train"] = "full"
    assert rreport.compute(data, lora)["labels"]["rise"] == "RISE"
    del data["resolved"]["rise"]["train"]
    assert rreport.compute(data, lora)["labels"]["rise"] == "RISE"
    data["resolved"] = None
    assert rreport.compute(data, lora)["labels"]["rise"] == "RISE-LoRA"
    assert rreport.compute(data, cfg)["labels"]["rise"] == "RISE"
