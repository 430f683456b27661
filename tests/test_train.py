"""Stage 3 (train.py, train_worker.py): RA-MoE aligns ci routing better than SFT (RISE: tests/test_rise.py);
trainings in one process run one after another and resume from a kept checkpoint; ZeRO-3 on two
Ray Train workers survives a worker failure and matches an uninterrupted run; bad inputs are refused;
the base passes are computed once per cell (base_cache) and trainings that read them train identically."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file

from ramoe_ray import lora, synthetic, train, train_worker
from ramoe_ray.config import Band, ConfigError
from ramoe_ray.tasks import build_prompt, load_parallel

LANG = "syn3"
TASK = "category"  # multiple choice: no generation, so stages 1-2 take seconds; the small world has ci pairs
# A band over layers 1-3 of the 4-layer world model and one task expert per layer: the LoRA of the layers
# below each band layer can move its routing.
BAND = Band(start=0.25, end=1.0)
TOP_K = 1
TRAIN = dict(lr=5e-3, batch_size=12, epochs=2, lora_rank=4, lora_alpha=8, checkpoint_every=100, log_every=1)


def cfg_for(cache, **training):
    return small_config(cache, task=TASK, languages=(LANG,), resources=dict(inference_actors=0, cpus_per_worker=0.5),
                        training={**TRAIN, **training})


def fit(cfg, method, run_dir, **kw):
    kw.setdefault("band", BAND)
    kw.setdefault("top_k", TOP_K)
    kw.setdefault("num_workers", 0)  # the worker recipe in this process, world of one
    return train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method=method, run_dir=run_dir, **kw)


@pytest.mark.slow
def test_ramoe_aligns_ci_routing_better_than_sft(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    sft = fit(cfg, "sft", tmp_path / "sft")
    ramoe = fit(cfg, "ramoe", tmp_path / "ramoe", lam=100.0)
    assert sft["n_ci"] == ramoe["n_ci"] > 0 and sft["lam_used"] == 0.0 and ramoe["lam_used"] == 100.0
    assert sft["steps"] == ramoe["steps"] == 6
    # same seed, same schedule: the first step (LoRA B = 0, so the same model) has the same LM loss
    assert sft["history"][0]["ce"] == pytest.approx(ramoe["history"][0]["ce"], abs=1e-6)
    assert math.isnan(sft["history"][0]["align"] or math.nan)  # λ = 0: no alignment computed
    base = sft["final"]["routing_kl_ci_base"]
    assert base == pytest.approx(ramoe["final"]["routing_kl_ci_base"], rel=1e-6)
    kl_sft, kl_ramoe = sft["final"]["routing_kl_ci"], ramoe["final"]["routing_kl_ci"]
    # RA-MoE pulls the ci examples' band routing towards English; SFT does not (here it drifts away)
    assert kl_ramoe < 0.5 * kl_sft, (kl_ramoe, kl_sft, base)
    assert kl_ramoe < base
    # and both still learn the task
    for r in (sft, ramoe):
        assert r["final"]["ce_train"] < r["final"]["ce_train_base"] - 0.01


def test_bad_inputs_are_refused(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    with pytest.raises(ConfigError, match="holds no MoE layer"):
        fit(cfg, "ramoe", tmp_path / "a", band=Band(start=0.95, end=1.0), lam=1.0)
    with pytest.raises(ConfigError, match="top_k = 5"):
        fit(cfg, "ramoe", tmp_path / "b", top_k=5, lam=1.0)
    with pytest.raises(ConfigError, match="method"):
        fit(cfg, "dpo", tmp_path / "c")
    with pytest.raises(ConfigError, match="lambda"):
        fit(cfg, "ramoe", tmp_path / "d", lam=-1.0)
    # a checkpoint of another model: refused before anything runs
    ck = tmp_path / "foreign"
    ck.mkdir()
    (ck / train_worker.META).write_text(json.dumps({"identity": {"model": "other", "num_experts": 64}, "step": 3}))
    with pytest.raises(ConfigError, match="another model"):
        fit(cfg, "ramoe", tmp_path / "e", lam=1.0, resume_from=ck)
    with pytest.raises(ConfigError, match="not a ramoe training checkpoint"):
        fit(cfg, "ramoe", tmp_path / "f", lam=1.0, resume_from=tmp_path)
    # a run folder of another configuration
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / train.SPEC).write_text(json.dumps({"identity": {"model": "other"}}))
    with pytest.raises(ConfigError, match="holds a training with other settings .*model: 'other' -> 'm'"):
        fit(cfg, "ramoe", tmp_path / "g", lam=1.0)


def test_steering_trains_nothing_and_returns_the_band_spec(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    res = fit(cfg, "steering", tmp_path / "s")
    assert res["adapter"] is None and not (tmp_path / "s").exists()
    assert res["steering"]["strength"] == cfg.steering.strengths[0]
    assert {int(l) for l in res["steering"]["experts"]} == set(res["band_layers"]) == {1, 2, 3}
    assert all(len(v) == TOP_K for v in res["steering"]["experts"].values())


def test_empty_ci_trains_as_sft_with_a_warning(shared_cache, tmp_path, monkeypatch):
    import pandas as pd

    real = pd.read_parquet

    def no_ci(*a, **kw):  # the taxonomy as if no pair were ci
        df = real(*a, **kw)
        if "category" in df:
            df["category"] = df["category"].replace("ci", "ii")
        return df

    monkeypatch.setattr(pd, "read_parquet", no_ci)
    cfg = cfg_for(shared_cache, max_steps=1)
    with pytest.warns(UserWarning, match="no ci example"):
        plan = train.plan_training(cfg, cfg.models[0], cfg.tasks[0], LANG, method="ramoe", lam=5.0, band=BAND,
                                   top_k=TOP_K, num_workers=0)
    assert plan.n_ci == 0 and plan.lam == 5.0 and plan.lam_used == 0.0
    assert any("training as SFT" in n for n in plan.notes)


# ------------------------------------------------------------- trainings in this process (num_workers=0)


def _failing_step(real, at: int, marker: Path):
    """``real`` (train_worker.train_step), raising at step ``at`` as long as ``marker`` does not exist
    (rank 0 writes it: the fault happens once)."""

    def train_step(trainee, plan, targets, step, context, progress):
        if step == at and not marker.exists():
            if context.rank == 0:
                marker.write_text(str(step))
            raise RuntimeError(f"injected fault at step {step} (test)")
        return real(trainee, plan, targets, step, context, progress)

    return train_step


def _assert_same_training(a: dict, b: dict, tol: float) -> None:
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert x["ce"] == pytest.approx(y["ce"], abs=tol) and x["loss"] == pytest.approx(y["loss"], abs=tol)
    for k in ("loss", "ce", "ce_train", "routing_kl_ci"):
        assert a["final"][k] == pytest.approx(b["final"][k], abs=tol), k
    wa = load_file(f"{a['adapter']}/{lora.ADAPTER_WEIGHTS}")
    wb = load_file(f"{b['adapter']}/{lora.ADAPTER_WEIGHTS}")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=tol, rtol=0) for k in wa)


@pytest.mark.slow
def test_setup_built_deepspeeds_cpu_comm_op_where_trainings_load_it():
    """scripts/setup.sh compiles DeepSpeed's CPU comm op (train_worker.build_comm_op) where ray_env points
    every training, so no training compiles it (~45 s): loading it finds that build and leaves it as it is."""
    built = Path(train_worker.ray_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    assert built.is_file(), f"{built}: not built (run scripts/setup.sh)"
    before = built.stat().st_mtime_ns
    assert train_worker.build_comm_op() and built.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_comm_op_lock_left_by_a_killed_load_is_cleared_and_a_live_loads_is_waited_for():
    """Torch's JIT takes a lock file in the op's build folder for every load: a process killed inside left
    it, and every later training waited for it forever (seen after ``ray job stop`` of a sweep). Our loads
    hold the guard's flock; one that holds it and finds the lock file removes it, and one that cannot
    (another load of ours is live) waits, leaving that load's lock file alone."""
    import fcntl
    import os
    import subprocess
    import threading

    root = Path(train_worker.ray_env()["TORCH_EXTENSIONS_DIR"])
    lock, built = root / "deepspeed_shm_comm" / "lock", root / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    before = built.stat().st_mtime_ns
    # a live load of ours holds the guard: a new load waits, and leaves that load's lock file where it is
    out = []
    with open(root / train_worker.COMM_OP_GUARD, "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        lock.touch()
        waiter = threading.Thread(target=lambda: out.append(train_worker.build_comm_op()))
        waiter.start()
        waiter.join(3.0)
        assert waiter.is_alive() and lock.exists() and not out
        lock.unlink()  # the live load ends
    waiter.join(120)
    assert out == [True]
    # a load killed inside left its lock file: a fresh process clears it and loads the build. And whichever
    # ninja comes first on a process's PATH, no load compiles the op again (a system ninja hashes commands
    # differently from the environment's: processes finding one or the other took turns rebuilding it)
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d != bin_dir)
    code = "from ramoe_ray import train_worker; print(train_worker.build_comm_op())"
    lock.touch()
    for i, env_path in enumerate((path, bin_dir + os.pathsep + path)):
        load = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root),
                              "PATH": env_path}, capture_output=True, text=True, timeout=120)
        assert load.returncode == 0 and load.stdout.split()[-1] == "True", load.stderr[-3000:]
        assert (f"removing {lock}" in load.stderr) == (i == 0) and not lock.exists(), load.stderr[-3000:]
        assert built.stat().st_mtime_ns == before, f"compiled again, PATH {env_path}"


@pytest.mark.slow
def test_trainings_in_one_process_and_resume_from_a_kept_checkpoint(shared_cache, tmp_path, monkeypatch):
    """Three trainings one after another in this process (an uninterrupted one, one that fails at step 3,
    its resumption from the step-2 checkpoint kept in its run folder): one process group throughout, no
    DeepSpeed state reset in between, and the resumed run ends where the uninterrupted one does."""
    import torch.distributed as dist

    cfg = cfg_for(shared_cache, batch_size=6, epochs=2, max_steps=4, checkpoint_every=2, lr=1e-2)
    clean = fit(cfg, "ramoe", tmp_path / "clean", lam=10.0)
    world = dist.group.WORLD
    assert clean["world_size"] == 1 and clean["restarts"] == 0 and [h["step"] for h in clean["history"]] == [1, 2, 3, 4]
    kept = sorted(p.name for p in (tmp_path / "clean" / train.CHECKPOINTS).iterdir())
    assert kept == ["checkpoint_000002", "checkpoint_000004"] and clean["checkpoint"].endswith(kept[-1])
    assert clean["final"]["ce_train"] < clean["final"]["ce_train_base"] - 0.01, clean["final"]

    marker = tmp_path / ".fault_injected"
    with monkeypatch.context() as m:
        m.setattr(train_worker, "train_step", _failing_step(train_worker.train_step, 3, marker))
        with pytest.raises(RuntimeError, match="injected fault at step 3"):
            fit(cfg, "ramoe", tmp_path / "faulty", lam=10.0)
    assert marker.read_text() == "3"
    kept = sorted((tmp_path / "faulty" / train.CHECKPOINTS).iterdir())
    assert [p.name for p in kept] == ["checkpoint_000002"]
    resumed = fit(cfg, "ramoe", tmp_path / "faulty", lam=10.0, resume_from=kept[-1])
    assert dist.is_initialized() and dist.group.WORLD is world and dist.get_world_size() == 1
    assert resumed["restarts"] == 1 and resumed["history"][-1]["restarts"] == 1
    _assert_same_training(clean, resumed, tol=1e-6)


@pytest.mark.slow
def test_a_cpu_training_of_one_rank_runs_without_zero_and_trains_as_zero3_does(shared_cache, tmp_path, monkeypatch):
    """A CPU training of one rank runs DeepSpeed's engine at ZeRO stage 0 (train_worker.zero_stage): the same
    RA-MoE training forced to ZeRO-3 computes the same losses and adapter, bit for bit. A checkpoint of one
    stage is refused by a training of the other, before any step."""
    cfg = cfg_for(shared_cache, batch_size=6, epochs=1, max_steps=3, checkpoint_every=2, lr=1e-2)
    plain = fit(cfg, "ramoe", tmp_path / "stage0", lam=10.0)
    with monkeypatch.context() as m:
        m.setattr(train_worker, "zero_stage", lambda world_size, on_gpu: 3)
        zero3 = fit(cfg, "ramoe", tmp_path / "stage3", lam=10.0)
    assert (plain["zero_stage"], zero3["zero_stage"]) == (0, 3)
    assert [train_worker.zero_stage(1, False), train_worker.zero_stage(2, False), train_worker.zero_stage(1, True)] == [0, 3, 3]
    _assert_same_training(plain, zero3, tol=0.0)
    kept = sorted((tmp_path / "stage3" / train.CHECKPOINTS).iterdir())[0]
    with pytest.raises(ConfigError, match="written at DeepSpeed ZeRO stage 3, this training runs stage 0"):
        fit(cfg, "ramoe", tmp_path / "resumed", lam=10.0, resume_from=kept)
    assert not (tmp_path / "resumed" / train_worker.RESULT).exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_trainings_in_one_process_leave_no_model_behind(shared_cache, tmp_path, monkeypatch, stage):
    """A reused trial process trains hundreds of times: each training's model must be freed at its end, at
    ZeRO stage 0 (a CPU training of one rank) and under ZeRO-3 (forced here; every GPU training). DeepSpeed's
    ZeRO-3 engine.destroy() alone leaves two references to it (train_worker.release_zero3_references);
    the synthetic grid's trial processes held hundreds of models, and the gc.collect() in each
    deepspeed.initialize grew from 0.5 s to 2.9 s. After the first training the process's objects are frozen
    (gc.freeze), the first model not among them."""
    import gc
    import weakref

    models = []
    real_setup = train_worker.setup

    def setup(plan, phases, world_size):
        trainee = real_setup(plan, phases, world_size)
        assert trainee.zero_stage == stage
        models.append(weakref.ref(trainee.engine.module))
        return trainee

    monkeypatch.setattr(train_worker, "setup", setup)
    monkeypatch.setattr(train_worker, "zero_stage", lambda world_size, on_gpu: stage)
    cfg = cfg_for(shared_cache, batch_size=6, max_steps=1, checkpoint_every=1000)
    for i, method in enumerate(("sft", "ramoe", "sft")):
        fit(cfg, method, tmp_path / f"{i}-{method}", lam=10.0 if method == "ramoe" else None)
        gc.collect()
        assert [m() is None for m in models] == [True] * (i + 1), f"models alive after training {i + 1}"
    assert gc.get_freeze_count() > 0


@pytest.mark.slow
def test_without_the_final_train_pass_the_training_is_the_same_and_two_metrics_are_not_measured(shared_cache, tmp_path):
    """training.final_train_pass (off in the shipped sweeps) only skips the end-of-training pass over the
    train split: the same steps and adapter, bit for bit, and the base values; no routing_kl_ci / ce_train."""
    on = fit(cfg_for(shared_cache, batch_size=6, max_steps=3), "ramoe", tmp_path / "on", lam=10.0)
    off = fit(cfg_for(shared_cache, batch_size=6, max_steps=3, final_train_pass=False), "ramoe", tmp_path / "off", lam=10.0)
    assert "final_passes" in on["phases_rank0"] and "final_passes" not in off["phases_rank0"]
    assert {"routing_kl_ci", "ce_train"} <= on["final"].keys()
    assert not {"routing_kl_ci", "ce_train"} & off["final"].keys()
    for k in ("routing_kl_ci_base", "ce_train_base", "loss", "ce", "routing_kl"):
        assert off["final"][k] == on["final"][k], k
    assert [h["loss"] for h in off["history"]] == [h["loss"] for h in on["history"]]
    w_on = load_file(f"{on['adapter']}/{lora.ADAPTER_WEIGHTS}")
    w_off = load_file(f"{off['adapter']}/{lora.ADAPTER_WEIGHTS}")
    assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)


# ------------------------------------------------------------------ ZeRO-3 on two Ray Train workers


def _ray_loop_failing_once_at_step_3(config: dict) -> None:
    """Ray Train's loop, with a fault: in this worker process train_worker.train_step raises at step 3
    unless the run folder holds the marker, which rank 0 writes. So the first attempt fails on every
    rank, and Ray Train restarts the worker group (new processes) from the last reported checkpoint.
    Pickled by value (the test registers this module): the workers import only ramoe_ray."""
    marker = Path(config["run_dir"]) / ".fault_injected"
    train_worker.train_step = _failing_step(train_worker.train_step, 3, marker)  # this worker process only
    train_worker.ray_train_loop(config)  # the real loop: the driver's patch does not reach the workers


@pytest.mark.slow
def test_zero3_two_workers_restart_after_failure_matches_uninterrupted(shared_cache, tmp_path, monkeypatch):
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg_for(shared_cache, batch_size=6, epochs=2, max_steps=4, checkpoint_every=2, max_failures=1, lr=1e-2)
    data = load_parallel(cfg.tasks[0], [LANG])
    fmt = cfg.tasks[0].format
    probe = [build_prompt(data[LANG][0], fmt), build_prompt(data["en"][1], fmt)]
    # a checkpoint an earlier driver wrote but never registered (it was killed hard): removed at the end
    plan = train.plan_training(cfg, cfg.models[0], cfg.tasks[0], LANG, method="ramoe", lam=10.0, band=BAND,
                               top_k=TOP_K, num_workers=2)
    ray_run = tmp_path / "faulty" / "ray" / train.run_name(cfg.models[0], cfg.tasks[0], LANG, plan)
    (ray_run / "checkpoint_2000-01-01_00-00-00.000000").mkdir(parents=True)
    (ray_run / "checkpoint_2000-01-01_00-00-00.000000" / "ramoe_meta.json").write_text("{}")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    try:
        clean = fit(cfg, "ramoe", tmp_path / "clean", lam=10.0, num_workers=2, probe=probe)
        # the driver hands TorchTrainer train_worker.ray_train_loop: here the faulty one, shipped by value
        monkeypatch.setattr(train_worker, "ray_train_loop", _ray_loop_failing_once_at_step_3)
        faulty = fit(cfg, "ramoe", tmp_path / "faulty", lam=10.0, num_workers=2, probe=probe)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()
    assert clean["world_size"] == faulty["world_size"] == 2
    assert clean["restarts"] == 0 and faulty["restarts"] == 1
    # the base passes: computed by the clean run's two ranks, read by both attempts of the faulty one
    assert (clean["base_passes_recomputed"], faulty["base_passes_recomputed"]) == (1, 0)
    for k in ("routing_kl_ci_base", "ce_train_base"):
        assert clean["final"][k] == faulty["final"][k], k
    assert (tmp_path / "faulty" / ".fault_injected").read_text() == "3"
    kept = sorted(d.name for d in ray_run.glob("checkpoint_*") if d.is_dir())
    assert len(kept) == train.KEEP_CHECKPOINTS and "checkpoint_2000-01-01_00-00-00.000000" not in kept, kept
    # the loss falls (mean continuation CE over the whole train split, before vs after)
    assert clean["final"]["ce_train"] < clean["final"]["ce_train_base"] - 0.01, clean["final"]
    # restarted from the step-2 checkpoint, the run ends where the uninterrupted one does
    assert [h["step"] for h in faulty["history"]] == [1, 2, 3, 4]
    _assert_same_training(clean, faulty, tol=1e-5)
    # the adapter loads with peft onto the plain model and reproduces the trained (ZeRO-3) model
    path = clean["identity"]["model_path"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    enc = tok(probe, return_tensors="pt", padding=True)
    for res, run in ((clean, "clean"), (faulty, "faulty")):
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        peft = PeftModel.from_pretrained(plain, res["adapter"]).eval()
        with torch.no_grad():
            got = peft(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        want = torch.load(tmp_path / run / "probe_logits.pt")
        assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
        assert sum(float(v.abs().sum()) for k, v in load_file(f"{res['adapter']}/{lora.ADAPTER_WEIGHTS}").items()
                   if "lora_B" in k) > 0


# ------------------------------------------------------------- the base passes, once per cell (base_cache)


def _old_kl(trainee, plan, targets) -> float:
    """The ci routing KL as trainings computed it before ``split_metrics``: a pass over the ci prompts alone."""
    from ramoe_ray.losses import routing_kl

    engine, tok, device, ebs = trainee.engine, trainee.tok, trainee.device, plan.training.eval_batch_size
    total, n = 0.0, 0
    for chunk, routing, mask in train_worker._routed_batches(engine, tok, plan.ci_records(), "prompt", ebs, device):
        kl = routing_kl(router_logits=routing.logits, mask=mask, ci=torch.ones(len(chunk), dtype=torch.bool),
                        layers=routing.layers, band_layers=plan.band_layers, task_experts=plan.band_experts(),
                        target_pattern=torch.stack([targets[r["id"]] for r in chunk]))
        total, n = total + kl * len(chunk), n + len(chunk)
    return total / n


def _old_ce(trainee, plan) -> float:
    """The train CE as trainings computed it before ``split_metrics``: a pass of its own."""
    engine, tok, device, ebs = trainee.engine, trainee.tok, trainee.device, plan.training.eval_batch_size
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(plan.records), ebs):
            b = train_worker.encode(tok, plan.records[i : i + ebs], device)
            k = int((b["labels"][:, 1:] != -100).sum())
            total += float(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss) * k
            n += k
    return total / n


def _plan(cfg, method, **kw):
    return train.plan_training(cfg, cfg.models[0], cfg.tasks[0], LANG, method=method, band=BAND, top_k=TOP_K,
                               num_workers=0, **kw)


@pytest.mark.slow
def test_cached_base_passes_equal_a_fresh_computation(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache, max_steps=1, eval_batch_size=16)
    sft, rise = _plan(cfg, "sft"), _plan(cfg, "rise")
    assert sft.base_inputs == rise.base_inputs and sft.n_ci > 0  # one cell, one key: the method is not in it
    sft = dataclasses.replace(sft, base_cache=str(tmp_path / "base_passes"))
    context = train_worker.WorkerContext()
    trainee = train_worker.setup(sft, train_worker.Phases())
    try:
        computed, hit_first = train_worker.base_passes(trainee, sft, context)  # computes, writes
        cached, hit_again = train_worker.base_passes(trainee, sft, context)  # reads
        old = {"kl": _old_kl(trainee, sft, computed.targets), "ce": _old_ce(trainee, sft)}
    finally:
        train_worker.teardown(trainee)
    assert (hit_first, hit_again) == (False, True)
    assert len([d for d in (tmp_path / "base_passes").iterdir() if not d.name.startswith(".")]) == 1  # + its lock
    trainee = train_worker.setup(rise, train_worker.Phases())  # the full-weight RISE delta: another adapter at zero
    try:
        fresh = train_worker.compute_baseline(trainee, rise)
    finally:
        train_worker.teardown(trainee)
    # the cache holds what a fresh computation of any training of the cell gives, bit for bit
    assert cached.targets.keys() == fresh.targets.keys() == {r["id"] for r in sft.ci_records()}
    assert all(torch.equal(cached.targets[k], fresh.targets[k]) for k in fresh.targets)
    assert all(torch.equal(computed.targets[k], fresh.targets[k]) for k in fresh.targets)
    assert (cached.routing_kl_ci, cached.ce_train) == (fresh.routing_kl_ci, fresh.ce_train)
    # the one pass over prompt + continuation gives the train CE of the separate pass exactly, and the KL of
    # the pass over the prompts alone up to float rounding (other padding widths; causal attention: same value)
    assert fresh.ce_train == old["ce"]
    assert fresh.routing_kl_ci == pytest.approx(old["kl"], rel=1e-5, abs=1e-7) and fresh.routing_kl_ci > 0


@pytest.mark.slow
def test_later_trainings_of_a_cell_read_the_base_passes_and_train_identically(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache, batch_size=6, max_steps=3, eval_batch_size=24)  # a key of its own in this module
    first = fit(cfg, "sft", tmp_path / "sft")
    second = fit(cfg, "ramoe", tmp_path / "ramoe", lam=10.0)
    assert first["base_passes_recomputed"] == 1 and second["base_passes_recomputed"] == 0
    assert all(second["stage_cache"].values())  # stages 1-2 from the cache as well
    assert fit(cfg, "ramoe", tmp_path / "ramoe", lam=10.0)["base_passes_recomputed"] == 0  # a finished training reused
    # the same RA-MoE training with the base passes computed in it: the same history and metrics, bit for bit
    plan = dataclasses.replace(_plan(cfg, "ramoe", lam=10.0), base_cache=None)
    train_worker.run_training(plan, tmp_path / "fresh", None, train_worker.WorkerContext(), lambda m, c: None)
    fresh = json.loads((tmp_path / "fresh" / train_worker.RESULT).read_text())
    assert fresh["base_passes_recomputed"] == 1

    def same(d):
        return {k: v for k, v in d.items() if k != "step_seconds"}

    assert [same(h) for h in second["history"]] == [same(h) for h in fresh["history"]]
    assert same(second["final"]) == same(fresh["final"])
    assert second["final"]["routing_kl_ci_base"] == first["final"]["routing_kl_ci_base"]
    assert second["final"]["ce_train_base"] == first["final"]["ce_train_base"]
    _assert_same_training(second, fresh, tol=0.0)


def test_base_cache_round_trip_and_lock(tmp_path):
    import fcntl

    from ramoe_ray import base_cache

    base = base_cache.Baseline(targets={"a-1": torch.rand(3, 5), "b-2": torch.rand(3, 5).double().float()},
                               routing_kl_ci=0.1234567890123456789, ce_train=2.0 / 3.0)
    final = base_cache.folder(tmp_path, {"what": "base passes"})
    with base_cache.first_computes(final, rank=0):
        with open(final.parent / f".{final.name}.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a concurrent training of the cell waits here
        base_cache.save(final, base, {"what": "base passes"})
    got = base_cache.load(final)
    assert got.targets.keys() == base.targets.keys() and all(torch.equal(got.targets[k], v) for k, v in base.targets.items())
    assert (got.routing_kl_ci, got.ce_train) == (base.routing_kl_ci, base.ce_train)
    empty = base_cache.folder(tmp_path, {"what": "no ci example"})
    base_cache.save(empty, base_cache.Baseline(targets={}, routing_kl_ci=math.nan, ce_train=1.5), {})
    got = base_cache.load(empty)
    assert got.targets == {} and math.isnan(got.routing_kl_ci) and got.ce_train == 1.5
    assert base_cache.agree(True, torch.device("cpu"), 1) and not base_cache.agree(False, torch.device("cpu"), 1)


@pytest.mark.slow
def test_twin_bands_are_one_training(shared_cache, tmp_path):
    """grid.twins: two bands that resolve to the same layers (here auto and an explicit band) give the same
    training, bit for bit: only the first of them runs in a sweep."""
    cfg = cfg_for(shared_cache, max_steps=3)
    auto = fit(cfg, "ramoe", tmp_path / "auto", lam=10.0, band="auto")
    layers = auto["band_layers"]
    n = synthetic.SMALL.num_layers
    explicit = [layers[0] / n, (layers[-1] + 1) / n]  # [first, last + 1) as fractions of the layers
    same = fit(cfg, "ramoe", tmp_path / "explicit", lam=10.0, band=explicit)
    assert same["band_layers"] == layers and same["task_experts"] == auto["task_experts"]
    _assert_same_training(auto, same, tol=0.0)
    other = fit(cfg, "ramoe", tmp_path / "other", lam=10.0, band=[0.0, 1.0])  # every layer: not a twin
    assert other["band_layers"] != layers
