"""Benchmark of stage 3 (train.py) and of steering at inference.

1. RA-MoE step time / SFT step time, same model, same batch, same optimizer: ``train_worker.batch_loss`` (the
   worker's loss) + backward + AdamW step, λ = 0 (SFT: no capture, no alignment) vs λ > 0 (capture with
   graph + alignment loss on the ci rows). Goal: <= 1.05. Plain torch (no DeepSpeed), so only the
   method's own cost is measured; ``--ci-fraction`` sets the share of ci rows (1.0 = worst case).
2. Steering overhead at inference: the taxonomy forward (``inference.routing_forward``: forward + capture
   + importance) with and without ``models.steer`` hooks on the band layers. Goal: <= 3 %.
3. ``--real``: the same ratio from ``train.train_cell`` with num_workers=0 (DeepSpeed ZeRO-3, world
   size 1) on the small synthetic world (median of the per-step times rank 0 recorded).
4. ``--scale``: training at scale on one accelerator: an OLMoE-1B-7B-shaped model (hidden 2048, 16 layers,
   64 experts top-8, expert intermediate 1024, vocab 50304; random init, bf16) with the expert LoRA, the
   same ``train_worker.batch_loss`` step (SFT and RA-MoE), gradient checkpointing; prints tokens/s, peak memory
   and MFU (model FLOPs = 6 x active parameters x tokens, the usual convention, against ``--peak-tflops``;
   with a frozen base the work really done is ~4 x active: both are printed). Plain torch, no DeepSpeed
   (ZeRO-3 on one GPU partitions nothing). ``--scale --device cpu --hidden 128 ...`` runs the same path small.
5. ``--fixed``: the fixed cost of the trainings of one cell in ONE process, as a sweep trial process with
   ``sweep.train_workers: 0`` runs them: the demo world's first cell (its first model and task, syn4), after one
   warm-up training, 7 trainings (SFT, RISE, RA-MoE λ = 1 and 5 with seed 0; SFT, RISE, RA-MoE λ = 5 with seed 1)
   sharing a fresh base-pass cache (the world, stages 1-2 and file hashes linked from ``--cache-from``, default
   .ramoe_cache); per training ``train_cell``'s wall time minus its training loop, and rank 0's phases (medians).
   Before / after a change: run it in a copy of the tree without the change, then here (``bench/sweep.py
   --one-cell``: the same through Ray Tune, with the validation evaluation).
6. ``--zero``: the same cell's RA-MoE training in one process at ZeRO stage 0 (what a CPU training of one rank
   runs: ``train_worker.zero_stage``) and forced to ZeRO-3, alternating: step time and ``train_cell`` time, ratios.

    .venv/bin/python bench/train.py [--family olmoe] [--hidden 128] [--layers 4] [--experts 8]
        [--batch-size 8] [--seq-len 64] [--steps 12] [--ci-fraction 1.0] [--threads 2] [--clock wall|cpu] [--real]
    python bench/train.py --scale [--device cuda] [--batch-size 8] [--seq-len 512] [--steps 10] [--peak-tflops 989]
    .venv/bin/python bench/train.py --fixed [--threads 1] [--cache-from DIR]
    .venv/bin/python bench/train.py --zero [--threads 1] [--rounds 3] [--cache-from DIR]
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

from ramoe_ray import (  # noqa: E402
    inference,  # noqa: E402
    train,
    train_worker,
)
from ramoe_ray import lora as LA  # noqa: E402
from ramoe_ray import models as M  # noqa: E402
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
        loss, _ = train_worker.batch_loss(model, batch, ci, targets, lam=lam, band_layers=band, task_experts=experts)
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
    for _ in range(2):  # interleaved, twice: load drift on a shared machine hits both
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
                inference.routing_forward(model, ids, mask, k=k)
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
        r = train.train_cell(cfg, cfg.models[0], cfg.tasks[0], "syn3", method=method, lam=lam, num_workers=0,
                          band=Band(start=0.25, end=1.0), top_k=1, run_dir=tmp / method)
        med[method] = statistics.median(r["step_seconds_rank0"][1:-1])
    print(f"train_cell, num_workers=0 + DeepSpeed ZeRO-3 (CPU), small world, {r['steps']} steps, "
          f"{r['n_ci']} ci of {r['n_train']}:")
    print(f"  SFT {1000 * med['sft']:.1f} ms/step, RA-MoE {1000 * med['ramoe']:.1f} ms/step, "
          f"ratio {med['ramoe'] / med['sft']:.3f}")


FIXED_RUNS = (("sft", None, 0), ("rise", None, 0), ("ramoe", 1.0, 0), ("ramoe", 5.0, 0), ("sft", None, 1),
              ("rise", None, 1), ("ramoe", 5.0, 1))


def _demo_cell(args, prefix: str):
    """The demo world's first cell (its first model and task, syn4) in a fresh folder: the world, stages 1-2 and
    file hashes linked from ``--cache-from`` (default .ramoe_cache), base_passes/ empty."""
    import tempfile

    from ramoe_ray import sources
    from ramoe_ray.config import load_config

    base = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "cache").mkdir()
    for d in ("world", "taxonomy", "experts", "hashes"):  # built before; base_passes/ starts empty
        (tmp / "cache" / d).symlink_to((Path(args.cache_from or base / ".ramoe_cache") / d).resolve())
    cfg = sources.resolve(load_config(base / "sweeps/demo.yaml", [f"cache_dir={tmp}/cache", f"output_dir={tmp}/out",
                                                                  "languages=[syn4]"]))
    return cfg, cfg.models[0], cfg.tasks[0], tmp


def bench_fixed(args):
    cfg, m, t, tmp = _demo_cell(args, "bench-fixed-")
    warm = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 2, "eval_batch_size": 32})})
    train.train_cell(warm, m, t, "syn4", method="sft", num_workers=0, run_dir=tmp / "warm-up")  # another base-pass key
    rows = []
    for method, lam, seed in FIXED_RUNS:
        t0 = time.perf_counter()
        r = train.train_cell(cfg, m, t, "syn4", method=method, lam=lam, seed=seed, num_workers=0,
                             run_dir=tmp / f"{method}-{lam}-{seed}")
        rows.append({"fixed": time.perf_counter() - t0 - sum(r["step_seconds_rank0"]), "in_loop": sum(r["step_seconds_rank0"]),
                     "prepare": r["seconds_prepare"], **r["phases_rank0"],
                     "base_passes_recomputed": r.get("base_passes_recomputed")})
    print(f"{m.name}/{t.name}/syn4: {len(rows)} trainings in one process (num_workers=0, {torch.get_num_threads()} "
          f"threads), {r['steps']} steps each, {r['n_train']} train examples, {r['n_ci']} ci")
    for k in ("fixed", "in_loop", "prepare", "imports_and_process_group", "model_load", "lora_and_deepspeed_initialize",
              "base_passes", "checkpoint_and_report", "checkpoint_save", "final_passes", "save_adapter"):
        vals = [row.get(k, 0.0) for row in rows]
        print(f"  {k:<32} median {statistics.median(vals):6.2f} s   ({' '.join(f'{v:.2f}' for v in vals)})")
    print(f"  base passes computed in: {[row['base_passes_recomputed'] for row in rows]}")


def bench_zero(args):
    """6. ``--zero``: a CPU training of one rank at ZeRO stage 0 (``train_worker.zero_stage``) against the same
    training forced to ZeRO-3, in one process, alternating: the demo world's first cell, RA-MoE λ = 5, the
    demo's 40 steps; median step time and whole ``train_cell`` time per stage, and their ratios."""
    from ramoe_ray import train_worker

    cfg, m, t, tmp = _demo_cell(args, "bench-zero-")
    real_stage = train_worker.zero_stage
    steps, total = {0: [], 3: []}, {0: [], 3: []}
    for i in range(1 + 2 * args.rounds):  # the first (stage 0) warms up and computes the base passes: not counted
        stage = 0 if i % 2 == 0 else 3
        train_worker.zero_stage = (lambda w, g, s=stage: s)
        t0 = time.perf_counter()
        r = train.train_cell(cfg, m, t, "syn4", method="ramoe", lam=5.0, num_workers=0, run_dir=tmp / f"run{i}")
        train_worker.zero_stage = real_stage
        assert r["zero_stage"] == stage
        if i:
            steps[stage].append(statistics.median(r["step_seconds_rank0"]))
            total[stage].append(time.perf_counter() - t0)
    med = {k: {"step": statistics.median(steps[k]), "total": statistics.median(total[k])} for k in steps}
    print(f"{m.name}/{t.name}/syn4, RA-MoE λ=5, {r['steps']} steps, num_workers=0, {torch.get_num_threads()} threads, "
          f"{args.rounds} trainings per stage (alternating):")
    for k in (3, 0):
        print(f"  ZeRO stage {k}: {1000 * med[k]['step']:.1f} ms/step, train_cell {med[k]['total']:.2f} s")
    print(f"  stage 0 / stage 3: step {med[0]['step'] / med[3]['step']:.2f}, train_cell {med[0]['total'] / med[3]['total']:.2f}")


def bench_scale(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = AutoConfig.for_model(
        "olmoe", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, num_experts=args.experts, num_experts_per_tok=args.top_k,
        intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
        norm_topk_prob=False, output_router_logits=False, pad_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    LA.apply_expert_lora(model, rank=8, alpha=16, seed=0)
    for p in LA.lora_parameters(model):  # factors in fp32 (optimizer state too), the base in bf16
        p.data = p.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    per_expert = 3 * args.hidden * args.intermediate
    n_active = n_total - args.layers * (args.experts - args.top_k) * per_expert - args.vocab * args.hidden  # no embedding lookup
    batch, ci = make_batch(args, args.vocab)
    batch = {k: v.to(device) for k, v in batch.items()}
    ci = ci.to(device)
    moe = sorted(M.moe_blocks(model))
    band = moe[len(moe) // 4: 3 * len(moe) // 4]
    experts = {l: list(range(args.top_k)) for l in band}
    targets = [torch.full((len(moe), args.experts), 1.0 / args.experts, device=device) if ci[i] else None
               for i in range(len(ci))]
    tokens = args.batch_size * args.seq_len
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{n_total / 1e9:.2f} B frozen params ({dtype}), {n_active / 1e9:.2f} B active per token, "
          f"{sum(p.numel() for p in LA.lora_parameters(model)) / 1e6:.1f} M LoRA params; batch {args.batch_size}x{args.seq_len}")
    for lam in (0.0, 1.0):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, _ = train_worker.batch_loss(model, batch, ci, targets, lam=lam, band_layers=band, task_experts=experts)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        t = statistics.median(times[2:])
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        mfu6 = 6 * n_active * tokens / t / (args.peak_tflops * 1e12)
        print(f"  {'SFT   ' if lam == 0 else 'RA-MoE'} {1000 * t:8.1f} ms/step  {tokens / t:9.0f} tokens/s  "
              f"peak {mem:5.1f} GiB  MFU {100 * mfu6:5.1f} % (6N)  {100 * mfu6 * 4 / 6:5.1f} % (4N)")


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
    p.add_argument("--real", action="store_true", help="also time train_cell (DeepSpeed, num_workers=0) on the small world")
    p.add_argument("--scale", action="store_true", help="only the OLMoE-1B-7B-shaped training step (see 4. above)")
    p.add_argument("--fixed", action="store_true", help="only the fixed cost of one cell's trainings (see 5. above)")
    p.add_argument("--zero", action="store_true", help="only ZeRO stage 0 against ZeRO-3, one rank (see 6. above)")
    p.add_argument("--rounds", type=int, default=3, help="--zero: trainings per stage")
    p.add_argument("--cache-from", default=None, help="--fixed, --zero: the cache holding the demo world and stages 1-2")
    p.add_argument("--device", default="cuda")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100 SXM: 989)")
    args = p.parse_args()
    if args.scale:
        for flag, value in (("hidden", 2048), ("layers", 16), ("experts", 64), ("seq_len", 512)):
            if f"--{flag.replace('_', '-')}" not in sys.argv:
                setattr(args, flag, value)
        torch.set_num_threads(args.threads)
        return bench_scale(args)
    if args.fixed or args.zero:
        torch.set_num_threads(args.threads)
        return bench_fixed(args) if args.fixed else bench_zero(args)
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
