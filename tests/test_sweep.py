"""The sweep (sweep.py) on the small synthetic world, with real Ray Tune, training in the trial processes
(sweep.train_workers = 0), DeepSpeed and MLflow (sqlite): bad inputs stop before any trial; one sweep of
3 cells x 4 methods logs a parent and one child per trial (a failing trial included), runs stages 1-2
once per cell, selects on validation and tests only the selected; the report's numbers are MLflow's; an
interrupted sweep resumed with --resume runs only the unfinished trials and ends like an uninterrupted one."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from ramoe_ray import dryrun, grid, losses, report, sweep, tracking, train, trial
from ramoe_ray.config import ConfigError, config_from_dict

pytestmark = pytest.mark.slow

LANGS = ("syn2", "syn4", "syn6")
REPO = Path(__file__).resolve().parents[1]


def sweep_dict(cache, out, **extra) -> dict:
    d = dict(
        name="t", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
        tasks=[dict(name="passage", format="passage_multiple_choice", source="synthetic-small:passage")],
        languages=list(LANGS), methods=["sft", "steering", "rise", "ramoe"],
        knobs=dict(lambdas=[10.0], bands=[[0.25, 1.0]], top_k=[1]), steering=dict(strengths=[2.0, 4.0]),
        training=dict(lr=5e-3, batch_size=12, epochs=1, max_steps=3, lora_rank=4, lora_alpha=8, checkpoint_every=1000,
                      log_every=1),
        resources=dict(num_workers=1, cpus_per_worker=1, inference_actors=0), sweep=dict(train_workers=0),
        cache_dir=str(cache), output_dir=str(out))
    d.update(extra)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_fail_before_any_trial(cache_dir, tmp_path):
    import ray

    ray_before = ray.is_initialized()
    base = sweep_dict(cache_dir, tmp_path / "runs")
    # an empty grid: named field, before anything
    for field, value in (("knobs", dict(lambdas=[], bands=[[0.25, 1.0]], top_k=[1])), ("methods", [])):
        with pytest.raises(ConfigError, match=field):
            config_from_dict({**base, field: value})
    # an unreachable tracking server: fails in seconds, names the URI
    uri = f"http://127.0.0.1:{_free_port()}"
    cfg = config_from_dict({**base, "tracking": dict(mlflow_uri=uri)})
    t0 = time.time()
    with pytest.raises(ConfigError, match=f"{uri}.*cannot be reached"):
        sweep.run_sweep(cfg)
    assert time.time() - t0 < 60
    cfg = config_from_dict({**base, "tracking": dict(mlflow_uri=f"file://{tmp_path}/mlruns")})
    with pytest.raises(ConfigError, match="file store"):
        sweep.run_sweep(cfg)
    # a cell whose task lacks the language
    rows = [dict(id=f"q{i}", question=f"What is {i} plus 1?", answer=str(i + 1)) for i in range(10)]
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    for lang in ("en", "syn2"):
        (task_dir / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"Some text {i}."}) + "\n" for i in range(5)))
    cfg = config_from_dict({**base, "languages": ["syn2", "syn5"],
                            "tasks": [dict(name="tiny", format="generative_numeric", source=str(task_dir),
                                           general_source=str(general))]})
    with pytest.raises(ConfigError, match="no file for language 'syn5'"):
        sweep.run_sweep(cfg)
    assert not list((tmp_path / "runs").glob("*/tune")), "a trial folder was made"
    assert ray.is_initialized() == ray_before, "Ray was started for a sweep that could not run"


# ------------------------------------------------------------------------------------ one sweep


@contextlib.contextmanager
def failing_trial(key: str):
    """The trial ``key`` raises inside its Tune trial, the others run as usual: ``trial.train_trial`` is
    replaced by a wrapper that fails for that key, and ramoe_ray.trial is pickled by value (cloudpickle),
    so the Tune function (``trial.run_trial``) carries the replacement into the trial's process."""
    from ray import cloudpickle

    real = trial.train_trial

    def train_or_fail(cfg, t, run_dir, *rest):
        if t.key == key:
            raise RuntimeError(f"injected failure of trial {key} (test)")
        return real(cfg, t, run_dir, *rest)

    cloudpickle.register_pickle_by_value(trial)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trial, "train_trial", train_or_fail)
            yield
    finally:
        cloudpickle.unregister_pickle_by_value(trial)


@pytest.fixture(scope="module")
def swept(shared_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    d = sweep_dict(shared_cache, out)
    d["training"]["seeds"] = [0, 1]  # the selected configurations are retrained with seed 1 and tested
    # a second band that resolves to the same layers (1-3 of 4): its RA-MoE and steering trials are twins
    d["knobs"]["bands"] = [[0.25, 1.0], [0.2, 1.0]]
    cfg = config_from_dict(d)
    fail = next(t.key for t in grid.trials(cfg) if t.method == "rise" and t.language == "syn4")
    with failing_trial(fail):
        summary = sweep.run_sweep(cfg)
    client = tracking.mlflow_client(summary["tracking_uri"])
    kids = tracking.children(client, summary["experiment_id"], summary["parent_run_id"])
    return cfg, summary, client, kids, fail


def test_sweep_logs_a_parent_and_one_child_per_trial(swept):
    cfg, summary, client, kids, fail = swept
    trials = grid.trials(cfg)
    replicas = kids[kids["tags.ramoe.replicate_of"].fillna("") != ""]
    kids = kids[kids["tags.ramoe.replicate_of"].fillna("") == ""]
    assert len(trials) == 3 * 8 and summary["trials"] == 3 * 8 + 3 * 3  # + one replicate per cell x trained method
    assert sorted(kids["tags.trial_key"]) == sorted(t.key for t in trials)
    failed = kids[kids.status == "FAILED"]
    assert list(failed["tags.trial_key"]) == [fail] and "injected failure" in failed["tags.error"].iloc[0]
    ok = kids[kids.status == "FINISHED"]
    assert len(ok) == len(trials) - 1 and summary["failed"] == 1
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FAILED"  # the sweep went on, and says one trial failed
    assert parent.data.tags["ramoe.kind"] == "sweep" and parent.data.tags["ramoe.expected_trials"] == str(3 * 8 + 3 * 3)
    # where the driver and each finished trial ran, on what: the machine and the libraries' versions, as tags
    import torch

    for host, libs in [(parent.data.tags.get(tracking.HOST_TAG), parent.data.tags.get(tracking.LIBS_TAG)),
                       *zip(ok[f"tags.{tracking.HOST_TAG}"], ok[f"tags.{tracking.LIBS_TAG}"])]:
        assert host.startswith(f"{socket.gethostname()}: ") and f"{os.cpu_count()} CPUs" in host, host
        assert f"torch {torch.__version__}" in libs and "deepspeed " in libs and "absent" not in libs, libs
    # seed 1: each selected configuration of a trained method, once (the failed RISE cell has none)
    selected = ok[(ok["tags.selected"] == "true") & (ok["tags.method"] != "steering")]
    assert sorted(replicas["tags.trial_key"]) == sorted(f"{k}/seed=1" for k in selected["tags.trial_key"])
    assert (replicas.status == "FINISHED").all() and (replicas["params.seed"] == "1").all()
    assert (ok[ok["tags.method"] != "steering"]["params.seed"] == "0").all()
    assert (ok[ok["tags.method"] == "steering"]["params.seed"] == "none").all()
    # steering: both strengths of a cell evaluated in one model load
    steer = ok[ok["tags.method"] == "steering"]
    assert len(steer) == 3 * 4 and (steer["metrics.eval_settings"] == 2).all()  # the twins not evaluated again
    assert (steer["metrics.eval_model_loads"] == 1).all()
    # twins (grid.twins): band 0.2-1 is each cell's band 0.25-1 again; only the first ran, each twin is its own
    # child with the first's results, tagged with its key, and selection keeps the first (grid order)
    twin = ok["tags.ramoe.same_as"].fillna("") != ""
    assert summary["twins"] == 3 * 3 and twin.sum() == 3 * 3 and parent.data.metrics["trials_twins"] == 9
    assert set(ok[twin]["params.band"]) == {"0.2-1"} and (ok[twin]["tags.selected"] == "false").all()
    by_key = ok.set_index("tags.trial_key")
    for _, row in ok[twin].iterrows():
        first = by_key.loc[row["tags.ramoe.same_as"]]
        assert row["tags.trial_key"].replace("band=0.2-1", "band=0.25-1") == row["tags.ramoe.same_as"]
        assert row["metrics.val_acc"] == first["metrics.val_acc"] and row["metrics.seconds_total"] == 0
        assert row["tags.tune_trial_id"] == first["tags.tune_trial_id"]  # one Tune trial ran both
    # the dry run's rates from this sweep: the twins' zero timings left out, as the stopped trials are
    rated = dryrun.earlier_sweep(cfg, summary["tracking_uri"])[0]
    assert not tracking.twin_rows(rated).any() and len(rated) == len(kids) + len(replicas) - 3 * 3
    # every rule of the method's definitions is a param of the parent
    for k in train.RULES:
        assert parent.data.params[f"rule.train.{k}"] == train.RULES[k]
    for k in losses.RULES:
        assert f"rule.loss.{k}" in parent.data.params
    # each child: its cell and method as tags, knobs as params, metrics in range
    for _, row in ok.iterrows():
        run = client.get_run(row.run_id)
        spec = next(t for t in trials if t.key == row["tags.trial_key"])
        assert (run.data.tags["model"], run.data.tags["task"], run.data.tags["language"], run.data.tags["method"]) == \
            (spec.model, spec.task, spec.language, spec.method)
        assert run.data.params["top_k"] == str(spec.top_k) and float(run.data.params["lam"]) == spec.lam
        m = run.data.metrics
        assert 0 <= m["val_acc"] <= 1 and 0 <= m["val_acc_en"] <= 1 and 0 < m["ci_proportion"] < 1
        if spec.method != "steering":
            assert m["routing_kl_ci"] >= 0 and m["routing_kl_ci_base"] >= 0
            assert len(client.get_metric_history(row.run_id, "train_loss")) == 3  # max_steps, log_every 1
            # DeepSpeed's ZeRO stage, a param: 0 for a CPU training of one rank (train_worker.zero_stage)
            assert run.data.params["zero_stage"] == ("0" if trial.train_workers(cfg, spec.model) <= 1 else "3")
        logged = {a.path for a in client.list_artifacts(row.run_id)}
        # every child has its trial.json; the figure is drawn by the test evaluation, for tested trials only
        assert "trial.json" in logged and ("trial.png" in logged) == ("test_acc" in m), (spec.key, logged)
        inputs = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
        assert (f"{spec.task}-{spec.language}-validation", "validation") in inputs
    # RA-MoE (λ = 10) pulls ci routing to the English pattern more than SFT in every cell
    for lang in LANGS:
        kl = {r["tags.method"]: r["metrics.routing_kl_ci"] for _, r in ok[ok["tags.language"] == lang].iterrows()
              if r["tags.method"] in ("sft", "ramoe")}
        assert kl["ramoe"] < kl["sft"], (lang, kl)


def test_stages_1_2_run_once_per_cell(swept):
    cfg, summary, client, kids, _ = swept
    # the driver computed stage 1 for each of the 3 cells (fresh module cache), and the trials of each cell all
    # found stages 1-2 in the cache
    assert summary["stage1_computed"] == 3
    assert summary["stage2_computed"] == 6  # two (band, top-k) per cell
    ok = kids[kids.status == "FINISHED"]
    assert (ok["metrics.stage12_recomputed"] == 0).all() and summary["stage12_recomputed_in_trials"] == 0
    # the base passes (English targets, base KL and CE): the first training of each cell computes them, every
    # other training of the cell (methods, seeds; concurrent ones wait) reads them (base_cache)
    trained = ok[ok["tags.method"] != "steering"]
    assert (trained.groupby("tags.language")["metrics.base_passes_recomputed"].sum() == 1).all()
    assert summary["base_passes_recomputed_in_trials"] == 3
    assert ok.groupby("tags.language").size().min() >= 3


def test_selection_on_validation_and_test_only_for_the_selected(swept):
    cfg, summary, client, kids, _ = swept
    kids = tracking.children(client, summary["experiment_id"], summary["parent_run_id"])
    replicas = kids[kids["tags.ramoe.replicate_of"].fillna("") != ""]
    ok = kids[(kids.status == "FINISHED") & (kids["tags.ramoe.replicate_of"].fillna("") == "")]
    for (lang, method), g in ok.groupby(["tags.language", "tags.method"]):
        chosen = g[g["tags.selected"] == "true"]
        assert len(chosen) == 1, (lang, method)
        assert chosen["metrics.val_acc"].iloc[0] == g["metrics.val_acc"].max()
        assert 0 <= chosen["metrics.test_acc"].iloc[0] <= 1
        others = g[g["tags.selected"] != "true"]
        assert others.get("metrics.test_acc", others["metrics.val_acc"] * math.nan).isna().all()
    # the failed cell x method has no selection; every other one has, and each replicate is tested too
    assert len(summary["selected"]) == 3 * 4 - 1 + len(replicas)
    for rid in list(replicas.run_id) + list(ok[ok["tags.selected"] == "true"].run_id):
        run = client.get_run(rid)
        assert 0 <= run.data.metrics["test_acc"] <= 1
        assert run.data.metrics["seconds_test"] > 0  # the test evaluation's time (bench/sweep.py's evaluation floor)
        pred = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{trial.PREDICTIONS}")
        assert len(pred["ids"]) == len(pred["correct"]) == int(run.data.metrics["n_test"])
        assert sum(pred["correct"]) / len(pred["correct"]) == pytest.approx(run.data.metrics["test_acc"])
        assert ("test" in {d.tags[0].value for d in run.inputs.dataset_inputs})
        # its figure, drawn by the test evaluation (validation and test divergence)
        png = Path(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/trial.png")).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        if run.data.tags["method"] != "steering":  # the tested adapter is a logged model, test_acc linked to it
            model = client.search_logged_models([summary["experiment_id"]],
                                                filter_string=f"source_run_id = '{rid}'")[0]
            assert any(m.key == "test_acc" for m in model.metrics)
            assert not any(m.key == "seconds_test" for m in model.metrics)  # a timing, not the model's
            assert {a.path for a in client.list_logged_model_artifacts(model.model_id)}


def test_report_numbers_are_mlflows(swept):
    from scipy import stats

    cfg, summary, client, kids, _ = swept
    rep = report.build_report(cfg, sweep_run_id=summary["parent_run_id"])
    runs = client.search_runs([summary["experiment_id"]],
                              f"tags.mlflow.parentRunId = '{summary['parent_run_id']}' and metrics.test_acc >= 0")
    acc, correct = {}, {}  # (language, method) -> test accuracy per seed, per-example correctness per seed
    for r in runs:
        key = (r.data.tags["language"], r.data.tags["method"])
        acc.setdefault(key, []).append(r.data.metrics["test_acc"])
        pred = mlflow.artifacts.load_dict(f"{r.info.artifact_uri}/{trial.PREDICTIONS}")
        correct.setdefault(key, []).append(np.array(pred["correct"], dtype=float))
    ci = {r.data.tags["language"]: r.data.metrics["ci_proportion"] for r in runs}
    xs, ys = [], []
    for lang in LANGS:
        cell = rep["cells"][("m", "passage", lang)]
        for method in ("sft", "ramoe"):
            assert len(acc[(lang, method)]) == 2  # seeds 0 and 1
            assert cell[method] == pytest.approx(np.mean(acc[(lang, method)]))
        delta = 100 * (np.mean(acc[(lang, "ramoe")]) - np.mean(acc[(lang, "sft")]))
        assert cell["delta"] == pytest.approx(delta)
        # the paired Δ: per example, each method averaged over its seeds, then the mean difference
        paired = 100 * np.mean(np.mean(correct[(lang, "ramoe")], 0) - np.mean(correct[(lang, "sft")], 0))
        assert cell["vs"]["sft"]["delta"] == pytest.approx(paired)
        assert cell["vs"]["sft"]["low"] <= paired <= cell["vs"]["sft"]["high"]
        assert cell["ci_proportion"] == pytest.approx(ci[lang])
        xs.append(ci[lang])
        ys.append(delta)
    assert rep["cells"][("m", "passage", "syn4")]["rise"] is None  # the failed trial: "—" in the table
    if len(set(ys)) > 1:
        assert rep["pearson"]["r"] == pytest.approx(stats.pearsonr(xs, ys)[0])
        assert rep["spearman"]["r"] == pytest.approx(stats.spearmanr(xs, ys)[0])
    else:  # every Δ equal: no correlation to compute, and the report says so
        assert rep["pearson"]["r"] is None and "n/a" in rep["markdown"]
    assert "| syn4 |" in rep["markdown"]
    assert "; 9 of them twins (the same computation as another trial of their cell" in rep["markdown"]
    assert "RA-MoE vs SFT:" in rep["markdown"].split("\n## ")[0]  # the headline, above every section


# ------------------------------------------------------------------------------------ resume


def _finished(db: Path) -> int:
    """Finished trial runs in the sweep's database, read with sqlite3 read-only (an MlflowClient here would
    race the sweep's own creation of the tables)."""
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE r.status = 'FINISHED' AND r.lifecycle_stage = 'active' "
                               "AND t.key = 'ramoe.kind' AND t.value = 'trial'").fetchone()[0]
    except sqlite3.Error:  # the database is being created
        return 0


def test_interrupted_sweep_resumes_only_unfinished_trials(swept, shared_cache, tmp_path):
    cfg0, summary0, client0, kids0, fail = swept
    out = tmp_path / "runs"
    d = sweep_dict(shared_cache, out)
    d["knobs"]["bands"] = [[0.25, 1.0], [0.2, 1.0]]  # twins (the same layers): their resume is checked at the end
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    db = out / "t" / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ramoe_ray.cli", "sweep", str(cfg_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while _finished(db) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        assert proc.poll() is None, "the sweep ended before the test could interrupt it:\n" + proc.stdout.read()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, output[-3000:]
    # the console: the sweep's own lines, one per trial led by the progress; library output in sweep.log
    lines = output.splitlines()
    trial_lines = [l for l in lines if l.startswith("  [")]
    assert trial_lines and all(" · ETA " in l for l in trial_lines), output[-3000:]
    assert len(lines) <= len(trial_lines) + 25, output[-3000:]
    for noise in ("Configuration for experiment", "INFO worker.py", "WARNING", "╭", "Loading weights"):
        assert noise not in output, (noise, output[-3000:])
    library = (out / "t" / sweep.LIBRARY_LOG).read_text(errors="replace")
    assert f"library messages (warnings, Ray, Tune) go to {out / 't' / sweep.LIBRARY_LOG}" in output
    assert "Started a local Ray instance" in library or "Configuration for experiment" in library
    assert "continue with `" in output and "--resume" in output
    cfg = config_from_dict(d)
    total = len(grid.trials(cfg))
    before = _finished(db)
    assert 3 <= before < total, output[-3000:]
    c = tracking.mlflow_client(f"sqlite:///{db}")
    parent = tracking.find_parent(c, c.get_experiment_by_name("ramoe").experiment_id, cfg.name)
    assert c.get_run(parent).info.status == "KILLED"

    res = sweep.run_sweep(cfg, resume=True)
    assert res["parent_run_id"] == parent
    assert c.get_run(parent).data.tags[tracking.RESUMES_TAG] == "1"
    assert res["ran"] == total - before  # only the unfinished trials
    client = tracking.mlflow_client(res["tracking_uri"])
    kids = tracking.children(client, res["experiment_id"], parent)
    assert sorted(kids["tags.trial_key"]) == sorted(t.key for t in grid.trials(cfg))  # no duplicates, none missing
    assert (kids.status == "FINISHED").all()
    assert client.get_run(parent).info.status == "FINISHED"
    # the same results as the uninterrupted sweep (same seed, same schedule, deterministic on CPU)
    ref = kids0[kids0.status == "FINISHED"].set_index("tags.trial_key")["metrics.val_acc"]
    got = kids.set_index("tags.trial_key")["metrics.val_acc"]
    common = ref.index.intersection(got.index)
    assert len(common) == total - 1
    assert (got[common] == ref[common]).all()
    # a resume of a finished sweep runs nothing; a changed config is refused
    assert sweep.run_sweep(cfg, resume=True)["ran"] == 0
    assert c.get_run(parent).data.tags[tracking.RESUMES_TAG] == "2"
    # its logged phase times are the last run's: the dry run does not compare them with its estimate
    said = []
    dryrun.dry_run(cfg, log=said.append)
    assert f"measured: sweep {parent} was continued 2 time(s) with --resume" in "\n".join(said)
    assert not any(line.strip().startswith("measured phases") for line in said)
    changed = config_from_dict({**d, "training": {**d["training"], "lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"began with other settings that change results \(training.lr: 0.005 -> 0.001\)"):
        sweep.run_sweep(changed, resume=True)
    # a driver that died after logging a trial but before its twins: the resume logs them from that trial, runs nothing
    kids = kids.set_index("tags.trial_key")
    twins = kids[tracking.twin_rows(kids)]
    lost = twins[twins["tags.ramoe.same_as"].isin(kids.index[~tracking.stopped_rows(kids)])].index[:3]
    assert len(lost) == 3
    for key in lost:
        client.delete_run(kids.loc[key, "run_id"])
    res = sweep.run_sweep(cfg, resume=True)
    assert res["ran"] == 3 and res["failed"] == 0
    again = tracking.children(client, res["experiment_id"], parent).set_index("tags.trial_key")
    assert sorted(again.index) == sorted(kids.index)
    for key in lost:
        first = kids.loc[kids.loc[key, "tags.ramoe.same_as"]]
        assert again.loc[key, "tags.ramoe.same_as"] == first.name
        assert again.loc[key, "metrics.val_acc"] == first["metrics.val_acc"]
        assert again.loc[key, "tags.tune_trial_id"] == first["tags.tune_trial_id"]  # no new Tune trial
        assert again.loc[key, "metrics.seconds_total"] == 0
