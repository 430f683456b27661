"""ASHA against the full grid (sweep.scheduler: asha | grid) on a slice of the synthetic grid: RA-MoE's 27
knob settings (3 λ × 3 bands × 3 top-k) in each cell of one model × one task × some languages, run once with
every trial to the end and once with ASHA, one seed, in one fresh output folder (the cache is shared).

Per cell it prints what each chose on validation (the selection rule of sweep.select: the highest val_acc,
the earliest in grid order on a tie), whether they are the same configuration, each pick's validation
accuracy, the rank of ASHA's pick among the grid's 27, and the steps each trained; then both wall times.
A training with rungs is bit-identical to one without (tests/test_asha.py), so a setting ASHA let finish has
the grid's own val_acc.

    .venv/bin/python bench/asha.py [--config sweeps/synthetic-grid.yaml] [--model olmoe-world] [--task arith]
                                   [--languages syn3 syn4 syn5] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ramoe_ray import sources, sweep, tracking  # noqa: E402
from ramoe_ray.config import load_config  # noqa: E402


def run(config: str, overrides: list[str], scheduler: str, out: Path, model: str, task: str,
        again: bool) -> tuple[object, float]:
    """The slice's sweep with ``scheduler`` (``again``: read the one already in ``out``); (children, wall s)."""
    cfg = load_config(config, [*overrides, f"output_dir={out}/{scheduler}", f"sweep.scheduler={scheduler}",
                               "methods=[ramoe]", "training.seeds=[0]", f"name=asha-bench-{scheduler}",
                               f"tracking.experiment=asha-bench-{scheduler}"])
    cfg = cfg.model_copy(update={"models": [m for m in cfg.models if m.name == model],
                                 "tasks": [t for t in cfg.tasks if t.name == task]})
    if not again:
        sweep.run_sweep(cfg)
    cfg = sources.resolve(cfg)
    client = tracking.mlflow_client(cfg.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parent = client.get_run(tracking.find_parent(client, exp.experiment_id, cfg.name))
    kids = tracking.children(client, exp.experiment_id, parent.info.run_id)
    return kids, parent.data.metrics["seconds_trials"]


def _label(row) -> str:
    return f"λ={float(row['params.lam']):g} band={row['params.band']} top_k={row['params.top_k']}"


def _steps(kids) -> int:
    """Steps trained: a completed trial's schedule, a stopped trial's rung step (twins trained nothing)."""
    kids = kids[~tracking.twin_rows(kids)]
    stopped = tracking.stopped_rows(kids)
    done = kids.loc[~stopped, "params.steps"].astype(float).sum()
    return int(done + (kids.loc[stopped, "metrics.step"].astype(float).sum() if stopped.any() else 0))


def compare(grid_kids, asha_kids) -> list[dict]:
    out = []
    for lang, g in grid_kids.groupby("tags.language"):
        a = asha_kids[asha_kids["tags.language"] == lang]
        g = g.assign(i=g["tags.trial_index"].astype(int)).sort_values("i")
        pick_g = g.loc[g["metrics.val_acc"].idxmax()]
        pick_a = a[a["tags.selected"] == "true"].iloc[0]
        vals = sorted(g["metrics.val_acc"], reverse=True)
        rank = 1 + sum(v > pick_a["metrics.val_acc"] for v in vals)
        out.append({"language": lang, "grid": _label(pick_g), "grid_val": pick_g["metrics.val_acc"],
                    "asha": _label(pick_a), "asha_val": pick_a["metrics.val_acc"],
                    "same": _label(pick_g) == _label(pick_a), "rank": rank,
                    "stopped": int(tracking.stopped_rows(a).sum()), "n": len(g),
                    "steps_grid": _steps(g), "steps_asha": _steps(a)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sweeps/synthetic-grid.yaml")
    p.add_argument("--model", default="olmoe-world")
    p.add_argument("--task", default="arith")
    p.add_argument("--languages", nargs="+", default=["syn3", "syn4", "syn5"])
    p.add_argument("--again", default=None, help="the output folder of an earlier run of this bench: compare again")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.again) if args.again else Path(tempfile.mkdtemp(prefix="bench-asha-"))
    over = [*args.overrides, f"languages=[{','.join(args.languages)}]"]
    grid_kids, grid_wall = run(args.config, over, "grid", out, args.model, args.task, bool(args.again))
    asha_kids, asha_wall = run(args.config, over, "asha", out, args.model, args.task, bool(args.again))
    print(f"output folder: {out}")
    rows = compare(grid_kids, asha_kids)
    print(f"\n{args.model} / {args.task}: RA-MoE's settings per cell, full grid vs ASHA (validation accuracy)")
    print("| language | full grid's pick | val | ASHA's pick | val | same | rank in grid | stopped | steps grid / ASHA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['language']} | {r['grid']} | {100 * r['grid_val']:.1f} % | {r['asha']} | {100 * r['asha_val']:.1f} % | "
              f"{'yes' if r['same'] else 'no'} | {r['rank']} of {r['n']} | {r['stopped']} of {r['n']} | "
              f"{r['steps_grid']} / {r['steps_asha']} |")
    same = sum(r["same"] for r in rows)
    steps_g, steps_a = sum(r["steps_grid"] for r in rows), sum(r["steps_asha"] for r in rows)
    loss = [100 * (r["grid_val"] - r["asha_val"]) for r in rows]
    print(f"\nsame configuration in {same} of {len(rows)} cells; ASHA's pick below the grid's by "
          f"{sum(loss) / len(loss):.1f} points on average (max {max(loss):.1f}); steps trained {steps_a} / {steps_g} "
          f"= {steps_a / steps_g:.2f}; the trials' wall time {asha_wall:.0f} s / {grid_wall:.0f} s = {asha_wall / grid_wall:.2f}")


if __name__ == "__main__":
    main()
