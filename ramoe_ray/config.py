"""Typed run configuration: YAML in, validated pydantic models out, dotted overrides on the command line.

A config is checked in two passes, both before anything is computed or written:

1. ``load_config`` parses the YAML, applies ``key.sub=value`` overrides and validates every field on
   its own (types, ranges, methods, bands);
2. ``sources.check`` checks what needs the world outside the file: known families and languages, the
   model and task references, each model's size from its HF config and what depends on it (top-k not
   larger than the expert count, every band holding at least one MoE layer, the RISE budget).

Every error is a ``ConfigError`` whose message names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from ramoe_ray.cache import write_text_atomic

METHODS = ("sft", "steering", "rise", "ramoe")  # the one list of methods: RA-MoE and its baselines

# Languages a config may name, ISO 639-1 (MGSM, Global-MMLU and Belebele languages); sources.py adds
# the languages of the synthetic world.
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


def safe_name(v: str) -> str:
    """A name that is one path component: letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
        raise ValueError(f"{v!r} is not a valid name; use letters, digits, '.', '_' and '-' (one path component, "
                         "starting with a letter or digit)")
    return v


SafeName = Annotated[str, AfterValidator(safe_name)]


class ModelConfig(_Strict):
    name: SafeName = Field(description="short label used in run names and tables")
    family: str = Field(description="architecture family; one of ramoe_ray.models.FAMILIES (checked by sources.check)")
    path: str = Field(
        description="Hugging Face hub id (e.g. allenai/OLMoE-1B-7B-0125), a local folder, preset:FAMILY (tiny "
        "random model) or synthetic:FAMILY (the synthetic world's pretrained model)"
    )
    revision: str | None = Field(default=None, description="hub revision (commit, branch or tag)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: StrictBool = Field(default=False, description="runs the model repository's own code: "
                                          "true or false only (a string such as 'yes' is refused)")


class TaskConfig(_Strict):
    name: SafeName
    format: Literal["generative_numeric", "multiple_choice", "passage_multiple_choice"]
    source: str = Field(description="hub dataset id, a local folder, or a synthetic-world task ('synthetic:arith')")
    choices: Literal["letters", "texts"] = Field(
        default="letters",
        description="multiple choice: score the letters (lm-eval's global_mmlu/belebele) or the option texts "
        "(ARC-style); synthetic-world tasks default to texts (sources.resolve; see tasks.choice_continuations)",
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


class Band(_Strict):
    """A layer band: the fraction range [start, end) of the model's depth. THE band type: parsed here,
    labelled here and resolved against a model's shape here, by every stage, the sweep and the CLI."""

    start: float
    end: float

    def label(self) -> str:
        return f"{self.start:g}-{self.end:g}"

    def as_json(self) -> list[float]:
        return [float(self.start), float(self.end)]

    def layers(self, moe_layers: Sequence[int], num_layers: int) -> list[int]:
        """The MoE layers inside the band. Rule: decoder layer l of the model's ``num_layers`` decoder
        layers (dense ones included) is inside when its centre (l + 0.5) / num_layers lies in [start, end)
        (a band ending at 1.0 includes the last layer); dense layers are never returned."""
        return band_layers_of(self.start, self.end, moe_layers, num_layers)


BandSpec = Literal["auto"] | Band


def band_layers_of(start: float, end: float, moe_layers: Sequence[int], num_layers: int) -> list[int]:
    """``Band.layers`` for a raw (start, end) pair (RISE's depth zones use the same rule)."""
    n = int(num_layers)
    return [l for l in moe_layers if start <= (l + 0.5) / n < end or (end >= 1.0 and (l + 0.5) / n >= start)]


def parse_band(value: Any, what: str = "band") -> BandSpec:
    """A band as written anywhere: 'auto', a Band, [start, end] / (start, end), {start:, end:} or the
    label text 'START-END' (the CLI's --band). ValueError naming ``what``, the value and what is allowed."""
    if value == "auto" or isinstance(value, Band):
        return value
    if isinstance(value, str):
        parts = value.split("-")
        try:
            value = [float(parts[0]), float(parts[1])] if len(parts) == 2 else value
        except ValueError:
            pass
    if isinstance(value, dict):
        value = [value.get("start"), value.get("end")]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
        raise ValueError(f"{what} = {value!r} is not allowed; a band is [start, end] (fractions of depth) or 'auto' "
                         "(on the command line: START-END)")
    start, end = float(value[0]), float(value[1])
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"{what} = [{start:g}, {end:g}] is outside 0-1; bands are fractions of depth")
    if start > end:
        raise ValueError(f"{what} = [{start:g}, {end:g}] is reversed (start > end); write [{end:g}, {start:g}]")
    if start == end:
        raise ValueError(f"{what} = [{start:g}, {end:g}] is empty; start must be smaller than end")
    return Band(start=start, end=end)


def band_label(spec: Any) -> str:
    """'auto' or 'START-END' of anything ``parse_band`` reads."""
    spec = parse_band(spec)
    return "auto" if spec == "auto" else spec.label()


def band_json(spec: Any) -> str | list[float]:
    """'auto' or [start, end] of anything ``parse_band`` reads: how a band is stored in JSON (trial specs,
    artefact keys)."""
    spec = parse_band(spec)
    return "auto" if spec == "auto" else spec.as_json()


def resolve_band(spec: BandSpec, shape: Any, what: str = "band") -> list[int] | None:
    """The MoE layers of a band on a model (``shape``: anything with ``moe_layers`` and ``num_layers``,
    i.e. a models.MoEShape); None for 'auto' (stage 2 decides). ConfigError when the band holds no MoE layer."""
    if spec == "auto":
        return None
    layers = spec.layers(shape.moe_layers, shape.num_layers)
    if not layers:
        raise ConfigError(f"{what} = [{spec.start:g}, {spec.end:g}]: holds no MoE layer of the model "
                          f"({shape.num_layers} layers, MoE layers {list(shape.moe_layers)}); widen it")
    return layers


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
        return [parse_band(b, f"band {i}") for i, b in enumerate(v)] if isinstance(v, list) else v

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
    name: SafeName = Field(default="ramoe", description="the run folder's name under output_dir and the MLflow sweep name: "
                      "one path component of letters, digits, '.', '_' and '-'")
    models: list[ModelConfig] = Field(min_length=1)
    tasks: list[TaskConfig] = Field(min_length=1)
    languages: list[str] = Field(min_length=1, description="target languages (English is the source)")
    methods: list[Literal[METHODS]] = Field(default=list(METHODS), min_length=1)
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
        for code in v:
            if code == "en":
                raise ValueError("'en' is the source language; list only target languages")
        if len(set(v)) != len(v):
            raise ValueError(f"languages {v} has duplicates")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> RunConfig:
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (YAML keeps the last silently: a second
    ``training:`` block would replace the whole first one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {key_node.start_mark.line + 1} (first on line "
                    f"{seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config. Writes nothing."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {str(p)!r}: the top level must be a mapping, got {type(data).__name__}")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return config_from_dict(data, repr(str(p)))


def save_resolved(cfg: RunConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    return write_text_atomic(Path(run_dir) / "config.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
