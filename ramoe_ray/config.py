"""Typed run configuration: YAML in, validated pydantic models out, dotted overrides on the command line.

A config is checked in two passes, both before anything is computed or written:

1. ``load_config`` parses the YAML, applies ``key.sub=value`` overrides and validates every field on
   its own (types, ranges, known families / methods / languages);
2. ``check_against_models`` reads each model's size (layers, experts, experts per token) from its HF
   config and checks what depends on it (top-k not larger than the expert count, every band
   resolving to at least one MoE layer).

Every error is a ``ConfigError`` whose message names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ramoe_ray.models import FAMILIES, PRESET, preset_family

METHODS = ("sft", "steering", "rise", "ramoe")

# Languages a config may name, ISO 639-1 (MGSM, Global-MMLU and Belebele languages); the synthetic
# world's own languages (syn1..syn6) are added by known_languages().
LANGUAGES: dict[str, str] = {
    "en": "English", "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "de": "German", "el": "Greek",
    "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fr": "French", "ha": "Hausa", "he": "Hebrew",
    "hi": "Hindi", "id": "Indonesian", "ig": "Igbo", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "ky": "Kyrgyz", "lt": "Lithuanian", "mg": "Malagasy", "ms": "Malay", "ne": "Nepali", "nl": "Dutch",
    "ny": "Chichewa", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "si": "Sinhala", "sn": "Shona", "so": "Somali", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili",
    "te": "Telugu", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese",
    "yo": "Yoruba", "zh": "Chinese", "am": "Amharic", "fil": "Filipino",
}


class ConfigError(ValueError):
    """A configuration problem, found before any work starts. The message is meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(description="short label used in run names and tables")
    family: str = Field(description="architecture family; one of ramoe_ray.models.FAMILIES")
    path: str = Field(
        description="Hugging Face hub id (e.g. allenai/OLMoE-1B-7B-0125), a local folder, preset:FAMILY (tiny "
        "random model) or synthetic:FAMILY (the synthetic world's pretrained model)"
    )
    revision: str | None = Field(default=None, description="hub revision (commit, branch or tag)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown model family {v!r}; supported families: {', '.join(FAMILIES)}")
        return v

    @field_validator("path")
    @classmethod
    def _preset_matches_family(cls, v: str, info: ValidationInfo) -> str:
        from ramoe_ray import synthetic

        fam = preset_family(v)
        if fam is None and (world := synthetic.parse_scheme(v)) is not None:
            fam = world[1]
        if fam is not None and fam not in FAMILIES:
            raise ValueError(f"{v!r} names no preset; presets: {', '.join(PRESET + f for f in FAMILIES)}")
        if fam is not None and fam != info.data.get("family", fam):
            raise ValueError(f"{v!r} is a {fam} model but family is {info.data['family']!r}")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"{v!r} is not a valid name; use letters, digits, '.', '_' and '-'")
        return v


class TaskConfig(_Strict):
    name: str
    format: Literal["generative_numeric", "multiple_choice", "passage_multiple_choice"]
    source: str = Field(description="hub dataset id, a local folder, or a synthetic-world task ('synthetic:arith')")
    choices: Literal["letters", "texts"] = Field(
        default="letters",
        description="multiple choice: score the letters (lm-eval's global_mmlu/belebele) or the option texts "
        "(ARC-style); synthetic-world tasks default to texts (see tasks.choice_continuations)",
    )
    general_source: str | None = Field(
        default=None,
        description="English general (non-task) text for the task-expert contrast: a local .jsonl ({'text': ...} "
        "per line) or .txt (one document per line); synthetic-world tasks default to the world's own",
    )

    @field_validator("general_source")
    @classmethod
    def _general_suffix(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith((".jsonl", ".txt")):
            raise ValueError(f"{v!r}: general text is a .jsonl or .txt file")
        return v

    @model_validator(mode="before")
    @classmethod
    def _synthetic_choices(cls, data: Any) -> Any:
        from ramoe_ray import synthetic

        if isinstance(data, dict) and "choices" not in data and synthetic.parse_scheme(str(data.get("source", ""))):
            data = {**data, "choices": synthetic.CHOICES}
        return data

    @model_validator(mode="after")
    def _synthetic_format(self) -> "TaskConfig":
        from ramoe_ray import synthetic

        world = synthetic.parse_scheme(self.source)
        if world is not None:
            task = world[1]
            if task not in synthetic.TASKS:
                raise ValueError(f"source {self.source!r}: no synthetic task {task!r}; allowed: {', '.join(synthetic.TASKS)}")
            if synthetic.TASKS[task] != self.format:
                raise ValueError(f"source {self.source!r} is a {synthetic.TASKS[task]} task, but format is {self.format!r}")
        return self


class Band(_Strict):
    """A layer band as a fraction range [start, end) of the model's depth (checked by _parse_band)."""

    start: float
    end: float

    def label(self) -> str:
        return f"{self.start:g}-{self.end:g}"


BandSpec = Union[Literal["auto"], Band]


def _parse_band(i: int, v: Any) -> Any:
    """A band item as written in YAML: [start, end] or 'auto'."""
    if v == "auto" or isinstance(v, Band):
        return v
    if isinstance(v, dict):
        v = [v.get("start"), v.get("end")]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v):
        raise ValueError(f"band {i} = {v!r} is not allowed; a band is [start, end] (fractions of depth) or 'auto'")
    start, end = float(v[0]), float(v[1])
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"band {i} = [{start:g}, {end:g}] is outside 0-1; bands are fractions of depth")
    if start >= end:
        raise ValueError(f"band {i} = [{start:g}, {end:g}] is empty; start must be smaller than end")
    return Band(start=start, end=end)


class Knobs(_Strict):
    """The three sweep knobs of RA-MoE."""

    lambdas: list[float] = Field(default=[0.1, 0.5, 1.0], min_length=1)
    bands: list[BandSpec] = Field(default_factory=lambda: [Band(start=0.375, end=0.625)], min_length=1)
    top_k: list[int] = Field(default=[2], min_length=1)

    @field_validator("lambdas")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        for x in v:
            if x < 0:
                raise ValueError(f"lambda {x} is negative; the alignment-loss weight must be >= 0")
        return v

    @field_validator("bands", mode="before")
    @classmethod
    def _bands(cls, v: Any) -> Any:
        return [_parse_band(i, b) for i, b in enumerate(v)] if isinstance(v, list) else v

    @field_validator("top_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        for k in v:
            if k < 1:
                raise ValueError(f"top_k {k} must be >= 1")
        return v


class SteeringConfig(_Strict):
    strengths: list[float] = Field(default=[2.0], min_length=1, description="added to task experts' router logits")


class RiseConfig(_Strict):
    budget: int = Field(default=8, ge=1, description="experts adapted per model, split over depth zones")


class TrainingConfig(_Strict):
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=8, ge=1, description="per worker")
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    seed: int = 0
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps (default: all epochs)")
    log_every: int = Field(
        default=10, ge=1,
        description="metrics (history, ray.train.report) every N steps. Ray Train V2's controller drains one report "
        "per worker per health-check poll (2 s): with a worker group, a report every step blocks the next "
        "checkpoint report ~2 s per queued report (bench/sweep.py measured 74 s at 40 steps); local mode pays nothing",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="Ray Train checkpoint every N steps (and at the end)")
    max_failures: int = Field(default=2, ge=0, description="worker-group restarts from the last checkpoint (FailureConfig)")
    eval_batch_size: int = Field(
        default=64, ge=1,
        description="batch size of the no-grad passes (English targets, routing KL, train CE inside training; the "
        "evaluator's predictor); results do not depend on it",
    )


class ResourcesConfig(_Strict):
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per trial")
    gpus_per_worker: float = Field(default=0.0, ge=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    inference_actors: int = Field(
        default=1, ge=0,
        description="Ray Data predictor actors on CPU (with GPUs: one per GPU); 0 runs the predictor in the driver "
        "process without Ray (debugging, small runs)",
    )


class SweepConfig(_Strict):
    """Ray Tune over the grid (ramoe_ray/sweep.py)."""
    max_concurrent_trials: int | None = Field(
        default=None, ge=1,
        description="trials at once; default: what the cluster's resources hold (CPUs, GPUs) for one trial's "
        "Ray Train workers + its own process",
    )
    trial_cpus: float = Field(default=0.25, gt=0, description="CPUs of the Tune trial's own process (it runs stage-4 "
                              "evaluation in process when resources.inference_actors = 0)")
    storage_path: str | None = Field(
        default=None,
        description="Ray Tune/Train storage and the trial folders (adapters, trial.json): a folder every node sees "
        "(NFS, EFS, a ReadWriteMany volume); default: run folder/tune",
    )
    train_workers: int | None = Field(
        default=None, ge=0,
        description="Ray Train workers per trial; default resources.num_workers; 0 = Ray Train local mode inside "
        "the trial process (small models on one machine: no worker group start-up)",
    )


    @field_validator("storage_path")
    @classmethod
    def _filesystem_path(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"{v!r}: trial folders (adapters, trial.json) are written with file I/O; give a path "
                             "on a file system every node mounts (NFS, EFS, a ReadWriteMany volume), not an object store")
        return v


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(default=None, description="default: sqlite database in the run folder")
    experiment: str = "ramoe"


class RunConfig(_Strict):
    name: str = "ramoe"
    models: list[ModelConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    languages: list[str] = Field(min_length=1, description="target languages (English is the source)")
    methods: list[Literal["sft", "steering", "rise", "ramoe"]] = Field(default=list(METHODS), min_length=1)
    knobs: Knobs = Field(default_factory=Knobs)
    steering: SteeringConfig = Field(default_factory=SteeringConfig)
    rise: RiseConfig = Field(default_factory=RiseConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    cache_dir: str = ".ramoe_cache"
    output_dir: str = "runs"

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, v: list[str]) -> list[str]:
        known = known_languages()
        for code in v:
            if code == "en":
                raise ValueError("'en' is the source language; list only target languages")
            if code not in known:
                raise ValueError(f"unknown language code {code!r}; allowed: {', '.join(sorted(known))}")
        if len(set(v)) != len(v):
            raise ValueError(f"languages {v} has duplicates")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "RunConfig":
        for what, names in (("models", [m.name for m in self.models]), ("tasks", [t.name for t in self.tasks])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def mlflow_uri(self) -> str:
        if self.tracking.mlflow_uri:
            return self.tracking.mlflow_uri
        return f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"


def known_languages() -> set[str]:
    from ramoe_ray.synthetic import TARGET_LANGUAGES

    return set(LANGUAGES) | set(TARGET_LANGUAGES)


# ---------------------------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=1e-4`` -> (["training", "lr"], 0.0001). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e})") from None
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    """Sets data[parts[0]][parts[1]]... = value; list items are addressed by index (models.0.path)."""
    node: Any = data
    for i, part in enumerate(parts):
        here, last = ".".join(parts[: i + 1]), i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {'.'.join(parts)}: {here}: a list of {len(node)}, use an index 0..{len(node) - 1}")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last:
                node.setdefault(key, {})
        else:
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i])} is a value, not a section")
        if last:
            node[key] = value
        else:
            node = node[key]


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        if e["type"] == "missing":
            lines.append(f"  {loc}: missing (required)")
        else:
            lines.append(f"  {loc} = {value!r}: {msg}")
    return "\n".join(lines)


def config_from_dict(data: Any, source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config. Writes nothing."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {str(p)!r}: the top level must be a mapping, got {type(data).__name__}")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return config_from_dict(data, repr(str(p)))


def check_against_models(cfg: RunConfig) -> dict[str, "MoEShape"]:
    """Checks what depends on each model's size; returns the shapes read from the HF configs."""
    from ramoe_ray.experts import resolve_band
    from ramoe_ray.models import MoEShape, moe_shape

    shapes: dict[str, MoEShape] = {}
    for i, m in enumerate(cfg.models):
        try:
            shapes[m.name] = moe_shape(m)
        except (ValueError, OSError) as e:
            raise ConfigError(f"models.{i} ({m.name}): {e}") from None
        shape = shapes[m.name]
        for j, k in enumerate(cfg.knobs.top_k):
            if k > shape.num_experts:
                raise ConfigError(
                    f"knobs.top_k.{j} = {k}: larger than the {shape.num_experts} experts of model "
                    f"{m.name!r}; allowed: 1..{shape.num_experts}"
                )
        for j, band in enumerate(cfg.knobs.bands):
            if band == "auto":
                continue
            layers = resolve_band(band.start, band.end, shape.moe_layers)
            if not layers:
                raise ConfigError(
                    f"knobs.bands.{j} = [{band.start}, {band.end}]: holds no MoE layer of model {m.name!r} "
                    f"({shape.num_layers} layers, MoE layers {shape.moe_layers}); widen it"
                )
    return shapes


def with_absolute_paths(cfg: RunConfig, base: str | os.PathLike | None = None) -> RunConfig:
    """The config with every local path made absolute against ``base`` (default: the current folder):
    cache_dir, output_dir, sweep.storage_path, and model paths / task sources / general sources that
    name an existing local file or folder. Processes that run elsewhere (Ray Tune trials run in their
    own trial folders) then read the same files."""
    base = Path(base or Path.cwd())

    def local(p: str | None, must_exist: bool) -> str | None:
        if p is None or "://" in p or Path(p).is_absolute():
            return p
        q = base / p
        return str(q.resolve()) if (q.exists() or not must_exist) else p

    update: dict[str, Any] = {"cache_dir": local(cfg.cache_dir, False), "output_dir": local(cfg.output_dir, False)}
    update["models"] = [m.model_copy(update={"path": local(m.path, True)}) for m in cfg.models]
    update["tasks"] = [t.model_copy(update={"source": local(t.source, True), "general_source": local(t.general_source, True)})
                       for t in cfg.tasks]
    if cfg.sweep.storage_path:
        update["sweep"] = cfg.sweep.model_copy(update={"storage_path": local(cfg.sweep.storage_path, False)})
    return cfg.model_copy(update=update)


def save_resolved(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.resolved.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, out)
    return out
