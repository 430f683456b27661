"""RISE's trainable parameters and optimizer state: full weights of K experts vs RISE-LoRA vs every expert.

1. Measured on a tiny model (``models.build_tiny``): the adapter applied (``expert_delta`` for full,
   ``lora`` masked for RISE-LoRA, the fused expert weights unfrozen for "all experts"), one AdamW step,
   the trainable parameters and the bytes of AdamW's state (exp_avg + exp_avg_sq) counted.
2. By arithmetic from the HF configs of the real models (OLMoE-1B-7B-0125, Qwen3-30B-A3B): an expert is
   gate + up + down = 3 · hidden · expert_intermediate parameters; RISE-LoRA registers rank-r factors for
   every expert of every MoE layer (the mask zeroes the unselected ones' gradients, but AdamW still holds
   their state): r · (2 · hidden + 3 · intermediate) per expert. Adam state is 8 B per trainable parameter
   (fp32 m and v); under bf16 mixed precision DeepSpeed adds a 4 B fp32 master copy (12 B in all), split
   over the ZeRO-3 ranks.

    .venv/bin/python bench/rise_memory.py [--rank 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ramoe_ray import expert_delta, lora, models  # noqa: E402
from ramoe_ray.config import RiseConfig  # noqa: E402

# From the models' config.json (hidden_size, expert intermediate size, MoE layers, experts per layer).
REAL = {
    "OLMoE-1B-7B-0125": dict(hidden=2048, intermediate=1024, layers=16, experts=64),
    "Qwen3-30B-A3B": dict(hidden=2048, intermediate=768, layers=48, experts=128),
}


def measured(family: str, k: int, rank: int) -> dict[str, tuple[int, int]]:
    """{variant: (trainable parameters, AdamW state bytes)} after one step on a tiny model."""
    base = models.build_tiny(family, seed=0)
    first = min(models.experts_modules(base))
    experts = {first: list(range(k))}  # k experts, all in the first MoE layer (the count is what matters)
    variants = {}
    m = expert_delta.apply_expert_delta(copy.deepcopy(base), experts=experts)
    variants["full (RISE)"] = (m, expert_delta.delta_parameters(m))
    m = lora.apply_expert_lora(copy.deepcopy(base), rank=rank, alpha=2 * rank, seed=0, experts_mask=experts)
    variants["lora (RISE-LoRA)"] = (m, lora.lora_parameters(m))
    m = copy.deepcopy(base)
    for p in m.parameters():
        p.requires_grad_(False)
    params = [p for ex in models.experts_modules(m).values() for p in ex.parameters(recurse=False)]
    for p in params:
        p.requires_grad_(True)
    variants["all experts"] = (m, params)
    ids = torch.randint(3, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, (model, params) in variants.items():
        opt = torch.optim.AdamW(params, lr=1e-3)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"]))
        out[name] = (sum(p.numel() for p in params), state)
    return out


def arithmetic(shape: dict, k: int, rank: int) -> dict[str, int]:
    """{variant: trainable parameters} of a real model's shape."""
    h, i, n = shape["hidden"], shape["intermediate"], shape["layers"] * shape["experts"]
    return {"full (RISE)": k * 3 * h * i, "lora (RISE-LoRA)": n * rank * (2 * h + 3 * i), "all experts": n * 3 * h * i}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (training.lora_rank, default 8)")
    args = ap.parse_args()
    print("tiny olmoe (4 layers x 8 experts, hidden 64, expert intermediate 128), K = 3, measured:")
    for name, (n, state) in measured("olmoe", 3, args.rank).items():
        print(f"  {name:18s} {n:>12,d} params   AdamW state {state:>12,d} B")
    for model, shape in REAL.items():
        routed = shape["layers"] * shape["experts"]
        for k in sorted({RiseConfig().budget_for(routed), 128}):
            print(f"{model}: {shape['layers']} x {shape['experts']} = {routed:,} experts, K = {k}, "
                  f"LoRA rank {args.rank}:")
            for name, n in arithmetic(shape, k, args.rank).items():
                print(f"  {name:18s} {n:>15,d} params   AdamW m+v {8 * n / 2**30:8.2f} GiB   "
                      f"+ fp32 master (bf16) {12 * n / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
