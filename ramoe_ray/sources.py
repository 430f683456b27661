"""Every reference of a config turned into a concrete local path (or a hub id), before any stage runs.

A config names its models and tasks by reference:

| reference | model path | task source |
|---|---|---|
| hub id (``owner/name``) | kept: ``from_pretrained`` downloads it | kept: ``datasets`` streams it |
| local folder (relative to the current folder, or absolute) | made absolute | made absolute |
| ``preset:FAMILY`` | a tiny random model with a BPE tokenizer trained on the config's task texts, built into the cache | — |
| ``synthetic:NAME`` (``synthetic-small:``) | the world's pretrained model, copied (shipped) or built into the cache | the world's task folder (*) |

(*) with the world's general text and its multiple-choice mode ``choices: texts`` unless the config sets them.

A reference that is a local folder is one. A missing one that looks like a path (``tasks.local_only``:
it starts with ``./``, ``../``, ``/`` or ``~``, is not of the form owner/name, or its parent folder exists,
as ``data/mgsm`` with a folder ``data``) is refused as "no local folder", with no hub lookup; any other
is a hub id, and when the hub does not have it either the error names both readings.

This module is the only one that knows these schemes: config.py, models.py, tasks.py and the stages see
only resolved configs. Two entries:

- ``check(cfg) -> {model name: MoEShape}``: every check that needs no model built or data downloaded —
  known family and language, the references' syntax, the tracking URI's scheme, every local task folder's
  data (parallel, in English and every language), each model's shape from its config alone (a preset's
  from its family's tiny config, a synthetic model's from the world's spec), and what depends on the shape
  (top-k, bands, the RISE budget). ``ramoe validate`` runs exactly this; ``resolve`` runs it first.
- ``resolve(cfg) -> RunConfig``: the same config with every reference concrete and every local path
  absolute (Ray's workers do not run in the driver's folder). Builds the synthetic world and the presets
  on first use (cached, content-addressed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ramoe_ray import synthetic
from ramoe_ray.cache import atomic_dir, content_key
from ramoe_ray.config import LANGUAGES, ConfigError, ModelConfig, RunConfig, TaskConfig, check_tracking_scheme, resolve_band
from ramoe_ray.models import FAMILIES, MoEShape, build_tiny, checked_shape, tiny_config
from ramoe_ray.tasks import TaskDataError, build_prompt, hub_reason, load_parallel, local_only, locate
from ramoe_ray.tokenizer import train_tokenizer

PRESET = "preset:"  # model path scheme of the tiny presets: "preset:olmoe"
PRESET_VOCAB = 1024  # vocabulary of a preset's BPE tokenizer (and of the preset model)


def preset_family(path: str) -> str | None:
    return path[len(PRESET):] if path.startswith(PRESET) else None


def known_languages() -> set[str]:
    """ISO codes of the real benchmarks (config.LANGUAGES) and the synthetic world's languages."""
    return set(LANGUAGES) | set(synthetic.TARGET_LANGUAGES)


# ----------------------------------------------------------------------------------------- checks


def _check_model_reference(i: int, m: ModelConfig) -> None:
    if m.family not in FAMILIES:
        raise ConfigError(f"models.{i}.family = {m.family!r}: unknown model family; supported families: "
                          f"{', '.join(FAMILIES)}")
    try:
        world = synthetic.parse_scheme(m.path)
    except ValueError as e:
        raise ConfigError(f"models.{i}.path = {m.path!r}: {e}") from None
    fam = preset_family(m.path) if world is None else world[1]
    if fam is not None and fam not in FAMILIES:
        raise ConfigError(f"models.{i}.path = {m.path!r}: names no preset; presets: "
                          f"{', '.join(PRESET + f for f in FAMILIES)} (world models: synthetic:FAMILY)")
    if fam is not None and fam != m.family:
        raise ConfigError(f"models.{i}.path = {m.path!r}: a {fam} model, but models.{i}.family is {m.family!r}")


def _check_task_reference(i: int, t: TaskConfig) -> None:
    try:
        world = synthetic.parse_scheme(t.source)
    except ValueError as e:
        raise ConfigError(f"tasks.{i}.source = {t.source!r}: {e}") from None
    if world is None:
        return
    task = world[1]
    if task not in synthetic.TASKS:
        raise ConfigError(f"tasks.{i}.source = {t.source!r}: no synthetic task {task!r}; allowed: "
                          f"{', '.join(synthetic.TASKS)}")
    if synthetic.TASKS[task] != t.format:
        raise ConfigError(f"tasks.{i}.source = {t.source!r}: a {synthetic.TASKS[task]} task, "
                          f"but tasks.{i}.format is {t.format!r}")


def check_references(cfg: RunConfig) -> None:
    """Families, reference syntax and languages (no file read)."""
    for i, m in enumerate(cfg.models):
        _check_model_reference(i, m)
    for i, t in enumerate(cfg.tasks):
        _check_task_reference(i, t)
    known = known_languages()
    for i, code in enumerate(cfg.languages):
        if code not in known:
            raise ConfigError(f"languages.{i} = {code!r}: unknown language code; allowed: {', '.join(sorted(known))}")


def model_hf_config(model_cfg: ModelConfig):
    """The model's HF config, without weights (a synthetic model's from the world's spec, with a
    placeholder vocabulary: everything a shape check reads is exact)."""
    from transformers import AutoConfig

    if (family := preset_family(model_cfg.path)) is not None:
        return tiny_config(family, vocab_size=PRESET_VOCAB)
    if (world := synthetic.parse_scheme(model_cfg.path)) is not None:
        return synthetic.model_config(world[0], world[1], vocab_size=len(synthetic.CONCEPTS))
    return AutoConfig.from_pretrained(
        model_cfg.path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )


def _local_path(ref: str, base: Path) -> Path:
    p = Path(ref).expanduser()
    return p if p.is_absolute() else base / p


def model_folder(i: int, m: ModelConfig, base: Path) -> Path | None:
    """The local folder (absolute) a model path names; None for a hub id or a scheme. ConfigError, with no
    hub lookup, for a path-like reference (``tasks.local_only``) that is not a folder, and for a folder
    without config.json (its tokenizer is checked by ``resolve_model``)."""
    if preset_family(m.path) is not None or synthetic.parse_scheme(m.path) is not None:
        return None
    p = _local_path(m.path, base)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"models.{i}.path = {m.path!r}: the folder {str(p)!r} has no config.json (a model "
                              "folder holds what save_pretrained writes: config.json, the weights, the tokenizer)")
        return p.resolve()
    if p.exists() or local_only(m.path, base):
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise ConfigError(f"models.{i}.path = {m.path!r}: no local folder {str(p)!r} ({what})")
    return None


def model_shape(i: int, model_cfg: ModelConfig, base: Path | None = None) -> MoEShape:
    """The shape from the config alone, checked against the configured family (dense and unsupported
    models are refused here). A reference that is neither a local folder nor on the hub names both readings."""
    base = Path(base or Path.cwd())
    folder = model_folder(i, model_cfg, base)
    m = model_cfg if folder is None else model_cfg.model_copy(update={"path": str(folder)})
    hub = folder is None and preset_family(m.path) is None and synthetic.parse_scheme(m.path) is None
    try:
        return checked_shape(m, model_hf_config(m))
    except OSError as e:
        if hub:
            raise ConfigError(f"models.{i}.path = {m.path!r}: no local folder {str(_local_path(m.path, base))!r}; "
                              f"as a hub id: {hub_reason(e)}") from None
        raise ConfigError(f"models.{i} ({m.name}): {e}") from None
    except ValueError as e:
        raise ConfigError(f"models.{i} ({m.name}): {e}") from None


def hf_configs(cfg: RunConfig, models: list[ModelConfig] | None = None, base: str | os.PathLike | None = None) -> dict:
    """The HF configs (no weights) of ``models`` (default: all) of a config that ``check`` passed, read as
    ``check`` reads them: model name -> config."""
    base = Path(base or Path.cwd())
    out = {}
    for m in cfg.models if models is None else models:
        folder = model_folder(cfg.models.index(m), m, base)
        out[m.name] = model_hf_config(m if folder is None else m.model_copy(update={"path": str(folder)}))
    return out


def check_knobs(cfg: RunConfig, name: str, shape: MoEShape) -> None:
    """top-k, bands and the RISE budget against one model's shape."""
    for j, k in enumerate(cfg.knobs.top_k):
        if k > shape.num_experts:
            raise ConfigError(f"knobs.top_k.{j} = {k}: larger than the {shape.num_experts} experts of model "
                              f"{name!r}; allowed: 1..{shape.num_experts}")
    for j, band in enumerate(cfg.knobs.bands):
        resolve_band(band, shape, f"knobs.bands.{j} (on model {name!r})")
    cap = len(shape.moe_layers) * shape.num_experts
    if cfg.rise.budget_for(cap) > cap:  # the default (2 % of cap) always fits
        raise ConfigError(f"rise.budget = {cfg.rise.budget}: larger than the {cap} (layer, expert) pairs of "
                          f"model {name!r}; allowed: 1..{cap}")


def check_folder(field: str, value: str | os.PathLike | None) -> None:
    """``value`` (of the config field or option ``field``) is a folder, or can be made: no file on its path."""
    if value is None:
        return
    path = Path(value).expanduser()
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies under the file {str(blocker)!r}"
        raise ConfigError(f"{field} = {str(value)!r}: {what}; give a folder (it is created if missing)")


def check_folders(cfg: RunConfig) -> None:
    """cache_dir, output_dir and sweep.storage_path are folders, or can be made: no file on their path."""
    for field, value in (("cache_dir", cfg.cache_dir), ("output_dir", cfg.output_dir),
                         ("sweep.storage_path", cfg.sweep.storage_path)):
        check_folder(field, value)


def check_tasks(cfg: RunConfig, base: Path) -> None:
    """Every local task source is a folder holding parallel data for English and each language of the
    config (``tasks.load_parallel``). Hub sources are read when used (no download here), synthetic ones
    once the world is built."""
    for i, t in enumerate(cfg.tasks):
        if synthetic.parse_scheme(t.source) is not None:
            continue
        try:
            if locate(t.source, base)[0] == "local":
                load_parallel(t, cfg.languages, root=base)
        except (TaskDataError, OSError) as e:
            raise ConfigError(f"tasks.{i}.source = {t.source!r}: {e}") from None


def check_general_text(cfg: RunConfig, base: str | os.PathLike | None = None) -> None:
    """Every task has English general text, as the experts stage (``ramoe experts``, ``train``, the sweep)
    needs: a synthetic-world task the world's, any other its ``general_source``, a file here."""
    base = Path(base or Path.cwd())
    for i, t in enumerate(cfg.tasks):
        if t.general_source is None and synthetic.parse_scheme(t.source) is None:
            raise ConfigError(f"tasks.{i}.general_source: not set; the experts stage contrasts task routing with "
                              "English general text: give a local .jsonl (one {\"text\": ...} per line) or .txt "
                              "(one document per line)")
        if t.general_source is not None and not _local_path(t.general_source, base).is_file():
            raise ConfigError(f"tasks.{i}.general_source = {t.general_source!r}: no file "
                              f"{str(_local_path(t.general_source, base))!r}")


def check(cfg: RunConfig, base: str | os.PathLike | None = None) -> dict[str, MoEShape]:
    """Every check that needs no build or download (module docstring); returns the models' shapes.
    ``base``: the folder relative paths are read from (default: the current one)."""
    base = Path(base or Path.cwd())
    check_folders(cfg)
    check_tracking_scheme(cfg.mlflow_uri)
    check_references(cfg)
    check_tasks(cfg, base)
    shapes = {}
    for i, m in enumerate(cfg.models):
        shapes[m.name] = model_shape(i, m, base)
        check_knobs(cfg, m.name, shapes[m.name])
    return shapes


# ----------------------------------------------------------------------------------------- resolve


def _absolute(path: str | None, base: Path, must_exist: bool) -> str | None:
    """A local path made absolute against ``base``; URIs, hub ids and missing paths (``must_exist``) kept."""
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    q = base / p
    return str(q.resolve()) if (q.exists() or not must_exist) else path


def resolve_task(i: int, t: TaskConfig, base: Path, cache_dir: str) -> TaskConfig:
    """A task with a concrete source folder (or hub id) and general text file."""
    world = synthetic.parse_scheme(t.source)
    if world is not None:
        spec, name = world
        update: dict[str, Any] = {"source": str(synthetic.task_folder(spec, name, cache_dir).resolve())}
        if t.general_source is None:
            update["general_source"] = str(synthetic.general_file(spec, "en", cache_dir).resolve())
        if "choices" not in t.model_fields_set:
            update["choices"] = synthetic.CHOICES
        return t.model_copy(update=update)
    try:
        kind, where = locate(t.source, base)
    except TaskDataError as e:
        raise ConfigError(f"tasks.{i} ({t.name}): {e}") from None
    source = str(Path(where).resolve()) if kind == "local" else str(where)
    return t.model_copy(update={"source": source, "general_source": _absolute(t.general_source, base, True)})


def preset_folder(family: str, texts: list[str], cache_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny preset of ``family`` with a BPE tokenizer trained on ``texts`` (tokenizer.py), the model's
    vocabulary sized to it. Cached under a hash of the texts, the preset's config and the seed; the
    folder loads with AutoTokenizer / AutoModelForCausalLM."""
    config = tiny_config(family, vocab_size=PRESET_VOCAB)
    key = content_key([config.to_dict(), seed, PRESET_VOCAB, texts], 16)

    def build(tmp: Path) -> None:
        train_tokenizer(texts, vocab_size=PRESET_VOCAB, out_dir=tmp)
        build_tiny(family, seed=seed, vocab_size=PRESET_VOCAB).save_pretrained(tmp)

    return atomic_dir(Path(cache_dir) / "presets" / f"{family}-bpe-{key}", build)


def preset_texts(cfg: RunConfig) -> list[str]:
    """What a preset's tokenizer learns: every example (prompt and answer) of every task of a resolved
    config, English and every target language, so every cell of the config uses the same preset."""
    texts = []
    for t in cfg.tasks:
        try:
            data = load_parallel(t, cfg.languages)
        except (TaskDataError, OSError) as e:
            raise ConfigError(f"task {t.name!r}: {e}") from None
        for lang in sorted(data):
            texts += [f"{build_prompt(ex, t.format)} {ex['answer']}" for ex in data[lang]]
    return texts


def resolve_model(i: int, m: ModelConfig, base: Path, cfg: RunConfig) -> ModelConfig:
    """A model with a concrete path: an absolute folder, or the hub id."""
    if (family := preset_family(m.path)) is not None:
        path = preset_folder(family, preset_texts(cfg), cfg.cache_dir)
    elif (world := synthetic.parse_scheme(m.path)) is not None:
        path = synthetic.build_model(world[0], world[1], cfg.cache_dir)
    else:
        path = _absolute(m.path, base, True)
    if Path(path).is_dir():
        folder = Path(path).resolve()
        if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
            raise ConfigError(f"models.{i} ({m.name}): folder {folder} has no tokenizer (tokenizer.json or "
                              "tokenizer_config.json)")
        path = str(folder)
    return m.model_copy(update={"path": str(path)})


def _planned_task(i: int, t: TaskConfig, base: Path, cache_dir: str) -> tuple[TaskConfig, str | None]:
    world = synthetic.parse_scheme(t.source)
    if world is None:
        return resolve_task(i, t, base, cache_dir), None
    data = synthetic.world_dir(world[0], cache_dir) / "data"
    update: dict[str, Any] = {"source": str((data / "tasks" / world[1]).resolve())}
    if t.general_source is None:
        update["general_source"] = str((data / "general" / "en.jsonl").resolve())
    if "choices" not in t.model_fields_set:
        update["choices"] = synthetic.CHOICES
    return t.model_copy(update=update), None if data.is_dir() else f"{t.source}: the world's data ({data})"


def _planned_model(m: ModelConfig, base: Path, cfg: RunConfig) -> tuple[ModelConfig, str | None]:
    if preset_family(m.path) is not None:
        return m, f"{m.path}: a preset (its tokenizer learns the tasks' texts when it is built)"
    if (world := synthetic.parse_scheme(m.path)) is None:
        return m.model_copy(update={"path": str(_absolute(m.path, base, True))}), None
    folder = synthetic.world_dir(world[0], cfg.cache_dir) / "models" / world[1]
    how = "copied from the package" if synthetic.shipped_model(*world) is not None else "pretrained here"
    missing = None if folder.is_dir() else f"{m.path}: the world's pretrained model ({folder}; {how} on first use)"
    return m.model_copy(update={"path": str(folder.resolve())}), missing


def world_sizes(source: str) -> tuple[int, int] | None:
    """(task examples per language, general documents per language) of a synthetic-world task source, from
    the world's spec (nothing built); None for any other source."""
    world = synthetic.parse_scheme(source)
    return None if world is None else (world[0].n_task_examples, world[0].n_general)


def planned(cfg: RunConfig, base: str | os.PathLike | None = None) -> tuple[RunConfig, dict[str, str]]:
    """``build`` building nothing: every reference where ``build`` puts it, built or not; and what is not
    built yet ("models.NAME" / "tasks.NAME" -> what: world data, a world model, a preset, whose folder is named
    by its tokenizer's texts, so it stays a reference). For a config that ``check`` passed."""
    base = Path(base or Path.cwd())
    cfg = cfg.model_copy(update={"cache_dir": _absolute(cfg.cache_dir, base, False),
                                 "output_dir": _absolute(cfg.output_dir, base, False)})
    tasks = [_planned_task(i, t, base, cfg.cache_dir) for i, t in enumerate(cfg.tasks)]
    models = [_planned_model(m, base, cfg) for m in cfg.models]
    missing = {f"tasks.{t.name}": x for t, x in tasks if x} | {f"models.{m.name}": x for m, x in models if x}
    return cfg.model_copy(update={"tasks": [t for t, _ in tasks], "models": [m for m, _ in models]}), missing


def resolve(cfg: RunConfig, base: str | os.PathLike | None = None) -> RunConfig:
    """The config with every reference concrete (module docstring); ``base`` is the folder relative
    paths are read from (default: the current one). Checks first (``check``), then builds what is missing."""
    check(cfg, base)
    return build(cfg, base)


def build(cfg: RunConfig, base: str | os.PathLike | None = None) -> RunConfig:
    """``resolve`` for a config that ``check`` passed: builds what is missing, makes every path concrete."""
    base = Path(base or Path.cwd())
    update: dict[str, Any] = {"cache_dir": _absolute(cfg.cache_dir, base, False),
                              "output_dir": _absolute(cfg.output_dir, base, False)}
    if cfg.sweep.storage_path:
        update["sweep"] = cfg.sweep.model_copy(update={"storage_path": _absolute(cfg.sweep.storage_path, base, False)})
    cfg = cfg.model_copy(update=update)
    tasks = [resolve_task(i, t, base, cfg.cache_dir) for i, t in enumerate(cfg.tasks)]
    cfg = cfg.model_copy(update={"tasks": tasks})
    models = [resolve_model(i, m, base, cfg) for i, m in enumerate(cfg.models)]
    return cfg.model_copy(update={"models": models})

