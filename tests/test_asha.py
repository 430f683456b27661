"""Early stopping (asha.py, sweep.scheduler: asha): the rungs are ASHA's own milestones; a training's rung
evaluation is stage 4's validation accuracy of the model at that step and leaves the training bit-identical;
in a real sweep (Ray Tune, MLflow) ASHA stops exactly the RA-MoE trials its rule stops, per cell, each a
FINISHED child tagged ``stopped`` with its last metrics, never selected, counted by the report."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from safetensors.torch import load_file
from test_sweep import sweep_dict

from ramoe_ray import asha, evaluate, grid, report, sweep, tracking, train
from ramoe_ray.config import Band, config_from_dict

LANG = "syn3"


# ------------------------------------------------------------------------------------ rungs


@pytest.mark.parametrize("grace,rf", [(0.25, 3.0), (0.25, 2.0), (0.1, 3.0), (0.5, 4.0), (0.3, 1.5)])
def test_milestones_are_ashas_own(grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket  # test only: the reference the rungs must equal

    ref = sorted(m for m, _ in _Bracket(100.0 * grace, 100, rf, 0)._rungs if m < 100)
    assert asha.milestones(grace, rf) == pytest.approx(ref)
    assert asha.milestones(grace, rf)[0] == pytest.approx(100 * grace)


def test_rung_steps():
    assert asha.rung_steps(40, [25.0, 75.0]) == {10: 25.0, 30: 75.0}
    assert asha.rung_steps(4, [25.0, 75.0]) == {1: 25.0, 3: 75.0}
    assert asha.rung_steps(3, [25.0, 50.0]) == {1: 25.0, 2: 50.0}  # ceil(0.75) = 1, ceil(1.5) = 2
    assert asha.rung_steps(2, [75.0]) == {}  # the last step is the trial's own final validation
    assert asha.rung_steps(1, [25.0]) == {}


def test_only_ramoe_grid_trials_compete_and_per_cell():
    def cfg(method, lang="syn2", seed=0, replicate_of=""):
        return {"trials": [dict(method=method, model="m", task="t", language=lang, seed=seed,
                                replicate_of=replicate_of)]}

    assert asha.cell_of(cfg("ramoe")) == ("m", "t", "syn2", 0)
    assert asha.cell_of(cfg("ramoe", "syn4")) != asha.cell_of(cfg("ramoe"))
    assert all(asha.cell_of(cfg(m)) is None for m in ("sft", "rise", "steering"))
    assert asha.cell_of(cfg("ramoe", seed=1, replicate_of="k")) is None


# ------------------------------------------------------------------------------------ one training


@pytest.mark.slow
def test_rung_accuracy_is_stage4s_and_leaves_training_identical(shared_cache, tmp_path):
    """A 4-step training with a rung at 50 %: its rung accuracy equals stage 4's validation accuracy of the
    2-step training (constant learning rate, the same batches: the same model); its adapter and curves equal
    the same training without rungs, bit for bit."""
    cfg = small_config(shared_cache, task="category", languages=(LANG,), resources=dict(inference_actors=0),
                       training=dict(lr=5e-3, batch_size=12, epochs=2, max_steps=4, lora_rank=4, lora_alpha=8,
                                     checkpoint_every=100, log_every=1))
    m, t = cfg.models[0], cfg.tasks[0]
    kw = dict(method="ramoe", lam=1.0, band=Band(start=0.25, end=1.0), top_k=1, num_workers=0)
    got = []
    with_rungs = train.train_cell(cfg, m, t, LANG, run_dir=tmp_path / "rungs", rungs=[50.0], on_rung=got.append, **kw)
    without = train.train_cell(cfg, m, t, LANG, run_dir=tmp_path / "plain", **kw)
    assert [g["step"] for g in got] == [2] and got[0][asha.TIME_ATTR] == 50.0
    assert with_rungs["rungs"] == [{k: got[0][k] for k in with_rungs["rungs"][0]}]
    a, b = (load_file(str(Path(r["adapter"]) / "adapter_model.safetensors")) for r in (with_rungs, without))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert with_rungs["history"] == [{**h, "step_seconds": w["step_seconds"]} for h, w in
                                     zip(without["history"], with_rungs["history"])]

    cfg2 = small_config(shared_cache, task="category", languages=(LANG,), resources=dict(inference_actors=0),
                        training=dict(cfg.training.model_dump(), max_steps=2))
    half = train.train_cell(cfg2, cfg2.models[0], cfg2.tasks[0], LANG, run_dir=tmp_path / "half", **kw)
    ev = evaluate.evaluate_cell(cfg2, cfg2.models[0], cfg2.tasks[0], [LANG], adapter=half["adapter"],
                                split="validation", out_dir=tmp_path / "ev", num_actors=0)
    assert got[0]["val_acc"] == pytest.approx(ev["accuracy"][LANG], abs=1e-12)
    assert got[0]["n_val"] == ev["n"][LANG]


# ------------------------------------------------------------------------------------ a sweep


def _replay(kids, grace: float, rf: float) -> set[str]:
    """ASHA's rule by hand over the trials in the order they ran (one at a time), per cell: at each rung a
    trial stops when its val_acc is below the (1 - 1/rf) quantile of the cell's earlier trials there."""
    stopped, rungs = set(), {}
    ms = asha.milestones(grace, rf)
    for _, row in kids.assign(i=kids["tags.trial_index"].astype(int)).sort_values("i").iterrows():
        if row["tags.method"] != "ramoe":
            continue
        seen = rungs.setdefault((row["tags.language"],), {m: [] for m in ms})
        for m in ms:
            acc = row["rung"].get(m)
            if acc is None:
                break
            earlier = seen[m]
            seen[m] = earlier + [acc]
            if earlier and acc < np.nanpercentile(earlier, (1 - 1 / rf) * 100):
                stopped.add(row["tags.trial_key"])
                break
    return stopped


@pytest.mark.slow
def test_asha_sweep_stops_by_its_rule_and_logs_the_stopped(shared_cache, tmp_path, capfd):
    d = sweep_dict(shared_cache, tmp_path / "runs", languages=["syn2", "syn4"], methods=["sft", "ramoe"])
    d["knobs"] = dict(lambdas=[0.0, 10.0, 300.0], bands=[[0.25, 1.0]], top_k=[1, 2])
    d["training"].update(max_steps=4, lr=2e-2)
    d["sweep"] = dict(train_workers=0, scheduler="asha", asha_grace=0.25, asha_reduction_factor=2.0,
                      max_concurrent_trials=1)  # one at a time: the order ASHA sees is the grid order
    cfg = config_from_dict(d)
    summary = sweep.run_sweep(cfg)
    client = tracking.mlflow_client(summary["tracking_uri"])
    kids = tracking.children(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(kids) == len(grid.trials(cfg)) == 14
    stopped = kids[tracking.stopped_rows(kids)]
    assert summary["stopped"] == len(stopped) >= 1, "this grid was chosen so that ASHA stops some settings"
    assert set(stopped["tags.method"]) == {"ramoe"} and (stopped.status == "FINISHED").all()

    # each trial's rung accuracies: a stopped child's last metrics, a completed trial's history
    rung = {}
    for _, row in kids.iterrows():
        hist = client.get_metric_history(row.run_id, "rung_val_acc") or []
        pct = client.get_metric_history(row.run_id, "rung_percent_trained") or []
        rung[row.run_id] = {p.value: h.value for p, h in zip(pct, hist)}
        if row["tags.trial_key"] in set(stopped["tags.trial_key"]):
            at = float(row["tags.ramoe.stopped_at"])
            assert row["metrics.percent_trained"] == at and row["metrics.val_acc"] == rung[row.run_id][at]
    kids["rung"] = kids.run_id.map(rung)
    assert set(stopped["tags.trial_key"]) == _replay(kids, 0.25, 2.0)

    # selection: completed trials only; the report counts the stopped
    sel = kids[kids["tags.selected"] == "true"]
    assert len(sel) == 4 and not (sel["tags.stopped"].fillna("") == "true").any()
    done = kids[(kids["tags.method"] == "ramoe") & ~tracking.stopped_rows(kids)]
    for lang in ("syn2", "syn4"):
        best = done[done["tags.language"] == lang]["metrics.val_acc"].max()
        assert sel[(sel["tags.language"] == lang) & (sel["tags.method"] == "ramoe")]["metrics.val_acc"].iloc[0] == best
    text = report.build_report(cfg, sweep_run_id=summary["parent_run_id"], out_dir=tmp_path / "report")["markdown"]
    assert f"{len(stopped)} stopped early by ASHA" in text
    out = capfd.readouterr().out
    assert out.count("stopped by ASHA at") == len(stopped)

    # a resumed sweep logs the twins of a stopped trial that its dead driver left unlogged: stopped at the same
    # rung, with the same rung history, tagged with that trial's key, no time of their own
    first = next(t for t in grid.trials(cfg) if t.key == stopped["tags.trial_key"].iloc[0])
    twin = grid._named(dataclasses.replace(first, band=[0.2, 1.0], key="", dir=""))
    logger = tracking.ChildLogger(summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"], 15, 14)
    logger.earlier_twins({first.key: [twin]}, kids[kids.status == "FINISHED"])
    again = tracking.children(client, summary["experiment_id"], summary["parent_run_id"]).set_index("tags.trial_key")
    got, ref = again.loc[twin.key], again.loc[first.key]
    assert logger.stopped == 1 and got["tags.stopped"] == "true" and got["tags.ramoe.same_as"] == first.key
    for m in ("val_acc", "percent_trained", "step"):
        assert got[f"metrics.{m}"] == ref[f"metrics.{m}"]
    assert got["metrics.seconds_in_loop"] == 0
    hist = [[(m.step, m.value) for m in client.get_metric_history(r, "rung_val_acc")] for r in (got.run_id, ref.run_id)]
    assert hist[0] == hist[1] and hist[0]


# ------------------------------------------------------------------------------------ the cost model


def test_expected_share_and_the_dry_runs_ramoe_units():
    """ASHA's assumed survival q per rung (asha.SURVIVAL, measured): rungs 25, 75 % train 0.25 + 0.5 q + 0.25 q^2
    of the steps; the dry run's RA-MoE units under asha carry that share, SFT's do not."""
    from ramoe_ray import dryrun

    q = asha.SURVIVAL
    share, reach, end = asha.expected_share([25.0, 75.0])
    assert share == pytest.approx(0.25 + 0.5 * q + 0.25 * q * q) and reach == pytest.approx([1.0, q]) and end == pytest.approx(q * q)
    assert asha.expected_share([25.0, 75.0], 1 / 3)[0] == pytest.approx(0.25 + 0.5 / 3 + 0.25 / 9)  # ASHA's asymptotic 1/rf
    assert asha.expected_share([]) == (1.0, [], 1.0)
    base = config_from_dict(sweep_dict("/tmp/none-cache", "/tmp/none-out", methods=["sft", "ramoe"]))
    on = config_from_dict(sweep_dict("/tmp/none-cache", "/tmp/none-out", methods=["sft", "ramoe"],
                                     sweep=dict(train_workers=0, scheduler="asha", asha_grace=0.25,
                                                asha_reduction_factor=3.0)))
    size = dryrun.Size(n=600, train=400, val=100, test=100, general=0, note="t")
    machine = dryrun.Machine(cpus=2, gpus=0)
    for cfg, ramoe_share in ((base, 1.0), (on, share)):
        units = {t.method: dryrun._trained(cfg, t, size, machine, False) for t in grid.trials(cfg)}
        full = dryrun.model_steps(cfg, "m", size)
        assert units["sft"].steps == full and units["ramoe"].steps == round(full * ramoe_share)
        assert units["ramoe"].examples == (2 * 100 if ramoe_share == 1 else round(100 * (1 + q) + 200 * q * q))
    assert dryrun.baseline(on).sweep.scheduler == "grid"  # "without the savings": every trial to the end


@pytest.mark.slow
def test_asha_through_a_ray_train_worker_group(shared_cache, tmp_path):
    """sweep.train_workers = 1: the rungs travel from the Ray Train worker through Ray Train's
    TuneReportCallback to the Tune trial; ASHA stops by the same rule; a stopped trial's worker group ends
    and the next trial runs (the sweep finishes with every trial logged once)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the sweep starts its own, whose environment reaches the Ray Train workers
    d = sweep_dict(shared_cache, tmp_path / "runs", languages=["syn2"], methods=["ramoe"])
    # in grid order: λ = 300 trains worse than λ = 0 by the first rung (the in-process sweep above stops it), and a
    # third trial runs after that stop
    d["knobs"] = dict(lambdas=[0.0, 300.0, 10.0], bands=[[0.25, 1.0]], top_k=[2])
    d["training"].update(max_steps=4, lr=2e-2)
    d["resources"] = dict(num_workers=1, cpus_per_worker=1, inference_actors=0)
    d["sweep"] = dict(train_workers=1, trial_cpus=0.5, scheduler="asha", asha_grace=0.25, asha_reduction_factor=2.0,
                      max_concurrent_trials=1)
    cfg = config_from_dict(d)
    try:
        summary = sweep.run_sweep(cfg)
    finally:
        ray.shutdown()
    client = tracking.mlflow_client(summary["tracking_uri"])
    kids = tracking.children(client, summary["experiment_id"], summary["parent_run_id"])
    assert len(kids) == 3 and set(kids.status) == {"FINISHED"} and kids["tags.trial_key"].is_unique
    rung = {}
    for _, row in kids.iterrows():
        hist = client.get_metric_history(row.run_id, "rung_val_acc") or []
        pct = client.get_metric_history(row.run_id, "rung_percent_trained") or []
        rung[row.run_id] = {p.value: h.value for p, h in zip(pct, hist)}
        assert rung[row.run_id], f"no rung reached Tune from the worker group of {row['tags.trial_key']}"
    kids["rung"] = kids.run_id.map(rung)
    stopped = kids[tracking.stopped_rows(kids)]
    assert set(stopped["tags.trial_key"]) == _replay(kids, 0.25, 2.0)
    assert summary["stopped"] == len(stopped) >= 1
    assert any("lam=300" in k for k in stopped["tags.trial_key"])  # and the trial after it ran: no group leaked
