"""The ``ramoe`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ramoe_ray.config import ConfigError, RunConfig, check_against_models, load_config, save_resolved

DEMO_CONFIG = "sweeps/demo.yaml"


def _load(args) -> tuple[RunConfig, dict]:
    cfg = load_config(args.config, args.overrides)
    shapes = check_against_models(cfg)
    return cfg, shapes


def _print_plan(cfg: RunConfig, shapes: dict) -> None:
    print(f"config {cfg.name!r}: {len(cfg.models)} models x {len(cfg.tasks)} tasks x {len(cfg.languages)} languages")
    for m in cfg.models:
        s = shapes[m.name]
        print(
            f"  {m.name:<18} {s.family:<12} layers {s.num_layers:>3}  experts {s.num_experts:>4}  "
            f"top-{s.experts_per_token}  MoE layers {s.moe_layers[0]}..{s.moe_layers[-1]}"
        )
    k = cfg.knobs
    print(
        f"  knobs: lambda {k.lambdas}  bands {[b if b == 'auto' else b.label() for b in k.bands]}  top_k {k.top_k}"
        f"  methods {cfg.methods}"
    )


def cmd_validate(args) -> int:
    cfg, shapes = _load(args)
    _print_plan(cfg, shapes)
    print("config is valid")
    return 0


def cmd_demo(args) -> int:
    """The demo on the embedded default. Walking skeleton: validates the demo config, writes the
    resolved config, builds/loads each model and records its routing on real MGSM questions."""
    from ramoe_ray import demo

    cfg, shapes = _load(args)
    _print_plan(cfg, shapes)
    out = save_resolved(cfg, cfg.run_dir)
    print(f"resolved config: {out}")
    demo.routing_summary(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ramoe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, default=None):
        if default:
            sp.add_argument("config", nargs="?", default=default, help=f"YAML config (default {default})")
        else:
            sp.add_argument("config", help="YAML config")
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides, e.g. training.lr=1e-4")

    with_config(sub.add_parser("validate", help="check a config (and the models it names) without running anything"))
    with_config(sub.add_parser("demo", help="run the demo on the embedded default"), default=DEMO_CONFIG)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # overrides may be given without a config for commands that have a default one
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides.insert(0, args.config)
        args.config = DEMO_CONFIG
    handler = {"validate": cmd_validate, "demo": cmd_demo}[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
