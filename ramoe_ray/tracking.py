"""MLflow for the sweep and the report: the store, the experiment, the sweep's parent run, one child run
per trial, and reading them back (every page). Only the sweep's driver writes here (trials never open
the database); the report only reads, plus its own artefacts.

What a sweep logs (the report's input, report.py):

- the **parent** run: tags ``ramoe.kind = sweep``, ``ramoe.sweep = NAME``, ``ramoe.config_hash``,
  ``ramoe.expected_trials``; params (every rule of the method's definitions, the training settings, the
  grid); artefacts ``config.resolved.yaml`` and ``cells/cells.json`` (stages 1-2's facts per cell);
- one **child** run per trial (``log_child``, from the Tune callback as each trial ends): tags
  ``mlflow.parentRunId``, ``ramoe.kind = trial``, model/task/language/method, ``trial_key``,
  ``trial_index``, ``selected``, ``ramoe.trial_dir``, ``ramoe.host`` / ``ramoe.libs`` (``environment``: where it
  ran, on what; the parent has the driver's); params (knobs and training facts); metrics
  (validation accuracy, ci proportion, routing KL before/after, loss curves, timings); trial.json as an
  artefact (a tested trial also gets its trial.png, sweep.py). A failed trial is a FAILED child with its ``error`` tag. A twin (``grid.twins``:
  the same computation as an earlier trial of its cell) is its own child with that trial's results and
  the tag ``ramoe.same_as`` (the trial's key).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import socket
import sys
import time
import types
from pathlib import Path

from ramoe_ray import asha
from ramoe_ray.cache import content_key, write_json_atomic
from ramoe_ray.config import ConfigError, RunConfig, result_fields, save_resolved
from ramoe_ray.grid import TRIAL_JSON, Trial, config_hash

CELLS_ARTIFACT = "cells"
SAME_AS_TAG = "ramoe.same_as"  # on a twin (grid.twins): the trial_key of the trial whose results it carries
REPLICATE_TAG = "ramoe.replicate_of"  # on a selected configuration retrained with another seed: its trial_key
DRIVER_TAG, DRIVER_START_TAG = "ramoe.driver", "ramoe.driver_started"  # pid@host, its start time
RESUMES_TAG = "ramoe.resumes"  # on a parent: how many times --resume continued it (its phase times: the last run's)
IDENTITY_ARTIFACT = "identity.json"  # the parent's config.result_fields: a resume names what changed
SWEEP_FILTER = "tags.`ramoe.kind` = 'sweep'"
FINAL_METRICS = ("routing_kl_ci", "routing_kl_ci_base", "ce_train", "ce_train_base")
CURVES = ("loss", "ce", "align", "routing_kl")


# ---------------------------------------------------------------------------------------------- store


def mlflow_client(uri: str):
    """An MlflowClient on ``uri`` (never the global tracking URI)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def read_client(uri: str):
    """An MlflowClient on an existing store, for reading; a ConfigError when there is nothing to read
    (MLflow would create an empty database)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise ConfigError(f"tracking {uri}: no MLflow database at {str(db)!r}; run a sweep first "
                              f"or set tracking.mlflow_uri")
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
        if not folder.is_dir():
            raise ConfigError(f"tracking {uri}: no MLflow store at {str(folder)!r}; run a sweep first "
                              f"or set tracking.mlflow_uri")
    return mlflow_client(uri)


def experiment_id(client, name: str, artifacts: Path | None) -> str:
    """The experiment's id, created if new; with a sqlite store its artifacts live next to the database
    (``artifacts``), not in ./mlruns of whatever folder the command ran in."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(f"tracking.experiment = {name!r} is deleted in {client.tracking_uri}; restore it or pick another name")
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifacts.resolve().as_uri() if artifacts else None)


def download_artifact(uri: str, run_id: str, path: str, dst: str) -> Path | None:
    """One artefact of a run into ``dst``; None when it is not logged (yet)."""
    import mlflow

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"  # no progress bars around printed output
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst,
                                                        tracking_uri=uri))
    except Exception:  # not logged (yet): the caller says what it lacks
        return None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# ---------------------------------------------------------------------------------------------- reading


def search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` (all pages), read through ``client`` (never the global URI)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def sweeps(client, experiment_ids: list[str], name: str | None = None) -> list:
    """Sweep parent runs of the experiments (of the sweep ``name``, or all), newest first."""
    if not experiment_ids:
        return []
    query = SWEEP_FILTER if name is None else f"{SWEEP_FILTER} and tags.`ramoe.sweep` = '{name}'"
    return search_all(client, experiment_ids, query, ["attributes.start_time DESC"])


def find_parent(client, exp_id: str, name: str) -> str | None:
    """The run id of the newest sweep ``name`` in the experiment, None if there is none."""
    runs = sweeps(client, [exp_id], name)
    return runs[0].info.run_id if runs else None


def child_runs(client, exp_id: str, parent_id: str) -> list:
    """The parent's child runs (not deleted)."""
    return search_all(client, [exp_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def children(client, exp_id: str, parent_id: str):
    """The parent's child runs (not deleted) as a DataFrame with mlflow.search_runs' column names
    (run_id, status, tags.*, params.*, metrics.*)."""
    import pandas as pd

    return pd.DataFrame([{"run_id": r.info.run_id, "status": r.info.status,
                          **{f"tags.{k}": v for k, v in r.data.tags.items()},
                          **{f"params.{k}": v for k, v in r.data.params.items()},
                          **{f"metrics.{k}": v for k, v in r.data.metrics.items()}}
                         for r in child_runs(client, exp_id, parent_id)])


# ---------------------------------------------------------------------------------------------- writing


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])


# ----------------------------------------------------------------------------------------- the machine

LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "ray", "mlflow")  # what makes a trial's numbers
HOST_TAG, LIBS_TAG = "ramoe.host", "ramoe.libs"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else (platform.processor() or "unknown CPU")


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """What this process runs on, for the record: host, CPU model and count, the GPUs it may use
    (CUDA_VISIBLE_DEVICES, which Ray sets per task), Python and ``LIBRARIES``' versions. Trial times are only
    comparable between runs on the same kind of host; the same config on other versions may differ. Once per
    process (a steering trial writes one record per setting)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"host": socket.gethostname(), "cpu": _cpu_model(), "cpus": os.cpu_count() or 0,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def environment_tags(env: dict) -> dict:
    """``environment()`` as two tags a person can filter on: the machine, and the libraries' versions."""
    gpus = ", ".join(env["gpus"]) or "no GPU"
    return {HOST_TAG: f"{env['host']}: {env['cpu']}, {env['cpus']} CPUs, {gpus}",
            LIBS_TAG: f"python {env['python']}, " + ", ".join(f"{lib} {env[lib]}" for lib in LIBRARIES)}


# ---------------------------------------------------------------------------------------------- the driver


def driver_tags() -> dict:
    """The parent's record of the process driving it (set at start and at each resume): a parent left
    RUNNING can then be told from a live sweep."""
    import psutil

    me = psutil.Process()
    return {DRIVER_TAG: f"{me.pid}@{socket.gethostname()}", DRIVER_START_TAG: f"{me.create_time():.2f}"}


def driver_state(run) -> tuple[str, str]:
    """For a parent run: ("alive" | "stopped" | "unknown" | "ended", a sentence a person can act on).
    A parent RUNNING whose driver is gone was stopped hard (kill -9, out of memory, a lost node): nothing
    could mark it KILLED."""
    import psutil

    if run.info.status != "RUNNING":
        return "ended", f"parent run {run.info.run_id} is {run.info.status}"
    pid, _, host = run.data.tags.get(DRIVER_TAG, "").partition("@")
    started = run.data.tags.get(DRIVER_START_TAG, "")
    who = f"pid {pid} on host {host}" if pid else "a driver that left no record"
    if pid.isdigit() and host == socket.gethostname():
        try:
            alive = f"{psutil.Process(int(pid)).create_time():.2f}" == started
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return "alive", f"parent run {run.info.run_id} is RUNNING: its driver ({who}) is still running"
        return "stopped", (f"parent run {run.info.run_id} was left RUNNING by a stopped driver ({who} no longer "
                           "runs: it was killed hard, e.g. kill -9, out of memory or a lost node)")
    return "unknown", (f"parent run {run.info.run_id} is RUNNING; its driver ({who}) cannot be checked from this "
                       "host: if it no longer runs, it was stopped hard and the status is stale")


def sweep_identity(client, run_id: str) -> dict | None:
    """The parent's ``IDENTITY_ARTIFACT`` (None for a sweep begun before it was logged)."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"{client.get_run(run_id).info.artifact_uri}/{IDENTITY_ARTIFACT}")
    except Exception:  # noqa: BLE001 - absent or unreadable: the caller falls back to the hash alone
        return None


def log_metrics(client, run_id: str, values: dict, step: int = 0, model_id: str | None = None) -> None:
    """Scalar metrics at ``step``, one timestamp (linked to a logged model when ``model_id`` is given)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()])


def log_dataset(client, run_id: str, source: str, task: str, language: str, split: str, ids: list[str]) -> None:
    """The examples a run used, as an MLflow dataset input (the runs table's Dataset column): named
    task-language-split, its digest the hash of the example ids, its source the task's reference."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=f"{task}-{language}-{split}", digest=content_key(sorted(ids), 16),
                 source_type="local" if Path(source).exists() else "hub",
                 source=json.dumps({"uri": source, "language": language, "split": split}),
                 profile=json.dumps({"num_rows": len(ids)}))
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", split)])])


def log_adapter(client, exp_id: str, run_id: str, name: str, adapter_dir: str, params: dict) -> str:
    """A trained adapter as an MLflow logged model of ``run_id`` (the Models view lists it; metrics logged
    with its id link to it); returns the model id."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="ramoe-expert-adapter",
                                       params={k: str(v) for k, v in params.items()})
    client.log_model_artifacts(model.model_id, adapter_dir)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id


def start_parent(client, exp_id: str, cfg: RunConfig, *, params: dict, n_trials: int, cells: list,
                 run_dir: Path) -> str:
    """The sweep's parent run: tags, ``params``, the resolved config and cells.json as artifacts."""
    run = client.create_run(exp_id, run_name=f"sweep {cfg.name}", tags={
        "ramoe.kind": "sweep", "ramoe.sweep": cfg.name, "ramoe.config_hash": config_hash(cfg),
        "ramoe.expected_trials": str(n_trials), **driver_tags(), **environment_tags(environment())})
    rid = run.info.run_id
    log_params(client, rid, params)
    client.log_artifact(rid, str(save_resolved(cfg, run_dir)))
    client.log_dict(rid, result_fields(cfg), IDENTITY_ARTIFACT)
    cells_file = run_dir / "cells.json"
    write_json_atomic(cells_file, cells)
    client.log_artifact(rid, str(cells_file), CELLS_ARTIFACT)
    return rid


# ---------------------------------------------------------------------------------------------- children


def run_name(trial: Trial) -> str:
    """What varies first (MLflow cuts long names): 'arith/syn4 ramoe λ=1 band=0.375-0.625 top_k=2 [olmoe-world]'."""
    knobs = ""
    if trial.method == "ramoe":
        knobs = f" λ={trial.lam:g} band={trial.band_label()} top_k={trial.top_k}"
    elif trial.method == "steering":
        knobs = f" s={trial.strength:g} band={trial.band_label()} top_k={trial.top_k}"
    return f"{trial.task}/{trial.language} {trial.method}{knobs} [{trial.model}]"


def _trial_folder(record: dict) -> Path:
    return Path(record["folder"]) if record.get("folder") else Path(record["eval"]["path"]).parents[1]


def require_trial_folders(rows, needed_for: str) -> None:
    """Refuses, before it runs anything, to go on with children (rows of ``children``) whose trial folder (its
    trial.json, adapter and predictions: ``tags.ramoe.trial_dir``) is gone, naming how many, the first, and what
    needs them (``needed_for``). A sweep cannot redo a logged trial, so the remedy is to restore the folders."""
    gone = [r for r in rows if not (Path(str(r.get("tags.ramoe.trial_dir") or "")) / TRIAL_JSON).is_file()]
    if gone:
        first = gone[0]
        raise ConfigError(f"{len(gone)} of the {len(rows)} trials needed {needed_for} have no trial folder any more: "
                          f"{first.get('tags.ramoe.trial_dir')} (trial {first.get('tags.trial_key')}, MLflow run "
                          f"{first.get('run_id')}) has no {TRIAL_JSON}. Restore the sweep's trial folders (that one's parent "
                          "folder holds them all), or run the sweep afresh under another name")


def _child_tags(parent_id: str, trial: Trial, record: dict | None, trial_id: str) -> dict:
    return {"mlflow.parentRunId": parent_id, "ramoe.kind": "trial", "model": trial.model, "task": trial.task,
            "language": trial.language, "method": trial.method, "trial_key": trial.key,
            "trial_index": str(trial.index), "tune_trial_id": trial_id, "selected": "false",
            "ramoe.trial_dir": str(_trial_folder(record)) if record else "",
            # a training reused from the trial folder (a resumed sweep whose trial had finished training)
            "ramoe.reused_training": str(bool(record and record["train"].get("cached"))).lower(),
            REPLICATE_TAG: trial.replicate_of, SAME_AS_TAG: (record or {}).get("same_as", ""),
            "ramoe.adapter": str((record or {}).get("train", {}).get("adapter") or ""),
            **(environment_tags(record["env"]) if record and record.get("env") else {})}


def _child_params(trial: Trial, record: dict | None) -> dict:
    """The knobs (model/task/language also as params: MLflow's comparison plots take params and metrics,
    not tags), and for a finished trial its training facts. The rules are the parent's params (rule.*),
    the RISE mask is in trial.json: the comparison stays readable."""
    params = {"model": trial.model, "task": trial.task, "language": trial.language, "method": trial.method,
              "lam": trial.lam, "band": trial.band_label(), "top_k": trial.top_k,
              "strength": trial.strength if trial.strength is not None else "none",
              "seed": trial.seed if trial.seed is not None else "none"}
    if record is None:
        return {k: str(v) for k, v in params.items()}
    tr = record["train"]
    params.update({"lam_used": tr.get("lam_used"), "band_layers": tr.get("band_layers"),
                   "task_experts": json.dumps(tr.get("task_experts")), "n_ci": tr.get("n_ci"),
                   "n_train": tr.get("n_train"), "steps": tr.get("steps")})
    if tr.get("zero_stage") is not None:  # a trained trial: DeepSpeed's ZeRO stage (train_worker.zero_stage)
        params["zero_stage"] = tr["zero_stage"]
    return {k: str(v)[:6000] for k, v in params.items()}


def _child_metrics(trial: Trial, record: dict) -> list:
    """Validation numbers, training facts and timings at step 0, the training curves by step."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    lang, ev, tr = trial.language, record["eval"], record["train"]
    vals = {"val_acc": ev["accuracy"][lang], "val_acc_en": ev["accuracy"]["en"],
            "ci_proportion": record["cell"]["ci_proportion"], "n_val": ev["n"][lang]}
    vals.update({f"val_div_L{l}": v for l, v in zip(ev["moe_layers"], ev["divergence"][lang])})
    vals["stage12_recomputed"] = sum(not hit for hit in (tr.get("stage_cache") or {}).values())
    vals["base_passes_recomputed"] = int(tr.get("base_passes_recomputed") or 0)
    vals.update({k: v for k, v in (tr.get("final") or {}).items() if k in FINAL_METRICS and v is not None})
    vals.update({f"seconds_{k}": v for k, v in record["timing"].items() if v is not None})
    shared = record.get("shared_eval") or {}  # steering: every setting of the cell in one evaluation pass
    vals.update({f"eval_{k}": v for k, v in shared.items()})
    metrics = [Metric(k, float(v), now, 0) for k, v in vals.items()]
    for h in tr.get("history") or []:
        metrics += [Metric(f"train_{k}", float(h[k]), now, int(h["step"])) for k in CURVES if h.get(k) is not None]
    return metrics + _rung_metrics(tr.get("rungs") or [], now)


def _rung_metrics(rungs: list[dict], now: int) -> list:
    """ASHA's rung evaluations by step: rung_val_acc, rung_percent_trained."""
    from mlflow.entities import Metric

    return [Metric(f"rung_{k}", float(r[k]), now, int(r["step"])) for r in rungs for k in (asha.METRIC, asha.TIME_ATTR)]


def _ids(rows_parquet: Path, language: str) -> list[str]:
    import pandas as pd

    df = pd.read_parquet(rows_parquet, columns=["id", "language"])
    return sorted(str(i) for i in df[df.language == language].id)


def log_child(client, exp_id: str, parent_id: str, trial: Trial, *, record: dict | None, error: str | None,
              trial_id: str, task_source: str = "") -> str:
    """One trial as a child run: FINISHED with its record (trial.json) and its validation split as a
    dataset input, or FAILED with its error."""
    started = int(1000 * record["started"]) if record and record.get("started") else None
    run = client.create_run(exp_id, run_name=run_name(trial), tags=_child_tags(parent_id, trial, record, trial_id),
                            start_time=started)
    rid = run.info.run_id
    if record is None:
        client.set_tag(rid, "error", (error or "")[:5000])
        log_params(client, rid, _child_params(trial, None))
        client.set_terminated(rid, "FAILED")
        return rid
    log_params(client, rid, _child_params(trial, record))
    validation = Path(record["eval"]["path"]).parent / "rows.parquet"
    log_dataset(client, rid, task_source, trial.task, trial.language, "validation", _ids(validation, trial.language))
    metrics = _child_metrics(trial, record)
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i : i + 900])
    client.log_artifact(rid, str(_trial_folder(record) / TRIAL_JSON))
    end = started + int(1000 * record["timing"]["total"]) if started else None
    client.set_terminated(rid, "FINISHED", end_time=end)
    return rid


def twin_record(record: dict, twin: Trial, trial_json: Path) -> dict:
    """A twin's record, written as trial.json in its own folder next to the trial's (``trial_json``): the trial's
    record under the twin's spec, ``same_as`` the trial's key, its timings 0 (it ran nothing)."""
    folder = trial_json.parent.parent / twin.dir
    folder.mkdir(parents=True, exist_ok=True)
    out = {**record, "spec": {**record["spec"], **dataclasses.asdict(twin)}, "same_as": record["spec"]["key"],
           "folder": str(folder), "timing": {k: 0.0 for k in record["timing"]},  # it cost nothing more
           "phases": {k: 0.0 for k in record.get("phases") or {}}, "train": {**record["train"], "base_passes_recomputed": 0}}
    write_json_atomic(folder / TRIAL_JSON, out)
    return out


STOPPED_TAG = "stopped"  # "true" on a child that ASHA stopped at a rung (sweep.scheduler: asha)
STOPPED_METRICS = (asha.METRIC, asha.TIME_ATTR, "step", "n_val", "rung_seconds", "seconds_in_loop")


def log_stopped(client, exp_id: str, parent_id: str, trial: Trial, last: dict, *, trial_id: str) -> str:
    """A trial that ASHA stopped: a FINISHED child (it ended as its scheduler decided; a resumed sweep does not
    rerun it) tagged ``stopped`` (and ``ramoe.stopped_at``, percent trained), with its last rung's metrics
    at that rung's step."""
    from mlflow.entities import Metric

    tags = {**_child_tags(parent_id, trial, None, trial_id), STOPPED_TAG: "true",
            "ramoe.stopped_at": f"{last[asha.TIME_ATTR]:g}"}
    rid = client.create_run(exp_id, run_name=run_name(trial) + " (stopped)", tags=tags).info.run_id
    log_params(client, rid, _child_params(trial, None))
    now, step = int(time.time() * 1000), int(last.get("step") or 0)
    rungs = json.loads(last.get("rung_history") or "[]")
    client.log_batch(rid, metrics=[Metric(k, float(last[k]), now, step) for k in STOPPED_METRICS
                                   if last.get(k) is not None] + _rung_metrics(rungs, now))
    client.set_terminated(rid, "FINISHED")
    return rid


def tagged_rows(df, tag: str):
    """The rows of ``children`` whose tag ``tag`` is set (not empty; all False when the column is absent)."""
    col = f"tags.{tag}"
    return df[col].fillna("").astype(str).ne("") if col in df else df.status.ne(df.status)


def stopped_rows(df):
    """The rows of ``children`` that ASHA stopped (all False when the column is absent)."""
    col = f"tags.{STOPPED_TAG}"
    return df[col].fillna("").astype(str).eq("true") if col in df else df.status.ne(df.status)


def twin_rows(df):
    """The rows of ``children`` that are twins (``grid.twins``: they carry another trial's results)."""
    return tagged_rows(df, SAME_AS_TAG)


# ---------------------------------------------------------------------------------------------- Tune callback


console = None  # the sweep's console while library output goes to its log file (sweep._library_output_to)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class ChildLogger:
    """Logs each Tune trial as an MLflow child run as it ends (driver side) and prints a progress line.
    Tune pickles its callbacks with the experiment state: this holds only plain values (the MLflow client
    is made on first use, progress goes to print looked up at call time)."""

    def __init__(self, uri: str, exp_id: str, parent_id: str, total: int, done_before: int,
                 task_sources: dict[str, str] | None = None, twins: dict[str, list[Trial]] | None = None):
        self.uri, self.exp_id, self.parent_id, self.total, self.done_before = uri, exp_id, parent_id, total, done_before
        self.task_sources = task_sources or {}
        self.twins = {k: [dataclasses.asdict(t) for t in v] for k, v in (twins or {}).items()}  # grid.twins
        self.finished, self.failed, self.stopped, self.twins_logged, self._client = 0, 0, 0, 0, None
        self.t0 = time.time()

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.uri)
        return self._client

    def _line(self, trial: Trial, text: str) -> None:
        """One line per ended trial, led by the progress: done / total, failed, elapsed, ETA."""
        ran = self.finished + self.failed + self.stopped
        n, elapsed = self.done_before + ran, time.time() - self.t0
        eta = _clock(elapsed / ran * (self.total - n)) if ran else "?"
        failed = f" · {self.failed} failed" if self.failed else ""
        failed += f" · {self.stopped} stopped" if self.stopped else ""
        print(f"  [{n}/{self.total}{failed} · {_clock(elapsed)} · ETA {eta}] {trial.key}: {text}",
              file=console or sys.stdout, flush=True)

    def completed(self, tune_trial) -> None:
        """A Tune trial that ended: returned (each of its trial.json files is a record), stopped by ASHA at a
        rung (its last report is a rung's), or failed after all."""
        last = tune_trial.last_result or {}
        paths = (last.get("trial_jsons") or "").splitlines()
        if not paths and last.get(asha.TIME_ATTR) is not None and last.get(asha.METRIC) is not None:
            return self._stopped(Trial(**tune_trial.config["trials"][0]), tune_trial, last)
        if not paths or not all(Path(p).is_file() for p in paths):
            return self.errored(tune_trial)
        for d, path in zip(tune_trial.config["trials"], paths):
            trial, record = Trial(**d), json.loads(Path(path).read_text())
            self._finished(trial, record, tune_trial.trial_id)
            for twin in self._twins_of(trial):
                self._finished(twin, twin_record(record, twin, Path(path)), tune_trial.trial_id)

    def earlier_twins(self, twins: dict[str, list[Trial]], done) -> None:
        """Twins whose trial finished in an earlier run of this sweep (``done``: its FINISHED children, from
        ``children``), left unlogged when that run's driver died between logging the trial and its twins: logged
        now from the trial's child, as ``completed`` would have, nothing run."""
        rows = {key: done[done["tags.trial_key"] == key].iloc[0] for key in twins}
        require_trial_folders([r for r in rows.values() if r.get(f"tags.{STOPPED_TAG}") != "true"],
                              "to log their twins (a stopped trial's come from MLflow)")
        for key, group in twins.items():
            row = rows[key]
            self.twins_logged += len(group)
            tune_trial = types.SimpleNamespace(trial_id=row["tags.tune_trial_id"])
            if row.get(f"tags.{STOPPED_TAG}") == "true":
                last = self._last_rung(row)
                for twin in group:
                    self._stopped(twin, tune_trial, last, same_as=key)
                continue
            path = Path(row["tags.ramoe.trial_dir"]) / TRIAL_JSON
            record = json.loads(path.read_text())
            for twin in group:
                self._finished(twin, twin_record(record, twin, path), tune_trial.trial_id)

    def _last_rung(self, row) -> dict:
        """A stopped child's last rung as ASHA's report gave it (``log_stopped``'s metrics and rung history), with
        no time of its own (a twin's)."""
        last = {k: row.get(f"metrics.{k}") for k in STOPPED_METRICS}
        last = {k: v for k, v in last.items() if v is not None and v == v}  # (a metric it lacks is NaN here)
        hist = {k: self.client.get_metric_history(row["run_id"], f"rung_{k}") for k in (asha.METRIC, asha.TIME_ATTR)}
        rungs = [{"step": a.step, asha.METRIC: a.value, asha.TIME_ATTR: b.value}
                 for a, b in zip(*(sorted(h, key=lambda m: m.step) for h in hist.values()))]
        return {**last, "rung_seconds": 0.0, "seconds_in_loop": 0.0, "rung_history": json.dumps(rungs)}

    def _twins_of(self, trial: Trial) -> list[Trial]:
        twins = [Trial(**d) for d in self.twins.get(trial.key, [])]
        self.twins_logged += len(twins)
        return twins

    def _finished(self, trial: Trial, record: dict, trial_id: str) -> None:
        log_child(self.client, self.exp_id, self.parent_id, trial, record=record, error=None, trial_id=trial_id,
                  task_source=self.task_sources.get(trial.task, ""))
        self.finished += 1
        ev, tm, lang = record["eval"], record["timing"], trial.language
        said = f"val acc {100 * ev['accuracy'][lang]:.1f}% (en {100 * ev['accuracy']['en']:.1f}%), "
        if record.get("same_as"):
            return self._line(trial, said + f"the same computation as {record['same_as']} (its results)")
        self._line(trial, said + f"{tm['total']:.1f} s ({tm['in_loop']:.1f} s in the training loop)")

    def _stopped(self, trial: Trial, tune_trial, last: dict, same_as: str = "") -> None:
        """ASHA stopped it at a rung: a FINISHED child tagged ``stopped`` with the rung's metrics (never selected);
        its twins too."""
        rid = log_stopped(self.client, self.exp_id, self.parent_id, trial, last, trial_id=tune_trial.trial_id)
        if same_as:
            self.client.set_tag(rid, SAME_AS_TAG, same_as)
        self.stopped += 1
        self._line(trial, f"stopped by ASHA at {last[asha.TIME_ATTR]:g} % of its steps (step {last.get('step')}): "
                          f"val acc {100 * last[asha.METRIC]:.1f}%" + (f" (as {same_as})" if same_as else ""))
        for twin in [] if same_as else self._twins_of(trial):  # its rung's numbers, no time of its own
            self._stopped(twin, tune_trial, {**last, "rung_seconds": 0.0, "seconds_in_loop": 0.0}, same_as=trial.key)

    def errored(self, tune_trial) -> None:
        """A Tune trial that raised: a FAILED child per trial it ran, with Tune's error file (or its pickled error)."""
        for d in tune_trial.config["trials"]:
            self._failed(Trial(**d), tune_trial)
            for twin in self._twins_of(Trial(**d)):
                self._failed(twin, tune_trial, same_as=d["key"])

    def _failed(self, trial: Trial, tune_trial, same_as: str = "") -> None:
        err = ""
        if getattr(tune_trial, "error_file", None) and Path(tune_trial.error_file).is_file():
            err = Path(tune_trial.error_file).read_text()
        elif tune_trial.get_pickled_error() is not None:
            err = repr(tune_trial.get_pickled_error())
        rid = log_child(self.client, self.exp_id, self.parent_id, trial, record=None, error=err or "unknown error",
                        trial_id=tune_trial.trial_id)
        if same_as:
            self.client.set_tag(rid, SAME_AS_TAG, same_as)
        self.failed += 1
        last = [l for l in err.strip().splitlines() if l.strip()][-1:] or ["unknown error"]
        self._line(trial, f"FAILED: {last[0][:200]}")
        print(err.rstrip(), file=console or sys.stderr, flush=True)  # the error in full, on the console


def tune_callback(logger: ChildLogger):
    """A Ray Tune callback that hands each ended trial to ``logger``."""
    from ray.tune import Callback

    class MlflowChildren(Callback):
        def __init__(self):
            self.logger = logger

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.logger.completed(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.logger.errored(trial)

    return MlflowChildren()
