"""A run's identity is everything that determines its result (issue 14, item 1): no stale result is
returned for changed settings, a sweep's resume names what changed, a parent left RUNNING is told
from a live sweep."""

import os
import socket

import pytest
import yaml
from conftest import small_config
from test_train import BAND, TOP_K, cfg_for

from ramoe_ray import cli, grid, sweep, tracking, train
from ramoe_ray.config import NON_RESULT, ConfigError, config_from_dict, flatten, result_fields

LANG = "syn3"

BASE = dict(name="s", models=[dict(name="m", family="olmoe", path="/models/m")],
            tasks=[dict(name="t", format="generative_numeric", source="/data/t")], languages=["de"])


def _cfg(**changes):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        node = d
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return config_from_dict(d)


# ------------------------------------------------------------------------------------------ the sweep


@pytest.mark.parametrize("field, value", [
    ("sweep.train_workers", 2), ("resources.num_workers", 2), ("resources.gpus_per_worker", 1.0),
    ("training.lr", 1e-5), ("training.max_steps", 5), ("training.epochs", 3), ("training.batch_size", 4),
    ("training.seeds", [1]), ("training.log_every", 1), ("knobs.top_k", [1]), ("rise.budget", 3),
    ("steering.strengths", [1.0]), ("methods", ["sft"]),
])
def test_every_setting_that_changes_a_result_changes_the_sweeps_identity(field, value):
    assert grid.config_hash(_cfg(**{field: value})) != grid.config_hash(_cfg())


@pytest.mark.parametrize("field, value", [
    ("name", "other"), ("tracking.experiment", "x"), ("output_dir", "elsewhere"), ("cache_dir", "/c"),
    ("sweep.max_concurrent_trials", 3), ("sweep.trial_cpus", 1.0), ("sweep.storage_path", "/shared/tune"),
    ("resources.cpus_per_worker", 4.0), ("resources.inference_actors", 3), ("training.eval_batch_size", 7),
    ("training.checkpoint_every", 9), ("training.max_failures", 0),
])
def test_where_it_runs_and_logs_is_left_out_and_named(field, value):
    assert any(field == n or field.startswith(n + ".") for n in NON_RESULT)
    assert grid.config_hash(_cfg(**{field: value})) == grid.config_hash(_cfg())


def test_result_fields_leave_out_exactly_the_named_fields():
    every = flatten(_cfg().model_dump(mode="json"))
    kept = result_fields(_cfg())
    left = set(every) - set(kept)
    assert left and all(any(k == n or k.startswith(n + ".") for n in NON_RESULT) for k in left)
    assert {"sweep.train_workers", "resources.num_workers", "training.lr", "models"} <= set(kept)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_resume_names_the_changed_settings_and_tells_a_stopped_driver_from_a_live_one(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.mlflow_client(uri)
    exp = tracking.experiment_id(client, "ramoe", tmp_path / "artifacts")
    cfg = _cfg()
    parent = tracking.start_parent(client, exp, cfg, params={}, n_trials=1, cells=[], run_dir=tmp_path / "run")
    # this process drives it: a second driver is refused
    with pytest.raises(ConfigError, match="its driver .* is still running"):
        sweep._resumed_parent(client, exp, cfg, uri)
    # the driver was killed hard (kill -9): the parent stays RUNNING, and the resume says so
    client.set_tag(parent, tracking.DRIVER_TAG, f"{_dead_pid()}@{socket.gethostname()}")
    said = []
    assert sweep._resumed_parent(client, exp, cfg, uri, log=said.append) == parent
    assert "left RUNNING by a stopped driver" in said[0] and parent in said[0]
    state, text = tracking.driver_state(client.get_run(parent))
    assert state == "stopped"
    # `ramoe report` says it too, in the report and on the console
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "tracking": {"mlflow_uri": uri}}))
    assert cli.main(["report", str(path), "--sweep", parent, "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr()
    assert "left RUNNING by a stopped driver" in out.err
    assert "left RUNNING by a stopped driver" in (tmp_path / "report" / "report.md").read_text()
    # another host's driver cannot be checked: said so
    client.set_tag(parent, tracking.DRIVER_TAG, "12@another-host")
    assert tracking.driver_state(client.get_run(parent))[0] == "unknown"
    # changed settings are refused, each named with its old and new value
    changed = _cfg(**{"sweep.train_workers": 2, "training.lr": 1e-5})
    with pytest.raises(ConfigError) as e:
        sweep._resumed_parent(client, exp, changed, uri)
    assert "sweep.train_workers: None -> 2" in str(e.value) and "training.lr: 0.0002 -> 1e-05" in str(e.value)
    assert "training.seed" not in str(e.value)
    # a setting that changes no result resumes
    assert sweep._resumed_parent(client, exp, _cfg(**{"sweep.max_concurrent_trials": 4}), uri, log=said.append) == parent


# ------------------------------------------------------------------------------------------ a training


def _fit(cfg, **kw):
    return train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="sft", band=BAND, top_k=TOP_K,
                            num_workers=0, **kw)


@pytest.mark.slow
def test_a_changed_setting_never_returns_an_older_training(shared_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run folders: runs/ramoe/train/<name>
    first = _fit(cfg_for(shared_cache, max_steps=4))
    assert not first.get("cached") and first["steps"] == 4
    changed = _fit(cfg_for(shared_cache, max_steps=2, lr=1e-5))
    assert not changed.get("cached"), "a training with another lr and max_steps came back from the first one's folder"
    assert changed["steps"] == 2 and [h["step"] for h in changed["history"]] == [1, 2]
    assert changed["run_dir"] != first["run_dir"]
    capsys.readouterr()
    again = _fit(cfg_for(shared_cache, max_steps=4))  # the same settings: reused, and said so
    assert again["cached"] and again["history"] == first["history"] and again["run_dir"] == first["run_dir"]
    assert f"reusing the finished training in {first['run_dir']}" in capsys.readouterr().out
    # an explicit run folder that holds another training is refused, naming what differs
    with pytest.raises(ConfigError, match=r"training\.lr: 0\.005 -> 1e-05.*training\.max_steps: 4 -> 2"):
        _fit(cfg_for(shared_cache, max_steps=2, lr=1e-5), run_dir=first["run_dir"])
    other_language = small_config(shared_cache, task="category", languages=("syn2",),
                                  resources=dict(inference_actors=0, cpus_per_worker=0.5),
                                  training=cfg_for(shared_cache, max_steps=4).training.model_dump())
    with pytest.raises(ConfigError, match="language: 'syn3' -> 'syn2'"):
        train.train_cell(other_language, other_language.models[0], other_language.tasks[0], "syn2", method="sft",
                         band=BAND, top_k=TOP_K, num_workers=0, run_dir=first["run_dir"])
    with pytest.raises(ConfigError, match="workers: 0 -> 2"):  # the worker count sets the global batch
        cfg = cfg_for(shared_cache, max_steps=4)
        train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="sft", band=BAND, top_k=TOP_K,
                         num_workers=2, run_dir=first["run_dir"])


def test_the_printed_resume_command_carries_every_override(monkeypatch):
    monkeypatch.delenv("RAMOE_RESUME_COMMAND", raising=False)
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "my sweeps/c.yaml", "training.lr=1e-4", "name=run 2"])
    assert cli.resume_command(args) == "ramoe sweep 'my sweeps/c.yaml' --resume training.lr=1e-4 'name=run 2'"
    assert cli.resume_command(parser.parse_args(["demo", cli.DEMO_CONFIG, "knobs.top_k=[1]"])) == \
        "ramoe demo --resume 'knobs.top_k=[1]'"
    monkeypatch.setenv("RAMOE_RESUME_COMMAND", "CONFIG=sweeps/paper.yaml cluster/submit.sh --resume")
    assert cli.resume_command(args) == "CONFIG=sweeps/paper.yaml cluster/submit.sh --resume"
