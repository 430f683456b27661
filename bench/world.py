"""Benchmark: the synthetic world's first run with the shipped models and without, and its per-cell tables.

    .venv/bin/python bench/world.py [--families olmoe qwen3_moe] [--shipped-only]
    .venv/bin/python bench/world.py --ship     # remake the shipped models (ramoe_ray/world/), then the tables

First run: ``build_model`` of every family in a fresh cache folder (data, tokenizer, model, evaluation),
once copying the package's shipped models and once pretraining them here (``shipped=False``; minutes,
skipped by --shipped-only); prints both wall times in one run and their ratio, then whether the
pretrained weights equal the shipped ones bit for bit. Warm: the same call again (every artefact a cache
hit). Then per family the accuracy table (task x language) and the cc/ci/ic/ii proportions per
(task, language) cell, measured on all held-out task examples (never part of pretraining).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (imported before any timing)

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


def first_run(spec: S.WorldSpec, families: list[str], shipped: bool) -> tuple[float, dict[str, Path]]:
    """Wall seconds of building every family's model into a fresh cache, and the model folders."""
    cache = Path(tempfile.mkdtemp(prefix="ramoe-world-"))
    t0 = time.time()
    paths = {f: S.build_model(spec, f, cache, shipped=shipped) for f in families}
    seconds = time.time() - t0
    t0 = time.time()
    assert {f: S.build_model(spec, f, cache, shipped=shipped) for f in families} == paths
    print(f"world {spec.key()} in {cache} ({'shipped' if shipped else 'pretrained'}): first run {seconds:.1f} s, "
          f"warm {time.time() - t0:.2f} s ({len(families)} families)")
    return seconds, paths


def weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two model folders' weights (0.0: bit-identical)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def tables(spec: S.WorldSpec, paths: dict[str, Path]) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--families", nargs="+", default=list(S.SHIPPED_FAMILIES))
    p.add_argument("--ship", action="store_true", help="pretrain the families and make them the shipped models")
    p.add_argument("--shipped-only", action="store_true", help="time the first run with the shipped models only")
    args = p.parse_args()
    spec = S.WORLDS["synthetic"]
    print(f"torch threads {torch.get_num_threads()} (a world build uses one)")

    if args.ship:
        t0 = time.time()
        target = S.ship(spec, tuple(args.families))
        print(f"shipped {', '.join(args.families)} as {target} in {time.time() - t0:.0f} s")
        tables(spec, {f: target / f for f in args.families})
        return
    missing = [f for f in args.families if S.shipped_model(spec, f) is None]
    if missing:
        raise SystemExit(f"no shipped {', '.join(missing)} model for world {spec.key()}: run with --ship first")
    shipped_s, paths = first_run(spec, args.families, shipped=True)
    if not args.shipped_only:
        pretrained_s, built = first_run(spec, args.families, shipped=False)
        print(f"first run: pretraining {pretrained_s:.1f} s / shipped {shipped_s:.1f} s = {pretrained_s / shipped_s:.0f}x")
        for f in args.families:
            diff = weight_difference(paths[f], built[f])
            print(f"{f}: pretrained here vs shipped: " + ("bit-identical" if diff == 0 else f"max |weight difference| {diff:.3g}"))
    tables(spec, paths)


if __name__ == "__main__":
    main()
