"""Per-model resources (config -> trial resources, concurrency, training workers), the cost model's
arithmetic (cost.py), and ``ramoe sweep --dry-run``: the same errors as a real run, what it prints, and that
it writes nothing (a snapshot of the working folder, output_dir and cache_dir before and after)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ramoe_ray import cli, cost, dryrun, grid, sources, sweep, taxonomy, train, trial
from ramoe_ray.config import ConfigError, ModelResources, config_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO_DB = REPO / "runs" / "demo" / "mlflow.db"


def two_models(**extra) -> dict:
    d = dict(models=[dict(name="small", family="olmoe", path="/m/small", resources={"num_workers": 1}),
                     dict(name="big", family="olmoe", path="/m/big", resources={"num_workers": 4, "cpus_per_worker": 2})],
             tasks=[dict(name="t", format="generative_numeric", source="/d/t")], languages=["de"],
             methods=["sft", "steering"], resources=dict(num_workers=2, gpus_per_worker=1, cpus_per_worker=8),
             sweep=dict(trial_cpus=1))
    d.update(extra)
    return d


# ------------------------------------------------------------------------------- per-model resources


def test_model_resources_reach_trial_resources_and_concurrency():
    cfg = config_from_dict(two_models())
    assert cfg.resources_for("small").num_workers == 1 and cfg.resources_for("small").cpus_per_worker == 8
    assert (cfg.resources_for("big").num_workers, cfg.resources_for("big").cpus_per_worker) == (4, 2)
    assert (trial.train_workers(cfg, "small"), trial.train_workers(cfg, "big"), trial.train_workers(cfg)) == (1, 4, 2)
    assert sweep.trial_demand(cfg, "small") == {"cpu": 9, "gpu": 1}
    assert sweep.trial_demand(cfg, "big") == {"cpu": 9, "gpu": 4}
    node = {"CPU": 64.0, "GPU": 8.0}
    assert (sweep.max_concurrent(cfg, node, "small"), sweep.max_concurrent(cfg, node, "big")) == (7, 2)  # CPUs, GPUs
    # the sweep's own cluster replaces what Ray reports; max_concurrent_trials caps it
    big = config_from_dict(two_models(sweep=dict(trial_cpus=1, cluster={"gpus": 32, "cpus": 720})))
    assert (sweep.max_concurrent(big, node, "small"), sweep.max_concurrent(big, node, "big")) == (32, 8)
    capped = config_from_dict(two_models(sweep=dict(trial_cpus=1, cluster={"gpus": 32, "cpus": 720},
                                                    max_concurrent_trials=10)))
    assert (sweep.max_concurrent(capped, node, "small"), sweep.max_concurrent(capped, node, "big")) == (10, 8)
    # one Tune run per model (their trials ask for different resources), grid order kept
    groups = sweep.resource_groups(cfg, grid.trials(cfg))
    assert [{t.model for t in g} for g in groups] == [{"small"}, {"big"}]
    assert [t.index for g in groups for t in g] == list(range(len(grid.trials(cfg))))
    # training in the trial process: the trial itself holds the model's worker CPU / GPU
    local = config_from_dict(two_models(models=[dict(name="small", family="olmoe", path="/m/s",
                                                     resources={"gpus_per_worker": 0.5})], sweep={"train_workers": 0}))
    assert sweep.trial_resources(local, "small") == {"cpu": 8, "gpu": 0.5}


def test_model_resources_are_validated_with_clear_messages():
    bad = {
        "empty; set num_workers": dict(resources={}),
        "models.0.resources.gpus = 1: unknown field": dict(resources={"gpus": 1}),
        "models.0.resources.num_workers = 0": dict(resources={"num_workers": 0}),
    }
    for message, model in bad.items():
        d = two_models()
        d["models"][0] = {**dict(name="small", family="olmoe", path="/m/small"), **model}
        with pytest.raises(ConfigError, match=message):
            config_from_dict(d)
    with pytest.raises(ConfigError, match=r"sweep.train_workers = 0 and models.0.resources.num_workers, "
                                          r"models.1.resources.num_workers both set"):
        config_from_dict(two_models(sweep={"train_workers": 0}))


def test_model_resources_in_the_sweeps_identity():
    base = two_models(models=[dict(name="small", family="olmoe", path="/m/small")])
    h = grid.config_hash(config_from_dict(base))
    more = {**base, "models": [dict(name="small", family="olmoe", path="/m/small", resources={"num_workers": 2})]}
    cpus = {**base, "models": [dict(name="small", family="olmoe", path="/m/small", resources={"cpus_per_worker": 3})]}
    assert grid.config_hash(config_from_dict(more)) != h  # workers change the global batch
    assert grid.config_hash(config_from_dict(cpus)) == h  # CPUs change no result
    assert grid.config_hash(config_from_dict({**base, "sweep": {"cluster": {"cpus": 4}}})) == h


def test_training_uses_the_models_workers(make_config):
    cfg = make_config(resources=dict(num_workers=2, inference_actors=0))
    own = cfg.model_copy(update={"models": [cfg.models[0].model_copy(update={"resources": ModelResources(num_workers=3)})]})
    plan = train.plan_training(own, own.models[0], own.tasks[0], "syn3", method="sft")
    assert plan.workers == 3 and plan.identity["workers"] == 3
    assert train.plan_training(cfg, cfg.models[0], cfg.tasks[0], "syn3", method="sft").workers == 2


# ------------------------------------------------------------------------------------- the cost model


def test_cost_model_arithmetic_on_a_constructed_case():
    r = cost.Rates(fixed_train=10, fixed_eval=2, load=3, step=0.5, forward=0.01, example=0.1, source="test")
    trained = cost.Work("m", "t", steps=100, passes=200, examples=40, loads=2, actors=2, gpus=4)
    assert cost.seconds(trained, r) == pytest.approx(10 + 2 + 2 * 3 + 100 * 0.5 + 200 * 0.01 + 40 * 0.1 / 2)
    steering = cost.Work("m", "t", examples=90, loads=1, actors=3, gpus=3)
    assert cost.seconds(steering, r) == pytest.approx(2 + 3 + 90 * 0.1 / 3)
    stage = cost.Work("m", "t", examples=10, loads=1, fixed=False, extra=1.5)
    assert cost.seconds(stage, r) == pytest.approx(3 + 1 + 1.5)
    # scheduling: each unit on the first free slot, in order
    assert cost.wall([5, 5, 5], 2) == 10 and cost.wall([4, 1, 1, 1, 1], 2) == 4 and cost.wall([3, 3], 1) == 6
    ph = cost.run_phase("trials", [trained] * 3 + [cost.Work("n", "t", steps=1, loads=0, gpus=1)],
                        {("m", "t"): r, ("n", "t"): r}, {"m": 2, "n": 1})
    assert ph.wall == pytest.approx(2 * 72 + 12.5)  # m: 3 units of 72 s on 2 slots; then n: one of 12.5 s
    assert ph.gpu_hours == pytest.approx((3 * 72 * 4 + 12.5) / 3600)
    est = cost.Estimate([ph, cost.run_phase("stages", [stage], {("m", "t"): r}, {"m": 1}, sequential=True)])
    assert est.wall == pytest.approx(ph.wall + 5.5) and est.gpu_hours == pytest.approx(ph.gpu_hours)


def test_stage_one_is_one_pass_per_model_in_the_estimate():
    """A model's tasks share one stage-1 pass (taxonomy.execute_many): one model load and one pass start per
    model, and a general-text file its tasks share read once; another file is read again."""
    d = two_models(tasks=[dict(name=t, format="generative_numeric", source=f"/d/{t}", general_source=g)
                          for t, g in (("a", "/g/en.txt"), ("b", "/g/en.txt"), ("c", "/g/other.txt"))])
    cfg = config_from_dict(d)
    sizes = {t: dryrun.Size(100, 60, 20, 20, 50, "stated") for t in "abc"}
    units = dryrun.stage_units(cfg, sizes, dryrun.Machine(cpus=64, gpus=8))
    assert [(u.model, u.task, u.loads) for u in units] == [
        ("small", "a", 1), ("small", "b", 0), ("small", "c", 0), ("big", "a", 1), ("big", "b", 0), ("big", "c", 0)]
    assert [u.examples for u in units[:3]] == [2 * 60 + 50, 2 * 60, 2 * 60 + 50]
    pass_start = cost.OVERHEAD["gpu"]["stage_pass_s"]
    assert units[0].extra - units[1].extra == pytest.approx(pass_start) and units[1].extra == units[2].extra


@pytest.mark.parametrize("n, batch, workers, epochs, max_steps", [
    (600, 8, 1, 1, 40), (150, 4, 4, 3, None), (151, 4, 4, 3, None), (150, 4, 1, 3, 300), (10, 4, 4, 2, None),
    (8425, 4, 2, 3, 300), (3, 4, 4, 1, None)])
def test_steps_of_is_the_schedules_length(n, batch, workers, epochs, max_steps):
    sched = train.schedule(n, batch_size=batch, workers=workers, epochs=epochs, seed=0, max_steps=max_steps)
    assert cost.steps_of(n, batch_size=batch, workers=workers, epochs=epochs, max_steps=max_steps) == len(sched)


def test_rates_from_an_earlier_sweeps_children():
    rows = []
    for _ in range(3):  # three trained children: 40 steps of 0.05 s, 0.8 s evaluating 400 examples, 6 s in all
        rows.append({"status": "FINISHED", "tags.model": "m", "tags.task": "t", "tags.method": "sft", "params.steps": "40",
                     "metrics.seconds_total": 6.0, "metrics.seconds_in_loop": 2.0, "metrics.seconds_eval": 0.8})
    rows.append({"status": "FINISHED", "tags.model": "m", "tags.task": "t", "tags.method": "steering",
                 "params.steps": "40", "metrics.seconds_total": 1.2, "metrics.seconds_in_loop": 0.0,
                 "metrics.seconds_eval": 0.8})
    rows.append({"status": "FAILED", "tags.model": "m", "tags.task": "t", "tags.method": "sft", "params.steps": "40",
                 "metrics.seconds_total": 99.0, "metrics.seconds_in_loop": 0.0, "metrics.seconds_eval": 0.0})
    r = cost.rates_from_children(pd.DataFrame(rows), {"t": 400}, "earlier")[("m", "t")]
    assert r.step == pytest.approx(0.05) and r.example == pytest.approx(0.002)
    assert r.fixed_eval == pytest.approx(0.4) and r.fixed_train == pytest.approx(3.2 - 0.4)
    w = cost.Work("m", "t", steps=40, examples=400, loads=2)
    assert cost.seconds(w, r) == pytest.approx(6.0)  # reproduces the children it came from


def test_the_calibration_sweep_is_the_configs_first_language_and_seed_at_few_steps_in_its_own_folder(tmp_path):
    """calibrate.calibration_config: the config's models, tasks, resources and concurrency; its first language
    and seed, the first LAMBDAS knob settings of RA-MoE, steering at its first strength, STEPS steps, no early
    stopping; its own run folder and sqlite MLflow (never the config's tracking server)."""
    from ramoe_ray import calibrate

    d = two_models(methods=["sft", "steering", "ramoe"], languages=["de", "fr"],
                   knobs=dict(lambdas=[0.1, 0.5, 1.0, 5.0], bands=[[0.25, 0.5], [0.5, 0.75]], top_k=[1, 2]),
                   steering=dict(strengths=[2.0, 4.0]), training=dict(max_steps=500, seeds=[3, 4]),
                   tracking=dict(mlflow_uri="http://mlflow.example:5000"),
                   sweep=dict(trial_cpus=1, scheduler="asha", max_concurrent_trials=3, storage_path="/shared/tune"))
    cfg = config_from_dict(d)
    short = calibrate.calibration_config(cfg, tmp_path / "cal")
    assert short.languages == ["de"] and short.training.seeds == [3] and short.methods == ["steering", "ramoe"]
    assert short.knobs.lambdas == [0.1, 0.5, 1.0][:calibrate.LAMBDAS] and len(short.knobs.bands) == len(short.knobs.top_k) == 1
    assert short.steering.strengths == [2.0] and short.training.max_steps == calibrate.STEPS
    assert short.sweep.scheduler == "grid" and short.sweep.max_concurrent_trials == 3
    assert short.models == cfg.models and short.resources == cfg.resources and short.tasks == cfg.tasks
    assert short.run_dir == tmp_path / "cal" / f"{cfg.name}-calibrate"
    assert short.mlflow_uri.startswith("sqlite:") and str(tmp_path / "cal") in short.mlflow_uri
    assert short.sweep.storage_path == "/shared/tune/cal"  # every node sees it, as the config's own
    few = calibrate.calibration_config(cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 3})}),
                                       tmp_path / "cal")
    assert few.training.max_steps == 3
    assert calibrate.calibration_config(config_from_dict(two_models(methods=["steering"])), tmp_path).methods == ["steering"]


def test_a_failed_calibration_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from ramoe_ray import calibrate

    made: list[str] = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(real(dir=tmp_path, **kw)) or made[-1])

    def fails(short, log):
        (Path(short.output_dir) / "half-written").write_text("x")
        raise RuntimeError("a trial failed")

    monkeypatch.setattr(sweep, "run_sweep", fails)
    with pytest.raises(RuntimeError, match="a trial failed"):
        calibrate.calibrate(config_from_dict(two_models()), {"t": 10}, log=lambda _: None)
    assert len(made) == 1 and not Path(made[0]).exists()


# ------------------------------------------------------------------------------------------- dry run


def snapshot(*roots: Path) -> dict:
    """Every file and folder under ``roots`` (links followed) with its size and modification time."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root, followlinks=True):
            for name in dirs + files:
                p = Path(folder) / name
                st = p.stat()
                out[str(p)] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def _write(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("change, message", [
    ({"knobs": {"top_k": [99]}}, "knobs.top_k.0 = 99: larger than the 4 experts"),
    ({"tracking": {"mlflow_uri": "file:///tmp/x"}}, "tracking.mlflow_uri"),
    ({"methods": ["sft"], "training": {"seeds": [0]}, "knobs": {"lambdas": [1.0], "bands": [[0.99, 1.0]], "top_k": [1]}},
     "holds no MoE layer"),
])
def test_dry_run_on_a_bad_config_gives_the_real_runs_error_and_writes_nothing(tmp_path, cache_dir, capsys, monkeypatch,
                                                                                change, message):
    monkeypatch.chdir(tmp_path)
    d = dict(name="bad", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
             tasks=[dict(name="arith", format="generative_numeric", source="synthetic-small:arith")],
             languages=["syn3"], cache_dir=str(cache_dir), output_dir=str(tmp_path / "runs"), **change)
    path = _write(tmp_path, d)
    before = snapshot(tmp_path)
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    dry = capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert cli.main(["sweep", str(path)]) == 2
    real = capsys.readouterr().err
    assert dry == real and message in dry and dry.startswith("error: ")


def test_dry_run_of_the_demo_prints_cells_trials_steps_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, cache = tmp_path / "runs", tmp_path / "cache"  # a fresh cache: the world is not built
    before = snapshot(tmp_path)
    assert cli.main(["demo", str(REPO / "sweeps" / "demo.yaml"), "--dry-run", f"output_dir={out}", f"cache_dir={cache}"]) == 0
    text = capsys.readouterr().out
    assert snapshot(tmp_path) == before and not out.exists() and not cache.exists()
    assert "cells: 12 = 2 models x 2 tasks x 3 languages" in text
    assert "trials per cell: sft 1, steering 1, rise 1, ramoe 2 -> 60 trials; replicates (seeds [1]): 36" in text
    assert "arith: 1000 examples per language (synthetic world spec): train 600, validation 200, test 200" in text
    assert "olmoe-world (trained in the trial process, batch 8 per worker): arith 40, passage 40; 960 steps" in text
    assert "olmoe-world/arith: keys need what is not here yet: synthetic:olmoe: the world's pretrained model" in text
    assert "not built yet (not in the estimate): synthetic:arith: the world's data" in text
    assert "no model trains on a GPU" in text
    assert "[default: the synthetic world on a 2-core CPU" in text  # no earlier sweep here: the stated assumptions
    assert "estimate of this plan" in text and "without the savings" in text


def test_dry_run_finds_the_cached_stages_by_their_real_keys(cache_dir, tmp_path, monkeypatch):
    """The keys the dry run computes are those stages 1-2 write under: computed here, then looked up; the auto
    band's layers come from its cached experts.json, and its trial is a twin when they are the other band's."""
    monkeypatch.chdir(tmp_path)
    d = dict(name="keys", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
             tasks=[dict(name="arith", format="generative_numeric", source="synthetic-small:arith")],
             languages=["syn3"], methods=["sft", "ramoe"], knobs=dict(lambdas=[1.0], bands=[[0.25, 1.0], "auto"], top_k=[1]),
             resources=dict(inference_actors=0), cache_dir=str(cache_dir), output_dir=str(tmp_path / "runs"))
    cfg = config_from_dict(d)
    said: list[str] = []
    dryrun.dry_run(cfg, log=said.append)
    assert "  m/arith: taxonomy en- syn3- (cells 0/1), general text -, experts.json 0/2" in said
    twins = "twins (a band resolving to another band's layers; they run once): "
    assert twins + "0 of 3; auto resolved from the cache in 0 of 1 cells, the others counted as distinct (their " \
        "trials in full)" in said
    built = sources.build(cfg)
    p = taxonomy.plan(built, built.models[0], built.tasks[0], ["syn3"], "train", general=True)
    cells, general = taxonomy.execute(p, num_actors=0)
    said.clear()
    before = snapshot(tmp_path, cache_dir)
    dryrun.dry_run(cfg, log=said.append)
    assert "  m/arith: taxonomy en+ syn3+ (cells 1/1), general text +, experts.json 0/2" in said
    assert snapshot(tmp_path, cache_dir) == before  # file digests read their memos, write none
    from ramoe_ray import experts

    layers = [json.loads(Path(experts.build_experts(p, {"syn3": cells["syn3"][0]}, general[0], "syn3", b, 1)[0])
                         .read_text())["band"]["layers"] for b in built.knobs.bands]
    said.clear()
    res = dryrun.dry_run(cfg, log=said.append)
    assert "  m/arith: taxonomy en+ syn3+ (cells 1/1), general text +, experts.json 2/2" in said
    n = int(layers[0] == layers[1])  # auto's RA-MoE trial repeats band 0.25-1's when it resolved to its layers
    assert twins + f"{n} of 3; auto resolved from the cache in 1 of 1 cells" in said and res["twins"] == n
    # an explicit band of auto's very layers (fractions of the 4 layers): auto's trial is its twin
    auto = layers[1]
    d["knobs"]["bands"] = [[auto[0] / 4, (auto[-1] + 1) / 4], "auto"]
    said.clear()
    assert dryrun.dry_run(config_from_dict(d), log=said.append)["twins"] == 1
    assert twins + "1 of 3; auto resolved from the cache in 1 of 1 cells" in said


def test_dry_run_tells_an_earlier_sweep_of_the_same_settings_from_one_of_other_settings(cache_dir, tmp_path):
    """The earlier sweep's parent holds the hash of its resolved config (synthetic paths made local): the dry run
    compares it with its planned config's, not with the config as written. That sweep has no child yet (it was
    stopped before its first trial finished): its rates are the stated assumptions."""
    from ramoe_ray import tracking

    d = dict(name="same", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
             tasks=[dict(name="arith", format="generative_numeric", source="synthetic-small:arith")],
             languages=["syn3"], methods=["sft"], resources=dict(inference_actors=0), cache_dir=str(cache_dir),
             output_dir=str(tmp_path / "runs"))
    cfg = config_from_dict(d)
    built = sources.build(cfg)
    assert grid.config_hash(built) != grid.config_hash(cfg)  # the paths differ: the hash must be the resolved one's
    client = tracking.mlflow_client(built.mlflow_uri)
    exp = client.create_experiment(built.tracking.experiment)
    built.run_dir.mkdir(parents=True, exist_ok=True)  # the sqlite database is in it
    tracking.start_parent(client, exp, built, params={}, n_trials=1, cells=[], run_dir=built.run_dir)
    said: list[str] = []
    dryrun.dry_run(cfg, log=said.append)
    assert ", the same settings;" in [x for x in said if x.startswith("measured (MLflow")][0]
    assert any("[default: the synthetic world on a 2-core CPU" in x for x in said)
    said.clear()
    dryrun.dry_run(config_from_dict({**d, "training": {"lr": 1e-3}}), log=said.append)
    assert ", other settings (config hash);" in [x for x in said if x.startswith("measured (MLflow")][0]


@pytest.mark.skipif(not DEMO_DB.is_file(), reason="no earlier demo sweep in runs/demo/mlflow.db")
def test_dry_run_reads_an_earlier_demo_sweep_and_estimates_it(tmp_path, capsys, monkeypatch):
    """Rates from the earlier demo sweep's children (a copy of its database, read only): the estimate of that
    sweep's phases is within 25 % of what it measured."""
    shutil.copy(DEMO_DB, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    before = snapshot(tmp_path)
    # the demo as it is (its replicates too: the measured sweep ran them)
    args = ["demo", str(REPO / "sweeps" / "demo.yaml"), "--dry-run", f"tracking.mlflow_uri=sqlite:///{db}", f"cache_dir={REPO / '.ramoe_cache'}"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert snapshot(tmp_path) == before
    assert "[MLflow: sweep " in text
    total = next(line for line in text.splitlines() if line.strip().startswith("measured phases"))
    pct = float(total.rsplit("(", 1)[1].split("%")[0])
    assert abs(pct) <= 25, total


@pytest.mark.slow  # Ray Tune
def test_models_asking_for_different_resources_run_as_one_tune_run_each_in_the_calibration_sweep(shared_cache, tmp_path):
    """``--calibrate`` runs the real sweep (calibrate.py) on this config's calibration copy: one Tune run per
    resource group, as any sweep; the rates are its children's timings, and the config's own run folder is
    never written."""
    from ramoe_ray import calibrate, tracking

    model = dict(family="olmoe", path="synthetic-small:olmoe")
    d = dict(name="groups", models=[dict(name="a", **model), dict(name="b", resources={"cpus_per_worker": 0.5}, **model)],
             tasks=[dict(name="arith", format="generative_numeric", source="synthetic-small:arith")],
             languages=["syn3", "syn4"], methods=["sft", "steering"], knobs=dict(bands=[[0.25, 1.0]], top_k=[1]),
             training=dict(max_steps=2, batch_size=12, checkpoint_every=1000, seeds=[0, 1]),
             resources=dict(num_workers=1, cpus_per_worker=1, inference_actors=0), sweep=dict(train_workers=0),
             cache_dir=str(shared_cache), output_dir=str(tmp_path / "runs"))
    cfg = config_from_dict(d)
    short = calibrate.calibration_config(cfg, tmp_path / "cal")
    said: list[str] = []
    try:
        rates = calibrate.calibrate(cfg, {"arith": 2 * 100}, log=said.append, folder=tmp_path / "cal")
    finally:
        import ray

        ray.shutdown()  # the sweep leaves its local Ray up; later tests start their own
    assert not (tmp_path / "runs").exists()  # the config's output_dir: untouched
    assert said[0].strip().startswith("calibrating: a sweep of 4 trials in 2 cells (syn3; sft, steering; 2 steps per trial)")
    runs = [line.strip() for line in said if line.strip().startswith("Ray Tune:")]
    assert runs == ["Ray Tune: 2 trials (a), 2 at a time, each trial 1 CPU / 0 GPU + 0 Ray Train workers",
                    "Ray Tune: 2 trials (b), 4 at a time, each trial 0.5 CPU / 0 GPU + 0 Ray Train workers"]
    client = tracking.mlflow_client(short.mlflow_uri)
    exp = client.get_experiment_by_name(short.tracking.experiment)
    parent = tracking.find_parent(client, exp.experiment_id, short.name)
    assert sorted(p.name for p in (tmp_path / "cal" / "groups-calibrate" / "tune" / "tune").iterdir()) == [
        f"sweep-{parent}-0", f"sweep-{parent}-1"]
    kids = tracking.children(client, exp.experiment_id, parent)
    assert sorted(kids[kids.status == "FINISHED"]["tags.model"]) == ["a", "a", "b", "b"]  # one language, one seed
    assert set(kids["tags.language"]) == {"syn3"} and set(kids.loc[kids["tags.method"] == "sft", "params.seed"]) == {"0"}
    assert set(rates) == {("a", "arith"), ("b", "arith")}
    for (model_name, _), r in rates.items():
        mine = kids[kids["tags.model"] == model_name]
        trained = mine[mine["tags.method"] == "sft"]
        assert trained["params.steps"].astype(int).tolist() == [2]
        assert r.step == pytest.approx(trained["metrics.seconds_in_loop"].sum() / 2) and r.step > 0
        assert r.fixed_eval > 0 and r.example > 0 and r.source.startswith("calibrated here (a sweep of 4 trials")
