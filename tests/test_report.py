"""ramoe report: a real sqlite MLflow store holding a fake sweep (parent + trials with the sweep's
schema), read back by ramoe_ray.report; the numbers are recomputed here from mlflow.search_runs."""

import json

import numpy as np
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy import stats  # noqa: E402

from ramoe_ray.cli import main  # noqa: E402
from ramoe_ray.config import ConfigError, config_from_dict  # noqa: E402
from ramoe_ray.report import NA_CORR, build_report  # noqa: E402

MODELS = {"m1": {"tasks": ["arith", "passage"], "moe_layers": [1, 2, 3], "band": [2]},
          "m2": {"tasks": ["arith"], "moe_layers": [0, 1, 2, 3], "band": [1, 2]}}
LANGS = ["syn2", "syn4", "syn6"]
MISSING = ("m2", "arith", "syn6")  # its only RA-MoE trial failed
PNG = b"\x89PNG\r\n\x1a\n"


def _config(uri, out, name="rep", experiment="exp"):
    return config_from_dict(dict(
        name=name, languages=LANGS, output_dir=str(out), tracking={"mlflow_uri": uri, "experiment": experiment},
        models=[{"name": "m1", "family": "olmoe", "path": "synthetic:olmoe"},
                {"name": "m2", "family": "qwen3_moe", "path": "synthetic:qwen3_moe"}],
        tasks=[{"name": "arith", "format": "generative_numeric", "source": "synthetic:arith"},
               {"name": "passage", "format": "passage_multiple_choice", "source": "synthetic:passage"}]))


def _child(client, exp, parent, *, model, task, lang, method, key, selected, val, test=None, divs=None,
           params=None, status="FINISHED", error=None, ci=0.0):
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, "ramoe.kind": "trial", "model": model, "task": task, "language": lang,
            "method": method, "trial_key": key, "selected": "true" if selected else "false"}
    if error:
        tags["error"] = error
    run = client.create_run(exp, tags=tags, run_name=key)
    metrics = {"val_acc": val, "val_acc_en": 0.9, "ci_proportion": ci, "routing_kl_ci": 0.1, "routing_kl_ci_base": 0.2}
    if test is not None:
        metrics.update(test_acc=test, test_acc_en=0.95)
    for layer, d in (divs or {}).items():
        metrics[f"test_div_L{layer}"] = d
    p = {"lam": "0.0", "band": "auto", "top_k": "2", "strength": "0.0"} | (params or {})
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in p.items()], tags=[])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _log_json(client, run_id, tmp, name, obj, artifact_path=None):
    f = tmp / name
    f.write_text(json.dumps(obj) if name.endswith(".json") else yaml.safe_dump(obj))
    client.log_artifact(run_id, str(f), artifact_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The sqlite store: sweep 'rep' (a partial sweep of its 2 models x 2 tasks x 3 languages: m2/passage
    never ran; 4 methods, decoys, one failed trial, one cell without RA-MoE), a later sweep 'other' (2 cells, no resolved config) and an
    experiment without any sweep."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(tmp / "artifacts").as_uri())
    empty = client.create_experiment("empty", artifact_location=(tmp / "artifacts-empty").as_uri())
    client.set_terminated(client.create_run(empty, tags={"ramoe.kind": "trial"}).info.run_id)
    cfg = _config(uri, tmp / "runs")

    rng = np.random.default_rng(3)
    parent = client.create_run(exp, tags={"ramoe.kind": "sweep", "ramoe.sweep": "rep"}, run_name="sweep").info.run_id
    cells, n_trials = [], 0
    for model, spec in MODELS.items():
        layers = spec["moe_layers"]
        for task in spec["tasks"]:
            for lang in LANGS:
                ci = float(rng.uniform(0.05, 0.5))
                base_div = rng.uniform(0.2, 0.6, len(layers)).round(4).tolist()
                cells.append({"model": model, "task": task, "language": lang, "family": "olmoe", "ci_proportion": ci,
                              "categories": {"cc": 10, "ci": 5, "ic": 2, "ii": 3}, "n_train": 20,
                              "moe_layers": layers, "band_layers": spec["band"], "divergence_base": base_div})
                sft = float(rng.uniform(0.2, 0.5))
                acc = {"sft": sft, "steering": sft + 0.01, "rise": sft + 0.02,
                       "ramoe": min(1.0, sft + 0.4 * ci + float(rng.normal(0, 0.04)))}
                for method, a in acc.items():
                    k = f"{model}-{task}-{lang}-{method}"
                    if (model, task, lang) == MISSING and method == "ramoe":
                        _child(client, exp, parent, model=model, task=task, lang=lang, method=method, key=k + "-0",
                               selected=False, val=0.0, status="FAILED", error="RuntimeError: worker died\n|trace",
                               ci=ci)
                        n_trials += 1
                        continue
                    divs = {l: d * 0.5 for l, d in zip(layers, base_div)} if method == "ramoe" else None
                    _child(client, exp, parent, model=model, task=task, lang=lang, method=method, key=k + "-0",
                           selected=True, val=0.6, test=a, divs=divs, params={"lam": "0.5", "band": "0.375-0.625"},
                           ci=ci)
                    # a decoy: lower validation accuracy, higher test accuracy, not selected
                    _child(client, exp, parent, model=model, task=task, lang=lang, method=method, key=k + "-1",
                           selected=False, val=0.5, test=min(1.0, a + 0.2), divs={l: 0.99 for l in layers},
                           params={"lam": "1.0"}, ci=ci)
                    n_trials += 2
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
            "n_trials": n_trials}


@pytest.fixture(scope="module")
def report(store):
    return build_report(store["cfg"], out_dir=store["tmp"] / "report")  # the default: newest sweep named 'rep'


def _selected_from_search(store, run_id=None):
    """(model, task, language, method) -> test_acc of the selected finished trial, via mlflow.search_runs."""
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])
    try:
        df = mlflow.search_runs(experiment_ids=[store["exp"]],
                                filter_string=f"tags.mlflow.parentRunId = '{run_id or store['parent']}'")
    finally:
        mlflow.set_tracking_uri(old)
    df = df[(df["tags.selected"] == "true") & (df["status"] == "FINISHED")]
    return {(r["tags.model"], r["tags.task"], r["tags.language"], r["tags.method"]): r for _, r in df.iterrows()}


def test_table_and_delta_match_search_runs(store, report):
    sel = _selected_from_search(store)
    assert report["sweep"]["run_id"] == store["parent"]
    assert len(report["cells"]) == 12  # the resolved config's grid: m2/passage was never run (all "—")
    assert all(v is None for k, r in report["cells"].items() if k[:2] == ("m2", "passage")
               for v in (r["sft"], r["ramoe"], r["delta"]))
    for (m, t, l), row in report["cells"].items():
        for method in ("sft", "steering", "rise", "ramoe"):
            r = sel.get((m, t, l, method))
            if r is None:
                assert row[method] is None
            else:
                assert row[method] == pytest.approx(r["metrics.test_acc"])
        if (m, t, l, "ramoe") in sel and (m, t, l, "sft") in sel:
            expected = 100 * (sel[(m, t, l, "ramoe")]["metrics.test_acc"] - sel[(m, t, l, "sft")]["metrics.test_acc"])
            assert row["delta"] == pytest.approx(expected)
        else:
            assert row["delta"] is None
    # the decoys (not selected, higher test accuracy) were ignored: the values are those of the selected trials
    row = report["cells"][("m1", "arith", "syn2")]
    assert row["ramoe"] == pytest.approx(sel[("m1", "arith", "syn2", "ramoe")]["metrics.test_acc"])
    assert row["ramoe_params"]["lam"] == "0.5"
    md = report["markdown"]
    s = sel[("m1", "passage", "syn4", "sft")]["metrics.test_acc"]
    ra = sel[("m1", "passage", "syn4", "ramoe")]["metrics.test_acc"]
    ci = report["cells"][("m1", "passage", "syn4")]["ci_proportion"]
    section = md.split("### m1 / passage")[1].split("###")[0]
    line = next(x for x in section.splitlines() if x.startswith("| syn4 |"))
    assert line.startswith(f"| syn4 | {100 * s:.1f} |")
    assert f"| {100 * ra:.1f} | {100 * (ra - s):+.1f} | {ci:.3f} |" in line
    assert "### m1 / passage" in md and "### m2 / arith" in md
    assert f"{store['n_trials'] - 1} finished, 1 failed" in md


def test_correlations_equal_scipy_on_search_runs(store, report):
    sel = _selected_from_search(store)
    cells = json.loads((store["tmp"] / "report" / "report.json").read_text())["cells"]
    keys = sorted({k[:3] for k in sel if (k[0], k[1], k[2], "ramoe") in sel and (k[0], k[1], k[2], "sft") in sel})
    x = np.array([sel[k + ("ramoe",)]["metrics.ci_proportion"] for k in keys])
    y = np.array([100 * (sel[k + ("ramoe",)]["metrics.test_acc"] - sel[k + ("sft",)]["metrics.test_acc"])
                  for k in keys])
    assert len(keys) == 8 and report["pearson"]["n"] == 8
    assert report["pearson"]["r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert report["spearman"]["r"] == pytest.approx(stats.spearmanr(x, y).statistic)
    for c in (report["pearson"], report["spearman"]):
        assert -1 <= c["low"] <= c["r"] <= c["high"] <= 1
    assert report["pearson"]["r"] > 0.5  # the fake gains grow with the ci proportion
    assert f"{report['pearson']['r']:.3f}" in report["markdown"]
    assert "bootstrap, 2000 paired resamples" in report["markdown"]
    assert set(cells) == {"/".join(k) for k in report["cells"]}  # report.json holds the same cells


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
    for p in [paths["scatter"], *paths["divergence"].values()]:
        data = open(p, "rb").read()
        assert data[:8] == PNG and len(data) > 1000
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert {"report/report.md", "report/scatter.png", "report/divergence_m1.png", "report/divergence_m2.png"} <= logged
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
    assert "| language | SFT | Steering | RISE | RA-MoE (best) | Δ (points) | ci proportion |" in text
    assert (out / "report.md").read_text() in text
    assert main(["report", str(path), "--sweep", "deadbeef", "tracking.experiment=exp"]) == 2
    assert "deadbeef" in capsys.readouterr().err
