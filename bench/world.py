"""Benchmark: building the synthetic world cold and warm, and its per-cell tables.

    .venv/bin/python bench/world.py [--families olmoe qwen3_moe mixtral] [--cache DIR]

Cold: a fresh cache folder (data, tokenizer, one pretrained model per family, evaluation).
Warm: the same call again (every artefact is a cache hit). Prints both wall times, then per family
the accuracy table (task x language) and the cc/ci/ic/ii proportions per (task, language) cell,
measured on all held-out task examples (never part of pretraining).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ramoe_ray import synthetic as S


def categories(df: pd.DataFrame) -> pd.DataFrame:
    wide = df.pivot_table(index=["task", "id"], columns="language", values="correct").astype(bool)
    rows = []
    for lang in [c for c in wide.columns if c != "en"]:
        for task, w in wide.groupby(level="task"):
            en, tg = w["en"], w[lang]
            rows.append(dict(task=task, language=lang, n=len(w), cc=(en & tg).mean(), ci=(en & ~tg).mean(),
                             ic=(~en & tg).mean(), ii=(~en & ~tg).mean()))
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--families", nargs="+", default=["olmoe", "qwen3_moe", "mixtral"])
    p.add_argument("--cache", default=None, help="cache folder (default: a fresh temporary one)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2: this project's CPU machines)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="ramoe-world-"))
    spec = S.WorldSpec()

    t0 = time.time()
    paths = {f: S.build_model(spec, f, cache) for f in args.families}
    cold = time.time() - t0
    t0 = time.time()
    assert {f: S.build_model(spec, f, cache) for f in args.families} == paths
    warm = time.time() - t0
    print(f"\nworld {spec.key()} in {cache}: cold {cold:.1f} s, warm {warm:.2f} s ({len(args.families)} families)")

    pd.set_option("display.width", 160)
    for fam, path in paths.items():
        df = pd.read_parquet(path / "eval.parquet")
        print(f"\n== {fam}: accuracy (n = {spec.n_task_examples} per cell)")
        print(df.groupby(["task", "language"]).correct.mean().unstack().round(2).to_string())
        cats = categories(df)
        print(f"\n== {fam}: cc/ci/ic/ii")
        print(cats.round(2).to_string(index=False))
        good = ((cats.ci >= 0.1) & (cats.cc >= 0.1)).sum()
        en = df[df.language == "en"].groupby("task").correct.mean()
        print(f"English accuracy min {en.min():.2f} ({en.idxmin()}); ci span {cats.ci.max() - cats.ci.min():.2f}; "
              f"cells with >=10% ci and >=10% cc: {good}/{len(cats)}")
        print(f"train seconds {json.loads((path / 'report.json').read_text())['train_seconds']:.0f}")


if __name__ == "__main__":
    main()
