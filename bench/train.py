"""Benchmark of stage 3 (train.py) and of steering at inference.

1. RA-MoE step time / SFT step time, same model, same batch, same optimizer: ``train.batch_loss`` (the
   worker's loss) + backward + AdamW step, λ = 0 (SFT: no capture, no alignment) vs λ > 0 (capture with
   graph + alignment loss on the ci rows). Goal: <= 1.05. Plain torch (no DeepSpeed), so only the
   method's own cost is measured; ``--ci-fraction`` sets the share of ci rows (1.0 = worst case).
2. Steering overhead at inference: the taxonomy forward (``taxonomy.routing_forward``: forward + capture
   + importance) with and without ``models.steer`` hooks on the band layers. Goal: <= 3 %.
3. ``--real``: the same ratio from ``train.train_cell`` in Ray Train local mode (DeepSpeed ZeRO-3, world
   size 1) on the small synthetic world (median of the per-step times rank 0 recorded).

    .venv/bin/python bench/train.py [--family olmoe] [--hidden 128] [--layers 4] [--experts 8]
        [--batch-size 8] [--seq-len 64] [--steps 12] [--ci-fraction 1.0] [--threads 2] [--clock wall|cpu] [--real]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process; robust on a shared machine)

from ramoe_ray import lora as LA  # noqa: E402
from ramoe_ray import models as M  # noqa: E402
from ramoe_ray import taxonomy as TX  # noqa: E402
from ramoe_ray import train as TR  # noqa: E402
from ramoe_ray.losses import soft_importance  # noqa: E402


def make_batch(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    b, t = args.batch_size, args.seq_len
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    n_prompt = t - 4
    labels[:, n_prompt:] = ids[:, n_prompt:]
    pmask = torch.zeros(b, t, dtype=torch.bool)
    pmask[:, :n_prompt] = True
    n_ci = round(args.ci_fraction * b)
    ci = torch.zeros(b, dtype=torch.bool)
    ci[:n_ci] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_mask": pmask}, ci


def step_times(model, batch, ci, targets, lam, band, experts, steps):
    opt = torch.optim.AdamW(LA.lora_parameters(model), lr=1e-3)
    model.train()
    out = []
    for _ in range(steps):
        t0 = CLOCK()
        loss, _ = TR.batch_loss(model, batch, ci, targets, lam=lam, band_layers=band, task_experts=experts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(CLOCK() - t0)
    return out


def bench_step(args):
    model = M.build_tiny(args.family, seed=0, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=2 * args.hidden, **{_experts_key(args.family): args.experts})
    LA.apply_expert_lora(model, rank=8, alpha=16, seed=0)
    batch, ci = make_batch(args, model.config.vocab_size)
    moe = sorted(M.moe_blocks(model))
    band = moe[len(moe) // 4: max(len(moe) // 4 + 1, 3 * len(moe) // 4)]
    experts = {l: [0, 1] for l in band}
    with torch.no_grad(), M.capture(model) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    t = soft_importance(rec.routing(batch["attention_mask"]).logits, batch["prompt_mask"])
    targets = [t[i] if ci[i] else None for i in range(len(ci))]
    res = {}
    for rep in range(2):  # interleaved, twice: load drift on a shared machine hits both
        for lam in (0.0, 1.0):
            times = step_times(model, batch, ci, targets, lam, band, experts, args.steps)[2:]
            res.setdefault(lam, []).extend(times)
    sft, ramoe = statistics.median(res[0.0]), statistics.median(res[1.0])
    print(f"step time ({args.family}, hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
          f"batch {args.batch_size}x{args.seq_len}, ci {args.ci_fraction:.0%}, band {band}):")
    print(f"  SFT    median {1000 * sft:8.2f} ms")
    print(f"  RA-MoE median {1000 * ramoe:8.2f} ms   ratio {ramoe / sft:.3f}  (goal <= 1.05)")
    return model, batch, band, experts


def _experts_key(family: str) -> str:
    return {"olmoe": "num_experts", "qwen3_moe": "num_experts", "deepseek_v2": "n_routed_experts"}.get(family,
                                                                                                     "num_local_experts")


def bench_steering(args, model, batch, band, experts):
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    k = model.config.num_experts_per_tok
    res = {"plain": [], "steered": []}
    for _ in range(args.steps):
        for name in ("plain", "steered"):
            ctx = M.steer(model, experts, 2.0) if name == "steered" else _Null()
            t0 = CLOCK()
            with ctx:
                TX.routing_forward(model, ids, mask, k=k)
            res[name].append(CLOCK() - t0)
    plain, steered = statistics.median(res["plain"][2:]), statistics.median(res["steered"][2:])
    print(f"steering at inference (taxonomy forward, batch {tuple(ids.shape)}, hooks on layers {band}):")
    print(f"  plain   median {1000 * plain:8.2f} ms")
    print(f"  steered median {1000 * steered:8.2f} ms   overhead {100 * (steered / plain - 1):+.1f} %  (goal <= 3 %)")


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def bench_real(args):
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import WORLD_CACHE, small_config

    from ramoe_ray import synthetic as S
    from ramoe_ray.config import Band

    S.build_model(S.SMALL, "olmoe", WORLD_CACHE, log_every=0)
    tmp = Path(tempfile.mkdtemp())
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "world").symlink_to((WORLD_CACHE / "world").resolve())
    cfg = small_config(cache, task="category", languages=("syn3",), resources=dict(inference_actors=0),
                       training=dict(lr=5e-3, batch_size=12, epochs=4, log_every=1000, checkpoint_every=1000))
    med = {}
    for method, lam in (("sft", 0.0), ("ramoe", 10.0)):
        r = TR.train_cell(cfg, cfg.models[0], cfg.tasks[0], "syn3", method=method, lam=lam, num_workers=0,
                          band=Band(start=0.25, end=1.0), top_k=1, run_dir=tmp / method)
        med[method] = statistics.median(r["step_seconds_rank0"][1:-1])
    print(f"train_cell, Ray Train local mode + DeepSpeed ZeRO-3 (CPU), small world, {r['steps']} steps, "
          f"{r['n_ci']} ci of {r['n_train']}:")
    print(f"  SFT {1000 * med['sft']:.1f} ms/step, RA-MoE {1000 * med['ramoe']:.1f} ms/step, "
          f"ratio {med['ramoe'] / med['sft']:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="olmoe", choices=list(M.FAMILIES))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ci-fraction", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: perf_counter; cpu: process CPU time (use with --threads 1 on a loaded machine)")
    p.add_argument("--real", action="store_true", help="also time train_cell (DeepSpeed, local mode) on the small world")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}, threads {args.threads}")
    torch.set_num_threads(args.threads)
    model, batch, band, experts = bench_step(args)
    bench_steering(args, model, batch, band, experts)
    if args.real:
        bench_real(args)


if __name__ == "__main__":
    main()
