"""No secret is ever shown or stored (issue 14, item 5): credentials in a tracking URI move to MLflow's
own environment variables at validation, so nothing downstream (files, MLflow, Tune, console) sees them."""

import os
import socket

import pytest
import yaml

from ramoe_ray import cli, sweep
from ramoe_ray.config import ConfigError, config_from_dict, load_config, redact, save_resolved

SECRET = "s3cr3t-pw-7f3a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base(uri: str) -> dict:
    return dict(name="s", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
                tasks=[dict(name="t", format="generative_numeric", source="synthetic-small:arith")],
                languages=["syn3"], tracking=dict(mlflow_uri=uri))


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_credentials_move_from_the_uri_to_mlflows_environment(clean_env, tmp_path):
    cfg = config_from_dict(_base(f"http://alice:{SECRET}@127.0.0.1:5000/prefix"))
    assert cfg.tracking.mlflow_uri == cfg.mlflow_uri == "http://127.0.0.1:5000/prefix"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    assert SECRET not in cfg.model_dump_json()
    assert SECRET not in save_resolved(cfg, tmp_path).read_text()
    # percent-encoded characters arrive decoded, as the server expects them
    config_from_dict(_base("https://bob:p%40ss%3Aword@mlflow.example.org"))
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss:word"


def test_a_secret_in_the_query_is_refused_without_being_shown(clean_env):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_base(f"https://mlflow.example.org/?access_token={SECRET}"))
    assert SECRET not in str(e.value) and "MLFLOW_TRACKING_TOKEN" in str(e.value) and "access_token=***" in str(e.value)


def test_an_error_elsewhere_never_echoes_the_uri_with_its_credentials(clean_env):
    d = _base(f"http://alice:{SECRET}@127.0.0.1:5000")
    d["models"] = d["models"] * 2  # a whole-config error: pydantic's input is the whole mapping
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert "unique" in str(e.value) and SECRET not in str(e.value)
    d = _base(f"http://alice:{SECRET}@127.0.0.1:5000")
    d["tracking"] = f"http://alice:{SECRET}@127.0.0.1:5000"  # a section given as a string
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert "tracking" in str(e.value) and SECRET not in str(e.value)


def test_an_unreachable_server_error_names_the_uri_without_its_credentials(clean_env, tmp_path, capsys):
    uri = f"http://alice:{SECRET}@127.0.0.1:{_free_port()}"
    cfg = config_from_dict(_base(uri))
    with pytest.raises(ConfigError) as e:
        sweep.check_tracking(cfg)
    assert "cannot be reached" in str(e.value) and SECRET not in str(e.value)
    # the same through the command line, the URI given as an override
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in _base(uri).items() if k != "tracking"}))
    assert cli.main(["sweep", str(path), f"tracking.mlflow_uri={uri}"]) == 2
    out = capsys.readouterr()
    assert "cannot be reached" in out.err and SECRET not in out.out + out.err
    assert load_config(path, [f"tracking.mlflow_uri={uri}"]).tracking.mlflow_uri.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("text, shown", [
    (f"http://alice:{SECRET}@h:5000/x", "http://***@h:5000/x"),
    (f"uri 'https://{SECRET}@h' failed", "uri 'https://***@h' failed"),
    (f"https://h/api?token={SECRET}&run=1", "https://h/api?token=***&run=1"),
    (f"databricks://h?password={SECRET}", "databricks://h?password=***"),
    ("http://127.0.0.1:5000/api?run_id=1", "http://127.0.0.1:5000/api?run_id=1"),
])
def test_redact(text, shown):
    assert redact(text) == shown


# ------------------------------------------------------------------------------------------ end to end


def _mlflow_server(root, port: int):
    import subprocess
    import sys
    import time
    import urllib.request

    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("the MLflow server did not start:\n" + (root / "server.log").read_text())


def _files_holding(root, secret: bytes) -> list[str]:
    hits = []
    for folder, _, files in os.walk(root):  # symlinks (the linked world) are not followed
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and secret in open(path, "rb").read():
                hits.append(path)
    return hits


@pytest.mark.slow
def test_a_sweep_with_a_secret_in_its_tracking_uri_writes_it_nowhere(clean_env, shared_cache, tmp_path, capfd):
    import signal

    from test_sweep import sweep_dict

    from ramoe_ray import tracking

    server = tmp_path / "server"
    server.mkdir()
    port = _free_port()
    proc, log = _mlflow_server(server, port)
    try:
        out = tmp_path / "runs"
        d = sweep_dict(shared_cache, out, methods=["sft", "ramoe"], languages=["syn2"])
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(d))
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        rc = cli.main(["sweep", str(path), f"tracking.mlflow_uri={uri}"])
        console = capfd.readouterr()
        assert rc == 0, console.out[-3000:] + console.err[-3000:]
        assert "trials finished" in console.out
        client = tracking.mlflow_client(f"http://127.0.0.1:{port}")
        runs = client.search_runs([client.get_experiment_by_name("ramoe").experiment_id])
        assert len(runs) == 3  # the parent and its two trials, logged through the server
        for run in runs:
            assert SECRET not in repr(run.data.params) + repr(run.data.tags)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
    secret = SECRET.encode()
    assert SECRET not in console.out + console.err
    assert _files_holding(out, secret) == []  # run folder: config, Tune's state, trial folders, report
    assert _files_holding(shared_cache, secret) == []
    assert _files_holding(server / "artifacts", secret) == []
    assert secret not in (server / "db.sqlite").read_bytes()  # params, tags, metrics
