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
import urllib.parse
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
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # nan and inf refused everywhere


def safe_name(v: str) -> str:
    """A name that is one path component: letters, digits, '.', '_' and '-', not starting with '.' or '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
        raise ValueError(f"{v!r} is not a valid name; use letters, digits, '.', '_' and '-' (one path component, "
                         "starting with a letter or digit)")
    return v


SafeName = Annotated[str, AfterValidator(safe_name)]


class ModelResources(_Strict):
    """A model's own Ray Train plan, overriding ``resources`` for that model's trials (``RunConfig.resources_for``):
    e.g. a 7B model on 1 GPU and a 30B one on 4. Unset fields keep ``resources``' values."""

    num_workers: int | None = Field(default=None, ge=1, description="Ray Train workers per trial of this model")
    gpus_per_worker: float | None = Field(default=None, ge=0)
    cpus_per_worker: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _not_empty(self) -> ModelResources:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("empty; set num_workers, gpus_per_worker and/or cpus_per_worker, or leave resources out")
        return self


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
    resources: ModelResources | None = Field(
        default=None, description="this model's Ray Train workers and their GPUs/CPUs, overriding the top-level "
        "resources for its trials (unset fields keep those)")


class TaskConfig(_Strict):
    name: SafeName
    format: Literal["generative_numeric", "multiple_choice", "passage_multiple_choice"]
    source: str = Field(description="hub dataset id, a local folder, or a synthetic-world task ('synthetic:arith')")
    choices: Literal["letters", "texts"] = Field(
        default="letters",
        description="multiple choice: score the letters (lm-eval's global_mmlu/belebele) or the option texts "
        "(ARC-style); synthetic-world tasks default to texts (sources.resolve; see tasks.choice_continuations)",
    )
    scoring: Literal["exact", "numeric"] = Field(
        default="exact",
        description="generative: 'exact' = lm-eval's mgsm_direct (flexible-extract, then exact_match ignoring case "
        "and punctuation: '18.0' != '18'); 'numeric' = equal numbers ('18.0' = '18'); see tasks.score_generative",
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


RISE_DEFAULT_PERCENT = 2  # default K: 2 % of the routed experts (RISE: K = 128 of Qwen3-30B-A3B's 48 x 128 = 6,144)


class RiseConfig(_Strict):
    """The RISE baseline (arXiv 2604.03592, github.com/init-neok/rise), docs/architecture.md "The methods"."""

    budget: int | None = Field(
        default=None, ge=1,
        description="K, the (layer, expert) pairs RISE trains, split over its depth zones; default: "
        "ceil(2 % of the model's routed experts) (at least 1), resolved per model (RiseConfig.budget_for)",
    )
    alpha: float = Field(default=10.0, ge=0, description="α of RISE's composite scores Spec = S (1 + α a_target), "
                         "Ovlp = O (1 + α ā) (RISE's default 10)")
    languages: Literal["all", "pair"] = Field(
        default="all",
        description="the languages RISE's mean ā and CV run over: 'all' = English + every target language of the "
        "config (one cell's selection then depends on the sweep's other languages), 'pair' = English + the "
        "target (RISE's run_rise.sh default)",
    )
    train: Literal["full", "lora"] = Field(
        default="full",
        description="'full' = the selected experts' full weights train, as RISE does (a full-rank delta on each); "
        "'lora' = expert LoRA masked to them, reported as RISE-LoRA",
    )

    def budget_for(self, routed_experts: int) -> int:
        """K on a model with ``routed_experts`` (MoE layers × experts per layer) pairs: ``budget``, or by
        default ceil(2 % of them), at least 1 (ceil(0.02 · 1,024) = 21 for OLMoE, 123 for Qwen3-30B-A3B)."""
        if self.budget is not None:
            return self.budget
        return max(1, -(-RISE_DEFAULT_PERCENT * routed_experts // 100))


METHOD_LABELS = {"sft": "SFT", "steering": "Steering", "rise": "RISE", "ramoe": "RA-MoE"}


def method_label(method: str, cfg: Any) -> str:
    """A method's name in tables and figures: RISE trained with LoRA (``rise.train: lora``) is "RISE-LoRA"."""
    if method == "rise" and cfg.rise.train == "lora":
        return "RISE-LoRA"
    return METHOD_LABELS[method]


class TrainingConfig(_Strict):
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=8, ge=1, description="per worker")
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    seeds: list[int] = Field(
        default=[0], min_length=1,
        description="training seeds. The first seeds the data split (the same for every seed: paired statistics) and "
        "the grid search; each cell x method's selected configuration is then retrained with the others and "
        "evaluated on test (steering has no seed)",
    )
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
        description="batch size of the no-grad passes (stage 1's taxonomy; English targets, routing KL, train CE inside "
        "training; the evaluator's predictor); results do not depend on it",
    )
    final_train_pass: bool = Field(
        default=True,
        description="after training, one no-grad pass over the train split for routing_kl_ci and ce_train (the "
        "trained model's alignment KL on every ci train example and its train CE; train.RULES['metrics']). Off, a "
        "training ends at its last step: those two metrics are not measured (their _base values and the train_* "
        "curves still are), and each training saves one forward over the train split (on the demo 0.75 s of a "
        "trial's 1.9 s fixed cost). The shipped sweeps turn it off: trials are compared on validation "
        "(val_acc, and the routing divergence to English val_div_L*)",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v} has duplicates; each seed is one more run of the selected configurations")
        return v

    @property
    def seed(self) -> int:
        """The first seed: the data split's, and the grid search's training seed."""
        return self.seeds[0]


class ResourcesConfig(_Strict):
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers per trial")
    gpus_per_worker: float = Field(default=0.0, ge=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    inference_actors: int = Field(
        default=1, ge=0,
        description="Ray Data predictor actors on CPU (with GPUs: one per GPU); 0 runs the predictor in the driver "
        "process without Ray (debugging, small runs)",
    )
    gpu_memory_gb: float = Field(default=80.0, gt=0, description="memory of one GPU (GB = 1e9 bytes): a plan whose "
                                 "per-GPU need (memory.fit) exceeds it is refused before anything is queued")
    seq_len: int = Field(default=1024, ge=1, description="tokens per training example (prompt + answer) the memory "
                         "check assumes; nothing truncates to it")


class ClusterConfig(_Strict):
    """The resources a sweep may use at once (``sweep.cluster``)."""

    gpus: float = Field(default=0.0, ge=0)
    cpus: float = Field(gt=0)


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
        description="Ray Train workers per trial; default resources.num_workers (or the model's own); 0 = Ray Train "
        "local mode inside the trial process (small models on one machine: no worker group start-up)",
    )
    scheduler: Literal["grid", "asha"] = Field(
        default="grid",
        description="grid: every trial runs to the end; asha: RA-MoE's knob settings within a cell are evaluated on "
        "validation at rungs during training and the worse ones stopped (ramoe_ray/asha.py); SFT, RISE, steering and "
        "the seed replicates always run to the end",
    )
    asha_grace: float = Field(default=0.25, gt=0, lt=1, description="asha: the first rung, as a share of a trial's "
                              "steps; the next rungs at grace x reduction_factor^k below 1")
    asha_reduction_factor: float = Field(default=3.0, gt=1, description="asha: a trial continues past a rung when its "
                                         "val_acc is in the top 1/reduction_factor of its cell's trials at that rung")
    cluster: ClusterConfig | None = Field(
        default=None,
        description="the CPUs and GPUs the sweep may use at once: trials at once per model follow from them "
        "(sweep.max_concurrent), and the dry run schedules on them. Default: what Ray reports when the trials start "
        "(an autoscaling cluster reports only its running nodes: set the size it grows to); the dry run: this machine",
    )


    @field_validator("storage_path")
    @classmethod
    def _filesystem_path(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(f"{v!r}: trial folders (adapters, trial.json) are written with file I/O; give a path "
                             "on a file system every node mounts (NFS, EFS, a ReadWriteMany volume), not an object store")
        return v


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(default=None, description="default: sqlite database in the run folder. "
                                   "Credentials in it (user:password@) are moved to MLflow's own environment "
                                   "variables and never stored or shown; better, set those variables yourself")
    experiment: str = "ramoe"

    @field_validator("mlflow_uri")
    @classmethod
    def _credentials_to_environment(cls, v: str | None) -> str | None:
        return uri_without_credentials(v) if v is not None else v


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_scheme(uri: str) -> str:
    """The scheme of an MLflow tracking URI ('mysql' of 'mysql+pymysql://...'), or ConfigError naming the
    field, the URI and the allowed schemes. Only the text: ``sweep.check_tracking`` checks the rest."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.mlflow_uri = {uri!r}: not a database or server URI; allowed: sqlite:///PATH, "
                          f"http(s)://HOST:PORT (a tracking server), postgresql://, mysql://, databricks "
                          f"(MLflow 3 refuses the plain file store)")
    return scheme


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
        dup = sorted({code for code in v if v.count(code) > 1})
        if dup:
            raise ValueError(f"{', '.join(map(repr, dup))} listed more than once; list each target language once")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> RunConfig:
        for what, names in (("models", [m.name for m in self.models]), ("tasks", [t.name for t in self.tasks])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _one_worker_count(self) -> RunConfig:
        both = [f"models.{i}.resources.num_workers" for i, m in enumerate(self.models)
                if m.resources is not None and m.resources.num_workers is not None]
        if both and self.sweep.train_workers is not None:
            raise ValueError(f"sweep.train_workers = {self.sweep.train_workers} and {', '.join(both)} both set the "
                             "Ray Train workers of a trial; keep one")
        return self

    def resources_for(self, model: ModelConfig | str) -> ResourcesConfig:
        """``resources`` with the model's own ``resources`` fields in place (``ModelResources``); ``model``: a
        ModelConfig (a resolved copy too) or a model name of the config."""
        if isinstance(model, str):
            found = [m for m in self.models if m.name == model]
            if not found:
                raise ConfigError(f"model {model!r} is not in the config ({', '.join(m.name for m in self.models)})")
            model = found[0]
        own = model.resources.model_dump(exclude_none=True) if model.resources is not None else {}
        return self.resources.model_copy(update=own)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def mlflow_uri(self) -> str:
        if self.tracking.mlflow_uri:
            return self.tracking.mlflow_uri
        return f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"


# ---------------------------------------------------------------------------------------------- secrets

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&][^=&#\s]*(?:token|passw|secret|api[_-]?key|auth)[^=&#\s]*=)[^&#\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ***: user:password@ and the values
    of query parameters named like a token, password, secret, API key or auth."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", text))


def uri_without_credentials(uri: str) -> str:
    """A tracking URI without its credentials: user:password@ moves to MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD in this process's environment (MLflow reads them there; nothing stores or
    prints them). A secret in the query is refused: MLflow has no variable to move it to."""
    if _SECRET_QUERY.search(uri):
        raise ValueError(f"{redact(uri)}: a secret in the URI's query would be logged with it; set "
                         "MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) instead")
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(user)
    if colon:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------- identity

# The only config fields left out of a result's identity (a sweep's resume check, a training's run folder):
# where it runs and where it logs. Every other field can change a result.
NON_RESULT: dict[str, str] = {
    "name": "the run's label (a sweep is found by it)",
    "tracking": "where results are logged",
    "output_dir": "where run folders are written",
    "cache_dir": "where stage artefacts are kept (each is keyed by the content hash of its inputs)",
    "sweep.max_concurrent_trials": "how many trials run at once",
    "sweep.trial_cpus": "the CPUs of a trial's own process",
    "sweep.storage_path": "where Ray Tune keeps the trial folders",
    "resources.cpus_per_worker": "the CPUs of a worker",
    "resources.inference_actors": "how many inference actors share the rows",
    "resources.gpu_memory_gb": "the GPU memory the plan is checked against",
    "resources.seq_len": "the sequence length the memory check assumes",
    "sweep.cluster": "the resources the sweep schedules on",
    "training.eval_batch_size": "rows per no-grad batch (batched generation equals per-row decoding: "
                                "tests/test_taxonomy.py)",
    "training.checkpoint_every": "how often a checkpoint is written (a resume from it is exact)",
    "training.max_failures": "how many worker-group restarts are allowed (a restart resumes exactly)",
}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values stay as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


MODEL_NON_RESULT = ("cpus_per_worker",)  # of a model's own resources: left out as resources.cpus_per_worker


def _model_result(model: dict) -> dict:
    """A model's entry without what changes no result: its own CPUs, and ``resources`` when unset (a config
    written before models had resources keeps its identity)."""
    own = {k: v for k, v in (model.get("resources") or {}).items() if k not in MODEL_NON_RESULT and v is not None}
    return {**{k: v for k, v in model.items() if k != "resources"}, **({"resources": own} if own else {})}


def result_fields(cfg: RunConfig) -> dict[str, Any]:
    """The config's fields that can change a result, flat (``flatten``): everything but ``NON_RESULT`` (and a
    model's own CPUs, ``MODEL_NON_RESULT``)."""
    data = cfg.model_dump(mode="json")
    data["models"] = [_model_result(m) for m in data["models"]]
    flat = flatten(data)
    return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NON_RESULT)}


def differing_keys(old: dict, new: dict) -> str:
    """The keys whose values differ between two flat dicts, as 'key: old -> new; ...' ('' if none)."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys)


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
        if not loc:  # a check across fields (RunConfig's model validators): the message names them
            lines.append(f"  {msg}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: missing (required)")
        else:
            lines.append(f"  {loc} = {value!r}: {msg}")
    return redact("\n".join(lines))  # a value may be a whole section, tracking's URI included


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


# yaml's words for the usual slips, said plainly (the fault's line comes first in the message)
_YAML_HINTS = {
    "expected <block end>": "this line is indented differently from the keys above it (keys of one section line up)",
    "mapping values are not allowed here": "a 'key:' where no key can start (mis-indented, or an unquoted ':' in a value)",
}


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    """The fault's own line and column first (yaml's problem_mark), then the block it broke (context_mark),
    and the line itself with a caret."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return ConfigError(f"config file {str(p)!r} is not valid YAML: {e}")
    problem = str(getattr(e, "problem", "") or e)
    hint = next((h for k, h in _YAML_HINTS.items() if problem.startswith(k)), None)
    msg = f"config file {str(p)!r} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: " + (
        f"{hint} (YAML: {problem})" if hint else problem)
    context = getattr(e, "context_mark", None)
    if context is not None and e.context:
        msg += f"; {e.context} that starts on line {context.line + 1}"
    snippet = mark.get_snippet() if mark.buffer else None
    return ConfigError(msg + (f"\n{snippet}" if snippet else ""))


def _read_yaml(p: Path) -> Any:
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a folder; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(p)!r}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a YAML config. Writes nothing."""
    p = Path(path)
    data = _read_yaml(p)
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
