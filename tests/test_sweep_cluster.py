"""The sweep as a Ray job on a real cluster: ``ray start --head`` on localhost (token authentication on,
the Ray >= 2.52 default), ``ray job submit`` of a tiny sweep (the reduced synthetic world, one cell x the
four methods, 6 trials), ``ray job stop`` once a trial has finished, ``ray job submit`` of the resume command
the sweep printed, wait for SUCCEEDED, then the MLflow database (sqlite) holds one parent run with one child
per trial, each with its metrics; the cluster is torn down at the end, whatever happens. (One session, not
an uninterrupted job and a stopped one: the resumed job ends where an uninterrupted one does, and each
cluster sweep costs minutes of this suite.)

No mocks: the real ``ray`` CLI, the Jobs API, Ray Tune / Train in the job and MLflow's sqlite store.

Teardown does not use ``ray stop``: it kills every Ray process of the machine (ray/scripts/scripts.py
``stop`` matches processes by name, whoever started them), including any other Ray instance running
beside the tests. The cluster runs instead under ``ray start --block`` in a session of its own, and
teardown ends exactly the processes of that session / process tree, by pid, then checks that none is
left and that the cluster's ports are closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_sweep import _finished

from ramoe_ray import grid
from ramoe_ray.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = (REPO / ".venv" / "bin") if (REPO / ".venv" / "bin" / "ray").exists() else Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
JOB_TIMEOUT_S = 420  # the sweep takes ~35 s on an idle 2-core machine, minutes when it is busy
START_TIMEOUT_S = 120
AGENT_TIMEOUT_S = 60  # the Jobs API answers before the head's dashboard agent registers
# what the Jobs API must not upload as the job's working dir (environments, caches, run outputs)
EXCLUDES = [".venv", "venv", ".ramoe_cache", ".cache", "runs", ".git", "mlruns", "mlartifacts", ".scratch", ".whl",
            ".gl", ".pytest_cache", "**/__pycache__", "*.egg-info", "*.db", "*.sqlite", "*.safetensors", "*.pt"]
TRAINED = ("sft", "rise", "ramoe")  # steering trains nothing: no routing KL after training


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(text: str, n: int = 12000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


class Cluster:
    """A one-node Ray cluster started by ``ray start --head --block`` (its own session), token auth on."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's socket paths (TEMP/session_DATE_PID/sockets/plasma_store) must stay under 107 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        (self.gcs_port, self.dashboard_port, self.client_port, self.node_manager_port, self.object_manager_port,
         self.agent_listen_port, self.agent_grpc_port, self.runtime_env_agent_port,
         self.metrics_port) = _free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        self.token_path = root / "auth_token"
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RAY_") and k not in ("PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")}
        env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            # token authentication, the token from a file readable by this user only (not on any command line)
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # the node's environment (what a cluster's node image sets): offline hub, and DeepSpeed's compiled
            # CPU ops from the repo's cache (otherwise compiled again inside the uploaded working dir)
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(REPO / ".ramoe_cache" / "torch_extensions")),
        })
        self.env = env
        self.log = root / "ray_start.log"
        self.proc: subprocess.Popen | None = None

    # ---------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(300 * 1024 ** 2),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(self.client_port),
               "--node-manager-port", str(self.node_manager_port),
               "--object-manager-port", str(self.object_manager_port),
               "--dashboard-agent-listen-port", str(self.agent_listen_port),
               "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
               "--runtime-env-agent-port", str(self.runtime_env_agent_port),
               "--metrics-export-port", str(self.metrics_port),
               "--min-worker-port", "0", "--max-worker-port", "0",
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"`ray start` exited with {self.proc.returncode}:\n{self.start_log()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self._get("/api/version", auth=True)[0] == 200:
                    return
            time.sleep(1.0)
        raise AssertionError(f"the Jobs API at {self.address} did not answer in {START_TIMEOUT_S} s:\n{self.start_log()}")

    def start_log(self) -> str:
        return _tail(self.log.read_text(errors="replace")) if self.log.exists() else ""

    def processes(self) -> list:
        """Every live process of this cluster: the `ray start` process, its descendants, and anything else in
        its session (a process whose parent died is re-parented but keeps the session)."""
        import psutil

        if self.proc is None:
            return []
        sid = self.proc.pid  # start_new_session: the session id is the `ray start` pid
        found = {}
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(self.proc.pid)
            found[p.pid] = p
            for c in p.children(recursive=True):
                found[c.pid] = c
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == sid:
                    found[p.pid] = p
        return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> list[str]:
        """Ends this cluster's processes (SIGTERM, then SIGKILL after a grace period); returns what is left."""
        import psutil

        if self.proc is None:
            return []
        procs = self.processes()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        procs = {p.pid: p for p in procs + self.processes()}.values()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(procs), timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self.processes()]
        return left

    # ---------------------------------------------------------------------------------------- the Jobs API

    def _get(self, path: str, *, auth: bool) -> tuple[int, str]:
        req = urllib.request.Request(self.address + path)
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # the token as the Authorization header: this test process itself runs without RAY_AUTH_MODE
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user runs it: RAY_AUTH_MODE=token, the token from RAY_AUTH_TOKEN_PATH."""
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, runtime_env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit --no-wait`, tried again while the head's dashboard agent has not registered yet: the
        Jobs API answers before it does, with a 500 "No available agent ... please try again later"."""
        deadline = time.time() + AGENT_TIMEOUT_S
        while True:
            sub = self.ray_cli("job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait",
                               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
                               "--", *entrypoint)
            if sub.returncode == 0 or "No available agent" not in sub.stderr or time.time() > deadline:
                return sub
            time.sleep(2.0)


@pytest.fixture
def ray_cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        ports = [p for p in (cluster.gcs_port, cluster.dashboard_port, cluster.client_port) if _listening(p)]
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive after teardown: {left}"
        assert not ports, f"ports of the test cluster still open after teardown: {ports}"


def tiny_sweep(tmp_path: Path, cache: Path) -> Path:
    """One cell of the reduced synthetic world (olmoe x category x syn3) x the four methods, RA-MoE at three
    lambdas: 6 trials, time to stop the job in the middle."""
    cfg = {
        "name": "tiny",
        "models": [{"name": "m", "family": "olmoe", "path": "synthetic-small:olmoe"}],
        "tasks": [{"name": "category", "format": "multiple_choice", "source": "synthetic-small:category"}],
        "languages": ["syn3"],
        "methods": ["sft", "steering", "rise", "ramoe"],
        "knobs": {"lambdas": [1.0, 5.0, 10.0], "bands": [[0.25, 1.0]], "top_k": [1]},
        "training": {"lr": 5.0e-3, "batch_size": 12, "epochs": 1, "lora_rank": 4, "lora_alpha": 8, "max_steps": 4},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "inference_actors": 0},
        "sweep": {"train_workers": 0},
        "cache_dir": str(cache.resolve()),
        "output_dir": str((tmp_path / "runs").resolve()),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def wait_for(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(2.0)
    return f"TIMEOUT (still {status.value if status else None} after {timeout:.0f} s)"


def _parent(db: Path):
    from mlflow.tracking import MlflowClient

    if not db.is_file():
        return None, []
    ml = MlflowClient(f"sqlite:///{db}")
    exp = ml.get_experiment_by_name("ramoe")
    runs = ml.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r for r in runs if r.data.tags.get("ramoe.kind") == "sweep"]
    kids = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return (parents[0] if parents else None), kids


def _submit(cluster, job_id: str, config: Path, *extra: str) -> None:
    # HF_HUB_OFFLINE is also one of the variables inference.ensure_ray passes to ray.init: Ray refuses a key set
    # by both the job and the driver ("Failed to merge the Job's runtime env ... because of a conflict")
    # unless the driver leaves the job's keys out, which these submissions check
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"RAMOE_TEST_JOB": job_id, "HF_HUB_OFFLINE": "1"}}
    sub = cluster.submit(job_id, runtime_env, "python", "-m", "ramoe_ray.cli", "sweep", str(config), *extra)
    assert sub.returncode == 0, f"`ray job submit` failed ({sub.returncode}):\n{sub.stdout}\n{sub.stderr}"


def _stopped_after_a_trial(cluster, job: str, config: Path, db: Path, expected: int) -> int:
    """``ray job stop`` once a trial has finished: the job ends STOPPED, its parent run KILLED, the resume
    command printed (with the job's override). Returns the trials finished by then."""
    client = cluster.client()
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:
        if _finished(db) >= 1:  # read-only sqlite3: an MlflowClient would race the job creating the tables
            break
        assert str(client.get_job_status(job).value) in ("PENDING", "RUNNING"), client.get_job_logs(job)[-5000:]
        time.sleep(1.0)
    stop = cluster.ray_cli("job", "stop", "--address", cluster.address, job, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_for(client, job, 120) == "STOPPED"
    parent, kids = _parent(db)
    finished = sum(k.info.status == "FINISHED" for k in kids)
    assert parent.info.status == "KILLED", client.get_job_logs(job)[-5000:]
    assert 1 <= finished < expected
    logs = client.get_job_logs(job)
    hint = f"ramoe sweep {config} --resume training.log_every=2"
    assert "SIGTERM: stopping the sweep" in logs and hint in logs, _tail(logs)
    return finished


def test_a_sweep_as_a_ray_job_stopped_and_resumed_by_the_printed_command(ray_cluster, cache_dir, tmp_path):
    """One user session on a cluster: submit a sweep, ``ray job stop`` it in the middle, submit the resume
    command it printed; the second job joins the cluster, continues the same parent run and finishes it, and
    MLflow then holds what an uninterrupted sweep leaves: one parent, one child per trial with its metrics,
    one selected child per method with its test metrics, and the parent's artefacts."""
    from mlflow.tracking import MlflowClient

    config = tiny_sweep(tmp_path, cache_dir)
    cfg = load_config(config, [])
    expected = len(grid.trials(cfg))
    assert expected == 6
    db = Path(cfg.output_dir) / cfg.name / "mlflow.db"

    # token authentication is on: the Jobs API refuses a request without the token
    status, _ = ray_cluster._get("/api/jobs/", auth=False)
    assert status in (401, 403), f"the Jobs API answered {status} to a request without a token"

    job = f"ramoe-stop-{secrets.token_hex(4)}"
    _submit(ray_cluster, job, config, "training.log_every=2")  # an override: the printed command must carry it
    finished = _stopped_after_a_trial(ray_cluster, job, config, db, expected)
    parent, _ = _parent(db)

    again = f"ramoe-resume-{secrets.token_hex(4)}"
    _submit(ray_cluster, again, config, "--resume", "training.log_every=2")
    client = ray_cluster.client()
    final = wait_for(client, again, JOB_TIMEOUT_S)
    logs = client.get_job_logs(again)
    if final.startswith("TIMEOUT"):
        ray_cluster.ray_cli("job", "stop", "--address", ray_cluster.address, again, timeout=60)
    assert final == "SUCCEEDED", f"job {again}: {final}\n--- ray job logs ---\n{_tail(logs)}"
    assert f"{finished} trials already finished, {expected - finished} to run" in logs, _tail(logs)
    # the job's driver joined this cluster (RAY_ADDRESS set by the job manager), it started no Ray of its own
    # (Ray's own lines are in the run folder's sweep.log: the console keeps the sweep's lines)
    library = (Path(cfg.output_dir) / cfg.name / "sweep.log").read_text(errors="replace")
    joined = [l for l in library.splitlines() if "Connecting to existing Ray cluster at address:" in l]
    assert joined and f":{ray_cluster.gcs_port}" in joined[-1], _tail(library)
    assert "Started a local Ray instance" not in library + logs, _tail(library)
    # the sweep's final line: every trial finished, none failed, stages 1-2 read from the driver's cache
    assert f"{expected} of {expected} trials finished (0 failed this run)" in logs, _tail(logs)
    assert "recomputed in trials 0 times" in logs, _tail(logs)
    # the CLI a user runs reads the same logs, authenticated by the token file
    cli_logs = ray_cluster.ray_cli("job", "logs", "--address", ray_cluster.address, again)
    assert cli_logs.returncode == 0 and "trials finished" in cli_logs.stdout, cli_logs.stderr

    # ---- MLflow: the same parent, finished, one child per trial, each with its metrics
    ml = MlflowClient(f"sqlite:///{db}")
    exp = ml.get_experiment_by_name(cfg.tracking.experiment)
    runs = ml.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("ramoe.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == parent.info.run_id, [r.data.tags for r in parents]
    pid = parent.info.run_id
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags.get("ramoe.sweep") == "tiny"
    assert parents[0].data.tags.get("ramoe.expected_trials") == str(expected)
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert len(kids) == expected == len(runs) - 1
    assert sorted(r.data.tags["trial_key"] for r in kids) == sorted(t.key for t in grid.trials(cfg))
    by_method: dict[str, list] = {}
    for r in kids:
        tags, m = r.data.tags, r.data.metrics
        where = f"child {r.info.run_id} ({tags.get('trial_key')})"
        assert r.info.status == "FINISHED", (where, r.info.status, tags.get("error"))
        assert (tags.get("model"), tags.get("task"), tags.get("language")) == ("m", "category", "syn3"), where
        for k in ("val_acc", "val_acc_en", "ci_proportion"):
            assert k in m and 0.0 <= m[k] <= 1.0, (where, k, m.get(k))
        if tags["method"] in TRAINED:
            for k in ("routing_kl_ci", "routing_kl_ci_base"):
                assert k in m and m[k] >= 0.0 and m[k] == m[k], (where, k, m.get(k))
        by_method.setdefault(tags["method"], []).append(r)
    assert sorted(by_method) == sorted(cfg.methods)

    # selection: exactly one child per (cell, method) selected, and only it evaluated on the test split
    for method, rs in by_method.items():
        selected = [r for r in rs if r.data.tags.get("selected") == "true"]
        assert len(selected) == 1, (method, [r.data.tags.get("selected") for r in rs])
        assert 0.0 <= selected[0].data.metrics.get("test_acc", -1.0) <= 1.0, (method, selected[0].data.metrics)
        for r in rs:
            if r is not selected[0]:
                assert "test_acc" not in r.data.metrics, (method, r.info.run_id)

    # the parent's artefacts: cells.json (stages 1-2) and the report the CLI wrote after the sweep
    arts = {a.path for a in ml.list_artifacts(pid, "cells")} | {a.path for a in ml.list_artifacts(pid, "report")}
    assert {"cells/cells.json", "report/report.md"} <= arts, sorted(arts)
    local = Path(ml.download_artifacts(pid, "cells/cells.json", str(tmp_path / "dl")))
    assert len(json.loads(local.read_text())) == 1
