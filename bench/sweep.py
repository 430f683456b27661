"""Benchmark of the sweep (sweep.py): the fixed cost per trial and the sweep overhead.

- **fixed cost per trial** = the trial's wall time minus the time inside the training loop (steps,
  from rank 0's step times), broken down by phase: ``prepare`` (checks + stages 1-2 from the cache,
  in the trial), the worker's phases (imports and process group, model load, LoRA + DeepSpeed
  initialize, the base-model passes (English targets, routing KL, train CE: computed by the first
  training of a cell, read from ``base_cache`` by the others), checkpoint + report, the final pass,
  saving the adapter), the validation evaluation, and the rest (Ray Train's controller and worker
  group, Tune's bookkeeping inside the trial). Goal: <= 10 s on 2 CPU cores.
- **sweep overhead** = the sweep's wall time / (sum of in-loop trial times / concurrency): how much
  longer the sweep takes than its training loops alone would at the same concurrency. Next to it, the
  **overhead floor** = (in-loop + the evaluations the method needs: validation, ASHA's rungs, test) / in-loop,
  the overhead of a sweep in which nothing else took time, and the overhead beyond that floor.

    .venv/bin/python bench/sweep.py [CONFIG] [--run] [--sweep RUN_ID] [key=value ...]
        CONFIG default sweeps/demo.yaml; --run runs the sweep first (else: the newest sweep of CONFIG in
        its MLflow database).
    .venv/bin/python bench/sweep.py --compare-workers [--cell-trials 4]
        the same small sweep (1 cell of the demo world, SFT + RA-MoE) with training in the trial process
        (sweep.train_workers = 0) and with one Ray Train worker per trial (= 1): fixed cost of each.
    .venv/bin/python bench/sweep.py --one-cell [--concurrency 2] [--cache-from DIR]
        one cell of the demo world (first model and task, syn4; SFT, RISE, RA-MoE x 2 lambdas, seeds 0 and 1:
        7 trained trials), training in the trial process, in a fresh output folder and a fresh base-pass cache
        (the world, stages 1-2 and file hashes linked from DIR, default .ramoe_cache): the fixed cost per trained
        trial and its phases. Before / after a change: run it in a copy of the tree without the change, then here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ramoe_ray import grid, sources, sweep, tracking  # noqa: E402
from ramoe_ray.config import load_config  # noqa: E402

PHASES = ("imports_and_process_group", "model_load", "lora_and_deepspeed_initialize", "base_passes",
          "checkpoint_load", "checkpoint_and_report", "rung_eval", "final_passes", "save_adapter")


def analyse(cfg, parent_id: str | None = None) -> dict:
    cfg = sources.resolve(cfg)  # absolute paths: the sweep's own MLflow URI and run folder
    client = tracking.mlflow_client(cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        sys.exit(f"no experiment {cfg.tracking.experiment!r} in {cfg.mlflow_uri}: run with --run")
    parent_id = parent_id or tracking.find_parent(client, exp.experiment_id, cfg.name)
    if parent_id is None:
        sys.exit(f"no sweep {cfg.name!r} in {cfg.mlflow_uri}: run with --run")
    parent = client.get_run(parent_id)
    kids = tracking.children(client, exp.experiment_id, parent_id)
    kids = kids[kids.status == "FINISHED"]
    tested = kids  # twins included: a selected twin is tested on its own
    twins = tracking.twin_rows(kids)
    if twins.any():  # logged with the results of the trial they repeat (grid.twins): they cost nothing
        print(f"{int(twins.sum())} twins (the same computation as another trial of their cell) left out below")
    kids = kids[~twins]
    stopped = kids[tracking.stopped_rows(kids)]  # ASHA stopped them at a rung: no trial.json, steps from the rung
    kids = kids[~tracking.stopped_rows(kids)]
    records = [json.loads((Path(d) / grid.TRIAL_JSON).read_text()) for d in kids["tags.ramoe.trial_dir"]]
    trained = [r for r in records if r["spec"]["method"] != "steering"]
    steer = [r for r in records if r["spec"]["method"] == "steering"]
    fixed = [r["timing"]["total"] - r["timing"]["in_loop"] for r in trained]
    in_loop = sum(r["timing"]["in_loop"] for r in records)
    if len(stopped):  # their in-loop time: logged (seconds_in_loop), else their steps x the median step time
        per_step = statistics.median(r["timing"]["in_loop"] / r["train"]["steps"] for r in records
                                     if r["spec"]["method"] != "steering" and r["train"]["steps"])
        col = stopped["metrics.seconds_in_loop"] if "metrics.seconds_in_loop" in stopped else None
        stop_loop = [float(c) if col is not None and c == c else float(s) * per_step
                     for c, s in zip(col if col is not None else [None] * len(stopped), stopped["metrics.step"])]
        in_loop += sum(stop_loop)
        print(f"{len(stopped)} trials stopped by ASHA: {stopped['metrics.step'].astype(float).sum():.0f} steps, "
              f"{sum(stop_loop):.0f} s in their training loops")
    conc = sweep.max_concurrent(cfg, {"CPU": os.cpu_count() or 1})
    wall = parent.data.metrics.get("sweep_seconds")
    print(f"sweep {cfg.name!r} (run {parent_id}): {len(records)} finished trials ({len(trained)} trained, "
          f"{len(steer)} steering), concurrency {conc}")
    hosts = collections.Counter(tracking.environment_tags(r["env"])[tracking.HOST_TAG] if r.get("env") else
                                "not recorded (a sweep before trials recorded their host)" for r in records)
    print("trials ran on: " + "; ".join(f"{h} ({n})" for h, n in hosts.most_common()))
    print(machine_speed() + " (this bench's host, now)")
    if trained:
        print(f"fixed cost per trained trial (total - in-loop): median {statistics.median(fixed):.1f} s, "
              f"mean {statistics.mean(fixed):.1f} s, max {max(fixed):.1f} s   (target <= 1.5 s)")
        print(f"  in-loop per trained trial: median {statistics.median(r['timing']['in_loop'] for r in trained):.1f} s "
              f"({statistics.median(r['train']['steps'] for r in trained):.0f} steps)")
        rows = {"prepare (trial: checks, stages 1-2 from cache)": [r["timing"]["prepare"] or 0 for r in trained]}
        for p in PHASES:
            rows[f"worker: {p}"] = [r["phases"].get(p, 0.0) for r in trained]
        rows["validation evaluation"] = [r["timing"]["eval"] for r in trained]
        known = [sum(v[i] for v in rows.values()) for i in range(len(trained))]
        rows["rest (Ray Train start/stop, Tune, trial.json)"] = [f - k for f, k in zip(fixed, known)]
        print("  where it goes (median s):")
        for name, v in rows.items():
            print(f"    {name:<52} {statistics.median(v):6.2f}")
        counts = [r["train"].get("base_passes_recomputed") for r in trained]
        if any(c is not None for c in counts):
            print(f"  base passes computed in {sum(c or 0 for c in counts)} of {len(trained)} trained trials "
                  "(the others read base_cache)")
    if steer:
        print(f"steering trial (no training): median {statistics.median(r['timing']['total'] for r in steer):.1f} s")
    m = parent.data.metrics
    resumes = parent.data.tags.get(tracking.RESUMES_TAG)
    if wall and resumes:  # the logged wall times are the last run's; the trials above are every run's
        print(f"sweep wall time: not compared (continued {resumes} time(s) with --resume; its logged wall times are "
              f"its last run's, {wall:.0f} s, while the trials above are every run's)")
    elif wall:
        ph = {k: m.get(f"seconds_{k}") for k in ("checks", "stages", "trials", "replicates", "selection_and_test")}
        print(f"sweep wall time {wall:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in ph.items() if v is not None)
              + " (checks include building the synthetic world on first use)")
        work = sum(v for k, v in ph.items() if v is not None and k != "checks") or wall
        trial_sum = sum(r["timing"]["total"] for r in records)
        print(f"  sum of in-loop times {in_loop:.0f} s; sum of trial times {trial_sum:.0f} s")
        print(f"  sweep overhead = (stages + trials + replicates + selection) / (in-loop / {conc}) = "
              f"{work / max(in_loop / conc, 1e-9):.1f}")
        evaluation_floor(client, records, stopped, tested, in_loop, work, conc)
        busy = tune_busy(cfg, parent_id)
        if ph["trials"] and busy:
            tune = ph["trials"] + (ph["replicates"] or 0)
            print(f"  Tune phases / (Tune trials' own time / {conc}) = {tune / max(busy / conc, 1e-9):.2f} "
                  f"(1.0 = no scheduling gaps; the trials' time as Tune measured it, those ASHA stopped included)")
    return {"fixed": fixed, "wall": wall, "in_loop": in_loop}


def evaluation_floor(client, records: list, stopped, tested, in_loop: float, work: float, conc: int) -> None:
    """The evaluations the method needs, and the overhead a sweep would have if nothing but its training
    loops and these evaluations took time: validation (every trial, steering's model load included), ASHA's
    rungs, the test split of the selected trials and replicates. Stage 1's inference is left out (it is
    not timed per row), so the floor is a lower bound."""
    val = sum(r["timing"]["eval"] or 0.0 for r in records)
    rungs = sum(r["phases"].get("rung_eval", 0.0) for r in records)
    for rid, last in zip(stopped.run_id, stopped.get("metrics.rung_seconds", [0.0] * len(stopped))):
        # a stopped trial logs its last rung's seconds only: an estimate, its rungs taken as equally long
        rungs += (float(last) if last == last else 0.0) * len(client.get_metric_history(rid, "rung_percent_trained"))
    test = float(tested["metrics.seconds_test"].fillna(0).sum()) if "metrics.seconds_test" in tested else None
    if test is None:
        print("  evaluation floor: not computed (a sweep before the test evaluations were timed: no seconds_test)")
        return
    ev = val + rungs + test
    print(f"  evaluation the method needs: validation {val:.0f} s, ASHA rungs {rungs:.0f} s, test {test:.0f} s "
          f"(stage 1's inference not counted)")
    print(f"  overhead floor = (in-loop + evaluation) / in-loop = {(in_loop + ev) / max(in_loop, 1e-9):.2f} "
          f"(the overhead if nothing else took time); beyond it: (stages + trials + replicates + selection) / "
          f"((in-loop + evaluation) / {conc}) = {work / max((in_loop + ev) / conc, 1e-9):.2f}")


def machine_speed() -> str:
    """How fast this machine runs what the world's trials are made of (one core): the same figures on two
    machines make their sweep times comparable (absolute seconds differ between hosts of the same size)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(1000):
        a @ a
    t1 = time.perf_counter()
    s = 0
    for i in range(2_000_000):
        s += i
    t2 = time.perf_counter()
    torch.set_num_threads(threads)
    return f"machine: 1,000 matmuls 256x256 {t1 - t0:.2f} s, a 2M-step Python loop {t2 - t1:.2f} s (one core)"


def tune_busy(cfg, parent_id: str) -> float:
    """The sum of the Tune trials' own times (time_total_s of each trial's last result, Tune's result.json)."""
    total = 0.0
    for f in sweep.tune_storage(cfg).glob(f"tune/sweep-{parent_id}*/*/result.json"):
        lines = f.read_text().strip().splitlines()
        total += json.loads(lines[-1]).get("time_total_s", 0.0) if lines else 0.0
    return total


def compare_workers(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    base = Path(__file__).resolve().parents[1]
    res = {}
    for workers in (0, 1):
        # the same CPUs per trial: training in the trial: 1 CPU (the trial process trains); with a worker group the
        # trial process holds 0.25 CPU and its Ray Train worker 0.75
        over = [f"output_dir={tmp}/w{workers}", "languages=[syn4]", "methods=[sft,ramoe]",
                "knobs.bands=[[0.375,0.625]]", f"sweep.train_workers={workers}",
                f"resources.cpus_per_worker={0.75 if workers else 1}", f"sweep.max_concurrent_trials={args.concurrency}"]
        cfg = load_config(base / "sweeps/demo.yaml", over)
        cfg = cfg.model_copy(update={"tasks": cfg.tasks[:1], "models": cfg.models[:1]})
        t0 = time.time()
        sweep.run_sweep(cfg)
        print(f"\n== sweep.train_workers = {workers}: {time.time() - t0:.0f} s")
        res[workers] = analyse(cfg)
    a, b = statistics.median(res[0]["fixed"]), statistics.median(res[1]["fixed"])
    print(f"\nfixed cost per trial: in the trial process {a:.1f} s, 1 Ray Train worker {b:.1f} s (ratio {b / a:.1f})")


def one_cell(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-one-cell-"))
    base = Path(__file__).resolve().parents[1]
    over = [f"output_dir={tmp}/out", f"cache_dir={tmp}/cache", "languages=[syn4]", "methods=[sft,rise,ramoe]",
            "knobs.bands=[[0.375,0.625]]", "sweep.train_workers=0", f"sweep.max_concurrent_trials={args.concurrency}"]
    cfg = load_config(base / "sweeps/demo.yaml", over)
    cfg = cfg.model_copy(update={"tasks": cfg.tasks[:1], "models": cfg.models[:1]})
    shared = Path(args.cache_from or base / ".ramoe_cache")
    (tmp / "cache").mkdir(parents=True)
    for d in ("world", "taxonomy", "experts", "hashes"):  # built before; base_passes/ starts empty
        (shared / d).mkdir(parents=True, exist_ok=True)
        (tmp / "cache" / d).symlink_to((shared / d).resolve(), target_is_directory=True)
    t0 = time.time()
    sweep.run_sweep(cfg)
    print(f"\n== one cell, {tmp}: {time.time() - t0:.0f} s")
    analyse(cfg)
    shutil.rmtree(tmp / "out", ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="sweeps/demo.yaml")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run", action="store_true", help="run the sweep first")
    p.add_argument("--sweep", default=None, help="parent run id (default: the newest sweep of the config)")
    p.add_argument("--compare-workers", action="store_true")
    p.add_argument("--one-cell", action="store_true")
    p.add_argument("--cache-from", default=None, help="--one-cell: the cache to link the world and stages 1-2 from "
                   "(default: this tree's .ramoe_cache)")
    p.add_argument("--concurrency", type=int, default=2)
    args = p.parse_args()
    if args.compare_workers:
        return compare_workers(args)
    if args.one_cell:
        return one_cell(args)
    cfg = load_config(args.config, args.overrides)
    if args.run:
        sweep.run_sweep(cfg)
    analyse(cfg, args.sweep)


if __name__ == "__main__":
    main()
