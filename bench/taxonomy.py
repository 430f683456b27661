"""Benchmark of stage 1 (taxonomy).

CPU mode (default): the Ray Data path against the bare single-process loop, same model, same rows,
same batch size, equal compute (1 actor with T threads vs the loop with T threads), then the cost of
routing capture (same batches: plain forward / forward under capture / + importance and frequency) and,
for a generative task, of generation (``inference.generate_texts``: ``model.generate``, whose prefill is
the prompt forward: the stage records the routing there, ``inference.generate_with_routing``) next to the
prompt forward alone.

    .venv/bin/python bench/taxonomy.py cpu [--threads 2] [--repeat 4] [--batch-size 8]
        [--model synthetic-small:olmoe --family olmoe] [--task synthetic-small:category]

GPU mode: the bare loop only (no Ray: ray is imported lazily, only by the CPU mode's Ray path) on a
randomly initialised model built on the device from an HF config, OLMoE-1B-7B-shaped by default
(hidden 2048, 16 layers, 64 experts top-8, expert intermediate 1024, vocab 50304, bf16), with random
token prompts of mixed lengths (right padding, as the stage). Reports examples/s and prompt tokens/s
of the taxonomy forward (forward + capture + importance; with --gen-tokens N also N greedy tokens by
``model.generate``), and the same breakdown.

    python bench/taxonomy.py gpu [--batch-size 32] [--seq-len 256] [--batches 20] [--gen-tokens 0]
        [--hidden 2048 --layers 16 --experts 64 --top-k 8 --intermediate 1024 --vocab 50304] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from ramoe_ray import inference, models, taxonomy  # noqa: E402
from ramoe_ray.routing_stats import sequence_importance  # noqa: E402


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def capture_breakdown(model, batches, k: int, repeats: int = 5) -> dict:
    """Seconds over the same batches: plain forward; forward under capture (+ Routing assembled);
    and that plus importance/frequency (what the stage runs). Best of ``repeats``."""
    def run(mode: str) -> float:
        _sync(model.device)
        t0 = time.perf_counter()
        for ids, mask in batches:
            last = mask.sum(1) - 1
            with torch.no_grad():
                if mode == "plain":
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None])
                    continue
                with models.capture(model) as rec:
                    model(input_ids=ids, attention_mask=mask, logits_to_keep=last[:, None])
                r = rec.routing(mask)
                if mode == "importance":
                    sequence_importance(r.probs(), r.selected, r.mask, k=k)
                else:
                    r.probs()
        _sync(model.device)
        return time.perf_counter() - t0

    run("plain")  # warm-up
    best = {m: float("inf") for m in ("plain", "capture", "importance")}
    for _ in range(repeats):  # interleaved, best of each: robust to a machine shared with other jobs
        for m in best:
            best[m] = min(best[m], run(m))
    return best


def _print_breakdown(b: dict, n_examples: int, n_tokens: int) -> None:
    print(f"  plain forward           {b['plain']:8.3f} s  {n_examples / b['plain']:9.1f} ex/s  {n_tokens / b['plain']:11.0f} tok/s")
    print(f"  + capture               {b['capture']:8.3f} s  ratio {b['capture'] / b['plain']:.3f}")
    print(f"  + importance/frequency  {b['importance']:8.3f} s  ratio {b['importance'] / b['plain']:.3f}"
          f"  ({n_examples / b['importance']:.1f} ex/s, {n_tokens / b['importance']:.0f} tok/s)")


# ------------------------------------------------------------------------------------------------ CPU


def cpu(args) -> None:
    from ramoe_ray import sources
    from ramoe_ray.config import config_from_dict
    from ramoe_ray.synthetic import TARGET_LANGUAGES, TASKS

    cache = args.cache or tempfile.mkdtemp(prefix="ramoe-bench-")
    task = args.task.split(":", 1)[1] if args.task.startswith("synthetic") else "task"
    fmt = TASKS.get(task, args.format)
    langs = args.languages or TARGET_LANGUAGES
    cfg = sources.resolve(config_from_dict(dict(
        models=[dict(name="m", family=args.family, path=args.model)],
        tasks=[dict(name=task, format=fmt, source=args.task)], languages=langs, cache_dir=cache)))
    plan = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], langs, "train", max_new_tokens=args.max_new_tokens)
    rows = taxonomy.rows_frame(plan, ["en"] + langs, False)
    import pandas as pd

    rows = pd.concat([rows.assign(id=rows.id + f"#{r}") for r in range(args.repeat)], ignore_index=True)
    rows = rows.iloc[rows.prompt.str.len().argsort(kind="stable")].reset_index(drop=True)
    n = len(rows)
    print(f"model {args.model} ({plan.shape.family}, {plan.shape.num_layers} layers, {plan.shape.num_experts} experts "
          f"top-{plan.shape.experts_per_token}), task {args.task} ({fmt}), {n} examples, batch {args.batch_size}, "
          f"{args.threads} threads, cache {cache}")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = inference.load_model_and_tokenizer(plan.model_path, plan.model_cfg)
    load = time.perf_counter() - t0
    recs = rows.to_dict("records")
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        inference.predict_rows(model, tok, recs[i : i + args.batch_size], k=plan.shape.experts_per_token,
                               max_new_tokens=plan.max_new_tokens)
    bare = time.perf_counter() - t0
    print(f"\nbare loop: load {load:.2f} s, run {bare:.2f} s -> {n / bare:.1f} ex/s ({n / (bare + load):.1f} ex/s with load)")

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    init = time.perf_counter() - t0
    # every map_batches call starts its own actor pool (process start, imports, model load): a
    # one-batch run measures that fixed cost; the full runs give end-to-end and marginal rates
    t0 = time.perf_counter()
    kwargs = taxonomy.predictor_kwargs(plan)
    inference.map_rows(rows.iloc[: args.batch_size], inference.Predictor, kwargs, num_actors=1,
                       batch_size=args.batch_size, cpus_per_actor=args.threads)
    fixed = time.perf_counter() - t0
    ray_runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = inference.map_rows(rows, inference.Predictor, kwargs, num_actors=1, batch_size=args.batch_size,
                                 cpus_per_actor=args.threads)
        ray_runs.append(time.perf_counter() - t0)
        assert len(out) == n
    ray.shutdown()
    best = min(ray_runs)
    marginal = (n - args.batch_size) / max(best - fixed, 1e-9)
    print(f"ray data (1 actor x {args.threads} threads): ray.init {init:.2f} s; fixed cost per run (pool start, "
          f"model load, one batch) {fixed:.2f} s; full runs {', '.join(f'{r:.2f}' for r in ray_runs)} s")
    print(f"  end to end {n / best:.1f} ex/s; marginal (beyond the fixed cost) {marginal:.1f} ex/s")
    print(f"ratio ray / bare, examples/s: end to end {(n / best) / (n / bare):.3f} "
          f"(bare incl. its model load: {(n / best) / (n / (bare + load)):.3f}); marginal {marginal / (n / bare):.3f}")

    batches = []
    for i in range(0, n, args.batch_size):
        enc = tok(rows.prompt.iloc[i : i + args.batch_size].tolist(), return_tensors="pt", padding=True)
        batches.append((enc["input_ids"], enc["attention_mask"]))
    n_tokens = sum(int(m.sum()) for _, m in batches)
    print(f"\nrouting capture, same {len(batches)} batches ({n_tokens} prompt tokens), prompt forward only:")
    breakdown = capture_breakdown(model, batches, plan.shape.experts_per_token)
    _print_breakdown(breakdown, n, n_tokens)
    if plan.task_cfg.format == "generative_numeric":
        gen = generation_seconds(model, tok, batches, plan.max_new_tokens)
        print(f"  generation (model.generate, up to {plan.max_new_tokens} tokens, its own prompt prefill) "
              f"{gen:8.3f} s  ratio to the taxonomy forward {gen / breakdown['importance']:.3f}")


def generation_seconds(model, tok, batches, max_new_tokens: int, repeats: int = 3) -> float:
    """Seconds of ``inference.generate_texts`` over the batches, best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        for ids, mask in batches:
            inference.generate_texts(model, tok, ids, mask, max_new_tokens)
        _sync(model.device)
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------------------ GPU


def gpu(args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = AutoConfig.for_model(
        "olmoe", hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, num_experts=args.experts, num_experts_per_tok=args.top_k,
        intermediate_size=args.intermediate, vocab_size=args.vocab, max_position_embeddings=4096,
        norm_topk_prob=False, output_router_logits=False, pad_token_id=1, eos_token_id=50279 % args.vocab,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{n_params / 1e9:.2f} B params ({args.dtype}), built in {time.perf_counter() - t0:.1f} s; "
          f"{args.layers} layers, {args.experts} experts top-{args.top_k}")

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (args.batch_size,), generator=g)
        ids = torch.randint(2, args.vocab, (args.batch_size, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        batches.append((ids.to(device), mask.to(device)))
    n = args.batch_size * args.batches
    n_tokens = sum(int(m.sum()) for _, m in batches)
    print(f"{args.batches} batches x {args.batch_size} prompts, {args.seq_len // 2}-{args.seq_len} tokens "
          f"(right padding): {n_tokens} prompt tokens")

    # the taxonomy's prompt pass as the stage runs it (routing_forward; with generation, generation's prefill
    # records the routing: generate_with_routing), then the breakdown
    inference.routing_forward(model, *batches[0], k=args.top_k)
    _sync(device)
    t0 = time.perf_counter()
    for ids, mask in batches:
        if args.gen_tokens:
            inference.generate_with_routing(model, _NoText(), ids, mask, args.gen_tokens, k=args.top_k)
        else:
            inference.routing_forward(model, ids, mask, k=args.top_k)
    _sync(device)
    total = time.perf_counter() - t0
    what = "prompt forward + capture + importance" + (f" + {args.gen_tokens} greedy tokens" if args.gen_tokens else "")
    print(f"\ntaxonomy bare loop ({what}): {total:.3f} s -> {n / total:.1f} examples/s, {n_tokens / total:.0f} prompt tokens/s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print("\nbreakdown, same batches:")
    _print_breakdown(capture_breakdown(model, batches, args.top_k), n, n_tokens)


class _NoText:
    """Tokenizer stand-in for random-token generation: decodes to nothing, so only eos/length stop."""

    eos_token_id = None
    pad_token_id = 1  # the config's

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    c = sub.add_parser("cpu")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--repeat", type=int, default=4, help="repeat the rows (more examples)")
    c.add_argument("--model", default="synthetic-small:olmoe")
    c.add_argument("--family", default="olmoe")
    c.add_argument("--task", default="synthetic-small:category")
    c.add_argument("--format", default="generative_numeric", help="format of a non-synthetic task")
    c.add_argument("--languages", nargs="*", default=None)
    c.add_argument("--max-new-tokens", type=int, default=inference.MAX_NEW_TOKENS)
    c.add_argument("--cache", default=None)
    g = sub.add_parser("gpu")
    g.add_argument("--device", default="cuda")
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batches", type=int, default=20)
    g.add_argument("--gen-tokens", type=int, default=0)
    g.add_argument("--hidden", type=int, default=2048)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--top-k", type=int, default=8)
    g.add_argument("--intermediate", type=int, default=1024)
    g.add_argument("--vocab", type=int, default=50304)
    args = p.parse_args()
    if args.mode == "gpu":
        gpu(args)
    else:
        if args.mode is None:
            args = p.parse_args(["cpu"] + sys.argv[1:])
        cpu(args)


if __name__ == "__main__":
    main()
