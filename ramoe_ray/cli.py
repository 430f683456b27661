"""The ``ramoe`` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from ramoe_ray import dryrun, evaluate, experts, report, sources, sweep, taxonomy, train
from ramoe_ray.config import (
    METHODS,
    ConfigError,
    RunConfig,
    band_label,
    load_config,
    parse_band,
    redact,
    resolve_band,
    save_resolved,
)

DEMO_CONFIG = "sweeps/demo.yaml"
DEFAULT_CONFIGS = {"demo": DEMO_CONFIG}  # commands that have a config of their own


def _checked(args) -> tuple[RunConfig, dict]:
    """The command's config and its models' shapes: every check that needs no build (sources.check)."""
    cfg = load_config(args.config, args.overrides)
    return cfg, sources.check(cfg)


def _load(args, *, general: bool = False) -> RunConfig:
    """The command's config, checked (``general``: also the English general text of the experts stage),
    then resolved (sources.build: concrete paths, the synthetic world and presets built on first use)."""
    cfg, _ = _checked(args)
    if general:
        sources.check_general_text(cfg)
    return sources.build(cfg)


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
        f"  knobs: lambda {k.lambdas}  bands {[band_label(b) for b in k.bands]}  top_k {k.top_k}"
        f"  methods {cfg.methods}"
    )


def cmd_validate(args) -> int:
    cfg = load_config(args.config, args.overrides)
    _print_plan(cfg, sources.check(cfg))
    print("config is valid")
    return 0


def resume_command(args) -> str:
    """The exact command that continues this sweep: its config, --resume and every override as given
    (a dropped override can name another sweep); under cluster/submit.sh, the submit command it exports."""
    submitted = os.environ.get("RAMOE_RESUME_COMMAND")
    if submitted:
        return submitted
    if args.command == "demo":
        head = ["ramoe", "demo"] + ([args.config] if args.config != DEMO_CONFIG else [])
    else:
        head = ["ramoe", "sweep", args.config]
    return shlex.join([*head, "--resume", *args.overrides])


def cmd_sweep(args) -> int:
    """Stages 1-2 per cell, then Ray Tune over cells x methods x knobs, every trial an MLflow child run,
    selection on validation, test for the selected; then the report (ramoe_ray/sweep.py, report.py)."""
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        if args.resume:
            raise ConfigError("--dry-run and --resume exclude each other (a dry run runs nothing)")
        dryrun.dry_run(cfg, calibrate=args.calibrate)
        return 0
    if getattr(args, "calibrate", False):
        raise ConfigError("--calibrate goes with --dry-run (it measures the cost model's rates)")
    hint = resume_command(args)
    try:
        res = sweep.run_sweep(cfg, resume=args.resume, resume_hint=hint)
    except KeyboardInterrupt:  # stopped outside Ray Tune's own handling (the parent is marked KILLED)
        print(f"\ninterrupted: continue with `{hint}`", file=sys.stderr)
        return 130
    stopped = f", {res['stopped']} stopped early by ASHA" if res.get("stopped") else ""
    print(f"\nsweep {cfg.name!r}: {res['finished']} of {res['trials']} trials finished{stopped} ({res['failed']} failed this run), "
          f"{res['seconds']:.0f} s; stage 1 computed for {res['stage1_computed']} cells, recomputed in trials "
          f"{res['stage12_recomputed_in_trials']} times")
    if res.get("interrupted"):
        print(f"interrupted: continue with `{hint}`")
        return 130
    rep = report.build_report(cfg, sweep_run_id=res["parent_run_id"])
    print()
    print(rep["markdown"], end="")
    print(f"\nreport: {rep['paths']['markdown']} (also in MLflow, run {res['parent_run_id']}, under report/)")
    uri = res["tracking_uri"]
    print(f"compare the runs in the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000\n"
          f"  then open http://127.0.0.1:5000, experiment {cfg.tracking.experiment!r}, run 'sweep {cfg.name}': "
          f"select its child runs and press Compare")
    return 0 if not res["failed"] else 1


def cmd_demo(args) -> int:
    """The demo on the embedded default (sweeps/demo.yaml: the synthetic world): the whole sweep on a
    local Ray (building the world's models on first use), then the report."""
    args.resume = getattr(args, "resume", False)
    return cmd_sweep(args)


def _plans(cfg: RunConfig, split: str, general: bool) -> list:
    """Every (model, task) of the config planned (all its languages): every input is checked here,
    before any model runs or any actor starts."""
    return [taxonomy.plan(cfg, m, t, cfg.languages, split, general=general) for m in cfg.models for t in cfg.tasks]


def _table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _bands(cfg: RunConfig, shape) -> str:
    return " ".join("auto" if b == "auto" else f"{b.label()}:{resolve_band(b, shape)}" for b in cfg.knobs.bands)


def cmd_taxonomy(args) -> int:
    """Stage 1 for every cell (model x task x language) of the config; prints n and cc/ci/ic/ii."""
    cfg = _load(args)
    plans = _plans(cfg, args.split, general=False)
    rows = []
    for p in plans:
        cells, _ = taxonomy.execute(p, batch_size=args.batch_size)
        for lang, (path, hit) in cells.items():
            s = taxonomy.summary(path)
            rows.append([f"{p.model_cfg.name}/{p.task_cfg.name}/{lang}", s["n"],
                         *(f"{100 * s[c]:.1f}" for c in taxonomy.CATEGORIES), _bands(cfg, p.shape),
                         "hit" if hit else "computed", path.parent.name])
    print(f"taxonomy ({args.split} split), categories in % of pairs (English first letter, target second):")
    _table(["cell", "n", "cc%", "ci%", "ic%", "ii%", "bands", "cache", "artefact"], rows)
    return 0


def cmd_experts(args) -> int:
    """Stage 2 for every cell x band x top_k of the config (running stage 1 where it is missing)."""
    cfg = _load(args, general=True)
    rows = []
    for p in _plans(cfg, args.split, general=True):
        cells, (general, _) = taxonomy.execute(p, batch_size=args.batch_size)
        paths = {lang: path for lang, (path, _) in cells.items()}
        for lang in p.languages:
            for band in cfg.knobs.bands:
                for k in cfg.knobs.top_k:
                    path, hit = experts.build_experts(p, paths, general, lang, band, k)
                    rows.append(_experts_row(p, lang, band, k, path, hit))
    print(f"experts ({args.split} split): band layers, task experts (layer:experts, best first), RISE experts chosen:")
    _table(["cell", "band", "layers", "top_k", "task experts", "rise", "cache", "artefact"], rows)
    return 0


def _experts_row(p, lang: str, band, k: int, path: Path, hit: bool) -> list:
    art = json.loads(path.read_text())
    te = ";".join(f"{l}:{','.join(map(str, v['experts']))}" for l, v in art["task_experts"].items())
    n_rise = sum(len(v) for v in art["rise"]["experts"][lang].values())
    return [f"{p.model_cfg.name}/{p.task_cfg.name}/{lang}", band_label(band), ",".join(map(str, art["band"]["layers"])),
            k, te, n_rise, "hit" if hit else "computed", path.parent.name]


def _pick(items, name: str | None, what: str):
    if name is None:
        if len(items) == 1:
            return items[0]
        raise ConfigError(f"--{what} is required: the config has {len(items)} ({', '.join(i.name for i in items)})")
    for i in items:
        if i.name == name:
            return i
    raise ConfigError(f"--{what} {name!r} is not in the config; choose one of {', '.join(i.name for i in items)}")


def _parse_band(text: str | None):
    """--band: START-END or auto (None: the config's first band); its layers are checked by train before any compute."""
    if text is None:
        return None
    try:
        return parse_band(text, "--band")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _cell_args(cfg, args):
    model = _pick(cfg.models, args.model, "model")
    task = _pick(cfg.tasks, args.task, "task")
    return model, task


def _check_cell_knobs(shape, name: str, band, top_k: int | None) -> None:
    """--band and --top-k against the cell's model (the config's own knobs: sources.check)."""
    if top_k is not None and top_k > shape.num_experts:
        raise ConfigError(f"--top-k {top_k}: larger than the {shape.num_experts} experts of model {name!r}; "
                          f"allowed: 1..{shape.num_experts}")
    if band is not None:
        resolve_band(band, shape, f"--band (on model {name!r})")


def _train_language(cfg: RunConfig, language: str | None) -> str:
    if language is None and len(cfg.languages) > 1:
        raise ConfigError(f"--language is required: the config has {len(cfg.languages)} ({', '.join(cfg.languages)})")
    if language is not None and language not in cfg.languages:
        raise ConfigError(f"--language {language!r} is not in the config; choose one of {', '.join(cfg.languages)}")
    return language or cfg.languages[0]


def _check_train_args(args, cfg: RunConfig, shapes: dict):
    """Every argument of `ramoe train` against the checked, unbuilt config: (model, task, language, band)."""
    band = _parse_band(args.band)
    model, task = _cell_args(cfg, args)
    language = _train_language(cfg, args.language)
    _check_cell_knobs(shapes[model.name], model.name, band, args.top_k)
    if args.resume_from is not None and not Path(args.resume_from).is_dir():
        raise ConfigError(f"--resume-from {args.resume_from!r}: not a folder; give a checkpoint folder of this training")
    sources.check_folder("--run-dir", args.run_dir)
    sources.check_general_text(cfg)  # stage 2 runs first
    return model, task, language, band


def cmd_train(args) -> int:
    """Stage 3 for one cell and one method (runs stages 1-2 where missing); prints the final metrics. Every
    check runs before anything is built (sources.build) or written (the resolved config included)."""
    cfg, shapes = _checked(args)
    model, task, language, band = _check_train_args(args, cfg, shapes)
    cfg = sources.build(cfg)
    model, task = _cell_args(cfg, args)  # the resolved ones
    save_resolved(cfg, cfg.run_dir)
    res = train.train_cell(cfg, model, task, language, method=args.method, lam=args.lam, band=band,
                           top_k=args.top_k, run_dir=args.run_dir, num_workers=args.workers, resume_from=args.resume_from)
    keep = ("method", "lam", "lam_used", "band_layers", "task_experts", "experts_mask", "n_train", "n_ci", "steps",
            "adapter", "steering", "final", "restarts", "notes", "run_dir")
    print(json.dumps({k: res.get(k) for k in keep}, indent=2, default=str))
    return 0


def _check_evaluate_args(args, cfg: RunConfig, shapes: dict):
    """Every argument of `ramoe evaluate` against the checked, unbuilt config: (languages, band)."""
    band = _parse_band(args.band)
    model, _ = _cell_args(cfg, args)
    languages = args.language or list(cfg.languages)
    bad = [l for l in languages if l not in cfg.languages]
    if bad:
        raise ConfigError(f"--language {bad}: not in the config's languages {cfg.languages}")
    if args.adapter is not None and args.method == "steering":
        raise ConfigError("--adapter and --method steering exclude each other")
    if args.adapter is not None and not (args.adapter and Path(args.adapter).is_dir()):
        raise ConfigError(f"--adapter {args.adapter!r}: not a folder; give the adapter/ folder `ramoe train` wrote")
    _check_cell_knobs(shapes[model.name], model.name, band, args.top_k)
    sources.check_folder("--out-dir", args.out_dir)
    if args.method == "steering":
        sources.check_general_text(cfg)  # steering runs stages 1-2
    return languages, band


def cmd_evaluate(args) -> int:
    """Stage 4 for one cell and one method: base model, --adapter, or --method steering. Every check runs
    before anything is built (sources.build)."""
    cfg, shapes = _checked(args)
    languages, band = _check_evaluate_args(args, cfg, shapes)
    cfg = sources.build(cfg)
    model, task = _cell_args(cfg, args)
    steering = None
    if args.method == "steering":
        steering = train.train_cell(cfg, model, task, languages[0], method="steering", band=band,
                                    top_k=args.top_k)["steering"]
        if args.strength is not None:
            steering["strength"] = args.strength
    res = evaluate.evaluate_cell(cfg, model, task, languages, adapter=args.adapter, steering=steering, split=args.split,
                                 out_dir=args.out_dir)
    label = "steering" if steering else ("adapter " + str(args.adapter) if args.adapter else "base model")
    print(f"{model.name}/{task.name} ({args.split} split), {label}:")
    rows = [[l, res["n"][l], f"{100 * res['accuracy'][l]:.1f}",
             " ".join(f"{d:.3f}" for d in res["divergence"][l]) if l in res["divergence"] else "-"]
            for l in res["languages"]]
    _table(["language", "n", "acc%", "divergence to en by MoE layer"], rows)
    print(f"artefact: {res['path']}")
    return 0


def cmd_report(args) -> int:
    """The sweep's comparison tables and figures, read from MLflow (no model is loaded): writes report.md
    and the PNGs, logs them to the sweep's parent run, prints the markdown."""
    cfg = load_config(args.config, args.overrides)  # model shapes are not needed: everything comes from MLflow
    res = report.build_report(cfg, sweep_run_id=args.sweep, out_dir=args.out)
    state, said = res["sweep"]["driver"]
    if state in ("stopped", "unknown"):
        print(f"note: {said}", file=sys.stderr)
    print(res["markdown"], end="")
    print(f"\nreport: {res['paths']['markdown']} (logged to run {res['sweep']['run_id']} under report/)")
    return 0


def _at_least(least: int):
    """An argparse type: a whole number >= ``least``."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: allowed {least} or more")
        return value
    return count


def _finite(least: float | None = None):
    """An argparse type: a finite number (>= ``least`` when given)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (least is not None and value < least):
            raise argparse.ArgumentTypeError(f"{text}: allowed a finite number" + (f" >= {least:g}" if least is not None else ""))
        return value
    return number


def with_dry_run(sp) -> None:
    sp.add_argument("--dry-run", action="store_true",
                    help="the checks, then what the sweep would run (cells, trials, steps, cached stages, memory per "
                         "GPU) and its estimated wall time and GPU-hours; trains, builds and writes nothing")
    sp.add_argument("--calibrate", action="store_true",
                    help="with --dry-run: measure the estimate's rates with a short sweep here (first language and "
                         "seed, a few knob settings, at most 40 steps per trial; this builds what it needs)")


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
    sp = sub.add_parser("demo", help="run the demo sweep on the embedded default (sweeps/demo.yaml)")
    with_config(sp, default=DEMO_CONFIG)
    sp.add_argument("--resume", action="store_true", help="continue the newest demo sweep")
    with_dry_run(sp)
    sp = sub.add_parser("sweep", help="the sweep: stages 1-2, Ray Tune over cells x methods x knobs, MLflow, report")
    with_config(sp)
    sp.add_argument("--resume", action="store_true",
                    help="continue the newest sweep of this name: run only its unfinished trials")
    with_dry_run(sp)
    for name, text in (("taxonomy", "stage 1: score English and target versions, cc/ci/ic/ii, routing"),
                       ("experts", "stage 2: layer band, task experts, RISE selection (runs stage 1 if needed)")):
        sp = sub.add_parser(name, help=text)
        with_config(sp)
        sp.add_argument("--split", default="train", choices=["train", "validation", "test"])
        sp.add_argument("--batch-size", type=_at_least(1), default=None, help="examples per forward (default: the config's training.eval_batch_size)")
    sp = sub.add_parser("train", help="stage 3: train one cell with one method (sft, rise, ramoe; steering trains nothing)")
    with_config(sp)
    sp.add_argument("--model", help="model name (default: the config's only model)")
    sp.add_argument("--task", help="task name (default: the config's only task)")
    sp.add_argument("--language", help="target language (default: the config's only language)")
    sp.add_argument("--method", required=True, choices=list(METHODS))
    sp.add_argument("--lam", type=_finite(0), default=None, help="alignment weight λ (ramoe; default knobs.lambdas[0])")
    sp.add_argument("--band", default=None, help="START-END fractions of depth or auto (default knobs.bands[0])")
    sp.add_argument("--top-k", type=_at_least(1), default=None, help="task experts per band layer (default knobs.top_k[0])")
    sp.add_argument("--workers", type=_at_least(0), default=None, help="Ray Train workers (0: local mode, in this process)")
    sp.add_argument("--run-dir", default=None, help="output folder (default OUTPUT_DIR/NAME/train/<cell-method>)")
    sp.add_argument("--resume-from", default=None, help="a checkpoint folder of the same model and configuration")
    sp = sub.add_parser("evaluate", help="stage 4: accuracy per language and divergence per layer for one method")
    with_config(sp)
    sp.add_argument("--model")
    sp.add_argument("--task")
    sp.add_argument("--language", action="append", help="target language (repeatable; default all of the config)")
    sp.add_argument("--method", default="base", choices=["base", "steering"], help="use --adapter for trained methods")
    sp.add_argument("--adapter", default=None, help="adapter folder written by `ramoe train`")
    sp.add_argument("--band", default=None)
    sp.add_argument("--top-k", type=_at_least(1), default=None)
    sp.add_argument("--strength", type=_finite(), default=None, help="steering strength (default steering.strengths[0])")
    sp.add_argument("--split", default="test", choices=["train", "validation", "test"])
    sp.add_argument("--out-dir", default=None)
    sp = sub.add_parser("report", help="comparison tables and figures of a sweep, read from MLflow")
    with_config(sp)
    sp.add_argument("--sweep", default=None, metavar="RUN_ID", help="the sweep's parent run (default: the newest)")
    sp.add_argument("--out", default=None, metavar="DIR", help="output folder (default OUTPUT_DIR/NAME/report)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options ("CONFIG --split test key=value")
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides += extra
    # overrides may be given without a config only to a command that has a default one
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        if args.command not in DEFAULT_CONFIGS:
            parser.error(f"{args.command}: {args.config!r} is an override, not a config file; `ramoe {args.command}` "
                         f"needs a YAML config first (ramoe {args.command} CONFIG [key.sub=value ...])")
        args.overrides.insert(0, args.config)
        args.config = DEFAULT_CONFIGS[args.command]
    handler = {"validate": cmd_validate, "demo": cmd_demo, "taxonomy": cmd_taxonomy, "experts": cmd_experts,
               "train": cmd_train, "evaluate": cmd_evaluate, "report": cmd_report,
               "sweep": cmd_sweep}[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
