"""The configs and cluster files the project ships.

- every sweeps/*.yaml passes both validation passes (the real models' sizes stand in for their hub
  configs where the hub is out of reach), and the trial count its header states is the grid's;
- sweeps/paper.yaml names real families, languages that every one of its task sources has, hub
  sources the loader resolves as hub datasets, and a GPU resource plan the cluster files can hold;
- cluster/: the RayJob and the launcher config parse (the launcher's against Ray's own schema), agree
  with each other and with paper.yaml, keep the Ray ports private and authentication on, and
  cluster/submit.sh refuses to run without its settings and submits exactly the intended job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ramoe_ray import grid, memory, sources, sweep, trial
from ramoe_ray import models as M
from ramoe_ray import synthetic as S
from ramoe_ray import tasks as T
from ramoe_ray.config import ConfigError, TaskConfig, load_config, parse_override, resolve_band

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
CLUSTER = REPO / "cluster"
SUBMIT = CLUSTER / "submit.sh"
PAPER = REPO / "sweeps" / "paper.yaml"
GRID = REPO / "sweeps" / "synthetic-grid.yaml"
MGSM_DIR = REPO.parent / "shared" / "data" / "mgsm"  # MGSM as published (tsv per language)

# The language configs of CohereLabs/Global-MMLU (42, English included; no Thai). tasks.py has no such
# table: the loader passes the language code to the hub as the dataset config.
GLOBAL_MMLU_LANGUAGES = set(
    "am ar bn cs de el en es fa fil fr ha he hi id ig it ja ko ky lt mg ms ne nl ny pl pt ro ru si sn so sr "
    "sv sw te tr uk vi yo zh".split()
)

# The paper's models as published (the fields of their HF config.json that size them; the rest are
# transformers' defaults): OLMoE-1B-7B-0125, Qwen3-30B-A3B, gpt-oss-20b.
REAL_CONFIGS = {
    "allenai/OLMoE-1B-7B-0125": ("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, vocab_size=50304, max_position_embeddings=4096, tie_word_embeddings=False,
        norm_topk_prob=False, rope_theta=500000.0)),
    "Qwen/Qwen3-30B-A3B": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rope_theta=1000000.0)),
    "openai/gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
        tie_word_embeddings=False, attention_bias=True, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention"] * 12)),
}
# layers, experts, experts per token
REAL_SHAPES = {path: (fam, f["num_hidden_layers"], f.get("num_experts", f.get("num_local_experts")), f["num_experts_per_tok"])
               for path, (fam, f) in REAL_CONFIGS.items()}
GPUS_PER_NODE = 8  # p5.48xlarge in ray-cluster.yaml, nvidia.com/gpu: 8 in rayjob.yaml


def _hf_config(path: str):
    from transformers import GptOssConfig, OlmoeConfig, Qwen3MoeConfig

    family, fields = REAL_CONFIGS[path]
    return {"olmoe": OlmoeConfig, "qwen3_moe": Qwen3MoeConfig, "gpt_oss": GptOssConfig}[family](**fields)


@pytest.fixture
def real_model_configs(monkeypatch):
    """sources.check on the paper's hub models without the hub: their published sizes."""
    real = sources.model_hf_config

    def fake(model_cfg):
        return _hf_config(model_cfg.path) if model_cfg.path in REAL_SHAPES else real(model_cfg)

    monkeypatch.setattr(sources, "model_hf_config", fake)


def trials_by_cell(cfg) -> tuple[int, dict[str, int]]:
    """(cells, trials per cell by method) of the sweep's own grid (grid.trials): RA-MoE over lambdas x
    bands x top_k, one SFT and one RISE trial, steering over strengths x bands x top_k."""
    trials = grid.trials(cfg)
    cells = {(t.model, t.task, t.language) for t in trials}
    per = Counter(t.method for t in trials)
    assert all(n % len(cells) == 0 for n in per.values()), "every cell has the same trials"
    return len(cells), {m: n // len(cells) for m, n in per.items()}


def stated_trials(path: Path) -> tuple[int, int, int] | None:
    """The header line '# Trials: 3,024 = 54 cells x 56 (...)' -> (3024, 54, 56)."""
    m = re.search(r"^# Trials: ([\d,]+) = (\d+) cells x (\d+)\b", path.read_text(), re.M)
    return tuple(int(g.replace(",", "")) for g in m.groups()) if m else None


# -------------------------------------------------------------------------------- every sweep config


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_config_passes_both_validation_passes(path, real_model_configs):
    cfg = load_config(path)
    assert cfg.name == path.stem, "a config's name is its file name: runs/NAME and the MLflow runs stay apart"
    shapes = sources.check(cfg)  # raises ConfigError on a top_k above the experts or an empty band
    assert set(shapes) == {m.name for m in cfg.models}
    for name, shape in shapes.items():
        assert max(cfg.knobs.top_k) <= shape.num_experts
        fixed = [b for b in cfg.knobs.bands if b != "auto"]
        layer_sets = [tuple(resolve_band(b, shape)) for b in fixed]
        assert all(layer_sets), f"{name}: a band without MoE layers"
        assert len(set(layer_sets)) == len(layer_sets), f"{name}: two bands select the same layers {layer_sets}"


@pytest.mark.parametrize("path", [GRID, PAPER], ids=["synthetic-grid", "paper"])
def test_header_states_the_real_trial_count(path):
    stated = stated_trials(path)
    assert stated is not None, f"{path.name}: its header must state '# Trials: N = C cells x P (...)'"
    cfg = load_config(path)
    cells, per = trials_by_cell(cfg)
    assert per == {"ramoe": 27, "sft": 1, "rise": 1, "steering": 27}
    assert stated == (cells * sum(per.values()), cells, sum(per.values())) == (3024, 54, 56)


def test_synthetic_grid_is_the_whole_world():
    cfg = load_config(GRID)
    assert {m.family for m in cfg.models} == {"olmoe", "qwen3_moe", "mixtral"}
    assert all(S.parse_scheme(m.path)[0] == S.WorldSpec() for m in cfg.models), "the full world, not the small one"
    assert {S.parse_scheme(t.source)[1] for t in cfg.tasks} == set(S.TASKS)
    assert cfg.languages == S.TARGET_LANGUAGES
    assert set(cfg.methods) == {"sft", "steering", "rise", "ramoe"}
    # multiple choice scored on the option texts: the world's mode, set when sources.resolve resolves the task
    assert all("choices" not in t.model_fields_set or t.choices == "texts" for t in cfg.tasks)
    assert cfg.resources.gpus_per_worker == 0 and cfg.sweep.train_workers == 0  # runs on a CPU machine
    # the header's concurrency: 2 trials at a time on 2 cores, 16 on a 16-core node
    assert sweep.max_concurrent(cfg, {"CPU": 2.0}) == 2 and sweep.max_concurrent(cfg, {"CPU": 16.0, "GPU": 1.0}) == 16
    # the demo's schedule (issue 13: 75 steps at lr 2e-4 left RA-MoE's predictions equal to SFT's)
    demo = load_config(REPO / "sweeps" / "demo.yaml").training
    assert (cfg.training.max_steps, cfg.training.lr, cfg.training.batch_size) == (demo.max_steps, demo.lr, demo.batch_size)


# -------------------------------------------------------------------------------------- paper.yaml


def test_paper_models_are_real_hub_models_of_known_families(real_model_configs):
    cfg = load_config(PAPER)
    assert {m.path: m.family for m in cfg.models} == {p: s[0] for p, s in REAL_SHAPES.items()}
    for m in cfg.models:
        assert m.family in M.FAMILIES
        assert sources.preset_family(m.path) is None and S.parse_scheme(m.path) is None
        assert m.dtype == "bfloat16"
    shapes = sources.check(cfg)
    for m in cfg.models:
        _, layers, experts, k = REAL_SHAPES[m.path]
        assert (shapes[m.name].num_layers, shapes[m.name].num_experts, shapes[m.name].experts_per_token) == (
            layers, experts, k)


def test_paper_tasks_are_hub_sources_in_the_loaders_format(tmp_path):
    cfg = load_config(PAPER)
    by_source = {t.source: t for t in cfg.tasks}
    assert set(by_source) == {"juletxara/mgsm", "CohereLabs/Global-MMLU", "facebook/belebele"}
    assert by_source["juletxara/mgsm"].format == "generative_numeric"
    assert (by_source["CohereLabs/Global-MMLU"].format, by_source["CohereLabs/Global-MMLU"].choices) == (
        "multiple_choice", "letters")
    assert (by_source["facebook/belebele"].format, by_source["facebook/belebele"].choices) == (
        "passage_multiple_choice", "letters")
    for t in cfg.tasks:
        assert T.locate(t.source, tmp_path) == ("hub", t.source)  # not mistaken for a local folder
        assert t.general_source and Path(t.general_source).is_absolute() and t.general_source.endswith(".jsonl")
    # the loader picks FLORES-200 configs for a source whose name contains "belebele"
    assert "belebele" in by_source["facebook/belebele"].source.lower()


def test_paper_languages_are_in_every_task_source():
    cfg = load_config(PAPER)
    langs = cfg.languages
    assert len(langs) == 6 and len(set(langs)) == 6 and "en" not in langs
    missing = [l for l in langs if l not in T.BELEBELE_FLORES]
    assert not missing, f"no FLORES-200 code (facebook/belebele) for {missing}"
    assert set(langs) <= GLOBAL_MMLU_LANGUAGES, f"not in Global-MMLU: {set(langs) - GLOBAL_MMLU_LANGUAGES}"
    if not MGSM_DIR.is_dir():
        pytest.skip(f"no MGSM data at {MGSM_DIR}")
    mgsm = TaskConfig(name="mgsm", format="generative_numeric", source=str(MGSM_DIR))
    data = T.load_parallel(mgsm, langs)  # the real loader on MGSM as published: every language, parallel
    assert set(data) == {"en", *langs}
    assert {len(v) for v in data.values()} == {250}


def test_paper_grid_and_gpu_plan():
    cfg = load_config(PAPER)
    cells, per = trials_by_cell(cfg)
    assert cells == 3 * 3 * 6 and per["ramoe"] == 27
    r = cfg.resources
    assert r.gpus_per_worker >= 1 and r.num_workers >= 2 and r.inference_actors >= 1  # ZeRO-3 over GPUs
    assert (cfg.sweep.train_workers or r.num_workers) == r.num_workers
    for m in cfg.models:  # each model's own plan (models.N.resources), and the top-level 4-GPU one
        for need in (sweep.trial_demand(cfg, m.name), sweep.trial_demand(cfg)):
            assert GPUS_PER_NODE % need["gpu"] == 0, f"{m.name}: trials must pack whole nodes"
            assert need["cpu"] <= 180 * need["gpu"] / GPUS_PER_NODE, f"{m.name}: more CPUs than its GPUs' share"
    assert {m.name: trial.train_workers(cfg, m.name) for m in cfg.models} == {"olmoe": 1, "qwen3-moe": 4, "gpt-oss": 2}
    # no site address and no secret in the config: both come from the submit script
    assert cfg.tracking.mlflow_uri is None
    for path in (cfg.sweep.storage_path, cfg.cache_dir, cfg.output_dir):
        assert path.startswith("/mnt/shared/ramoe/")


# ------------------------------------------------------------------------------------- cluster files


def _load_cluster_yaml():
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def _load_rayjob():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "RayJob"}
    return kinds["RayJob"], kinds["PersistentVolumeClaim"]


def test_cluster_files_reference_the_paper_config():
    for name in ("ray-cluster.yaml", "rayjob.yaml", "submit.sh", "README.md"):
        assert "sweeps/paper.yaml" in (CLUSTER / name).read_text(), name


def test_rayjob_manifest():
    job, pvc = _load_rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)

    # the entrypoint is `ramoe sweep` of the paper config, with overrides that config accepts
    words = spec["entrypoint"].split()
    assert words[:2] == ["ramoe", "sweep"] and words[2].endswith("sweeps/paper.yaml")
    overrides = [w.replace("$MLFLOW_TRACKING_URI", "https://mlflow.test") for w in words[3:]]
    cfg = load_config(PAPER, overrides)
    assert cfg.tracking.mlflow_uri == "https://mlflow.test"

    # one ReadWriteMany volume, mounted at the same path in every Ray pod, holding every storage path
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    mounts = set()
    for pod in pods:
        claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert list(claim.values()) == [pvc["metadata"]["name"]]
        (container,) = pod["containers"]
        mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claim}
    (mount,) = mounts
    for path in (cfg.sweep.storage_path, cfg.cache_dir, cfg.output_dir, *(t.general_source for t in cfg.tasks)):
        assert path.startswith(mount + "/"), path

    # GPU workers; enough of them for the paper's concurrency
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == GPUS_PER_NODE
    # the cluster the sweep schedules on (sweep.cluster) is what the job's pods give, CPUs included
    assert group["maxReplicas"] * gpus == cfg.sweep.cluster.gpus
    assert group["maxReplicas"] * float(worker["resources"]["limits"]["cpu"]) >= cfg.sweep.cluster.cpus

    # secrets only by reference: every secret-looking variable comes from a Secret
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    containers = [submitter] + [c for pod in pods for c in pod["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"]
        for name, e in env.items():
            if re.search(r"TOKEN|PASSWORD|SECRET|MLFLOW_TRACKING_URI", name):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], name
    images = {c["image"] for c in containers}
    assert len(images) == 1, f"one image for submitter, head and workers: {images}"


def test_launcher_config_against_rays_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    raw = _load_cluster_yaml()
    config = util.prepare_config(json.loads(json.dumps(raw)))
    util.validate_config(config)  # Ray's ray-schema.json; raises on an unknown or mistyped field

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no trial on the head"
    gpu_types = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith("p5.") for t in gpu_types)
    cfg = load_config(PAPER)
    assert raw["max_workers"] * GPUS_PER_NODE == cfg.sweep.cluster.gpus

    # authentication on every node, with the token file copied there; no Ray port opened to the world
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd.split("ray start")[0], cmd
    assert any(remote.endswith("/.ray/auth_token") for remote in raw["file_mounts"])
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not (rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 0)), rule
        assert not (rule.get("FromPort", 0) <= 6379 <= rule.get("ToPort", 0)), rule
    # the project's own set-up at the pinned torch
    setup = " ".join(raw["setup_commands"])
    assert "scripts/setup.sh" in setup and f"RAMOE_TORCH_SPEC={_setup_sh_torch()}" in setup


def _setup_sh_torch() -> str:
    m = re.search(r'TORCH_SPEC="\$\{RAMOE_TORCH_SPEC:-([^}]+)\}"', (REPO / "scripts" / "setup.sh").read_text())
    assert m, "scripts/setup.sh: no default torch spec"
    return m.group(1)


def test_image_pins_the_same_ray_and_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", text).group(1)
    job, _ = _load_rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    assert re.search(r"^ARG TORCH_SPEC=(\S+)$", text, re.M).group(1) == _setup_sh_torch()


def test_no_secret_in_shipped_files():
    patterns = {
        "hub token": r"\bhf_[A-Za-z0-9]{20,}",
        "AWS key": r"\bAKIA[0-9A-Z]{16}\b",
        "credentials in a URL": r"[a-z][a-z0-9+.-]*://[^/\s:@$]+:[^/\s@$]+@",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    }
    files = SWEEPS + [p for p in CLUSTER.iterdir() if p.is_file()]
    for path in files:
        text = path.read_text()
        for what, pattern in patterns.items():
            assert not re.search(pattern, text), f"{path.name}: {what}"


# ---------------------------------------------------------------------------------------- submit.sh


@pytest.mark.slow  # runs bash
def test_submit_script_syntax_and_lint():
    assert os.access(SUBMIT, os.X_OK)
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    res = subprocess.run(["shellcheck", str(SUBMIT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


FAKE_RAY = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_RAY_ARGS"
printf '%s' "${RAY_AUTH_MODE:-}" > "$FAKE_RAY_ARGS.auth"
prev=
for a in "$@"; do
    if [[ "$prev" == --runtime-env ]]; then cp "$a" "$FAKE_RAY_ARGS.env"; stat -c %a "$a" > "$FAKE_RAY_ARGS.mode"; fi
    prev=$a
done
exit "${FAKE_RAY_RC:-0}"
"""


@pytest.fixture
def submit_env(tmp_path):
    """A clean environment with every required setting, a token in ~/.ray, and a fake `ray` first on
    PATH that records what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("cluster-token")
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
        "FAKE_RAY_ARGS": str(tmp_path / "ray-args"),
        "RAY_ADDRESS": "http://127.0.0.1:8265",
        "MLFLOW_TRACKING_URI": "https://mlflow.test",
        "RAMOE_STORAGE": "/mnt/x/",
    }


def run_submit(env, *args):
    return subprocess.run(["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # runs bash
def test_submit_without_ray_address_fails_and_names_it(tmp_path):
    res = subprocess.run(["bash", str(SUBMIT)], env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "RAY_ADDRESS" in res.stderr and "8265" in res.stderr


@pytest.mark.slow  # runs bash
@pytest.mark.parametrize("unset", ["RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAMOE_STORAGE"])
def test_submit_requires_each_setting(submit_env, unset):
    env = {k: v for k, v in submit_env.items() if k != unset}
    res = run_submit(env)
    assert res.returncode == 2 and f"{unset} is not set" in res.stderr
    assert not Path(submit_env["FAKE_RAY_ARGS"]).exists(), "nothing may be submitted"


@pytest.mark.parametrize("setting, value, message", [
    ("RAY_ADDRESS", "ray://127.0.0.1:10001", "Jobs API address"),
    ("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.test", "credentials"),
    ("RAMOE_STORAGE", "shared/ramoe", "absolute path"),
    ("RAMOE_STORAGE", "s3://bucket/ramoe", "absolute path"),
    ("CONFIG", "../elsewhere.yaml", "inside the repository"),
    ("CONFIG", "sweeps/missing.yaml", "no such file"),
    ("RAY_AUTH_MODE", "maybe", "token or disabled"),
])
@pytest.mark.slow  # runs bash
def test_submit_refuses_bad_settings(submit_env, setting, value, message):
    res = run_submit(dict(submit_env, **{setting: value}))
    assert res.returncode == 2 and message in res.stderr and setting in res.stderr
    assert "s3cret" not in res.stderr
    assert not Path(submit_env["FAKE_RAY_ARGS"]).exists()


@pytest.mark.slow  # runs bash
def test_submit_requires_a_token_unless_auth_is_disabled(submit_env):
    (Path(submit_env["HOME"]) / ".ray" / "auth_token").unlink()
    res = run_submit(submit_env)
    assert res.returncode == 2 and "RAY_AUTH_TOKEN" in res.stderr
    assert run_submit(dict(submit_env, RAY_AUTH_TOKEN="t")).returncode == 0
    res = run_submit(dict(submit_env, RAY_AUTH_MODE="disabled"))
    assert res.returncode == 0 and "anyone who reaches" in res.stderr


@pytest.mark.slow  # runs bash
def test_submit_sends_the_sweep_with_storage_tracking_and_secrets_in_the_environment(submit_env):
    env = dict(submit_env, HF_TOKEN="hf-secret-value", RAMOE_SUBMISSION_ID="ramoe-test-1")
    res = run_submit(env, "--no-wait", "--resume", "training.lr=1e-4")
    assert res.returncode == 0, res.stderr
    args = Path(env["FAKE_RAY_ARGS"]).read_text().split("\0")[:-1]
    sep = args.index("--")
    ray_part, entry = args[:sep], args[sep + 1:]
    assert ray_part[:2] == ["job", "submit"]
    assert "--no-wait" in ray_part
    ray_opts = [a for a in ray_part[2:] if a != "--no-wait"]
    opts = dict(zip(ray_opts[::2], ray_opts[1::2]))
    assert opts["--address"] == "http://127.0.0.1:8265"
    assert opts["--submission-id"] == "ramoe-test-1"
    assert opts["--working-dir"] == "."
    assert entry == ["ramoe", "sweep", "sweeps/paper.yaml", "sweep.storage_path=/mnt/x/tune", "cache_dir=/mnt/x/cache",
                     "output_dir=/mnt/x/runs", "tracking.mlflow_uri=https://mlflow.test", "--resume", "training.lr=1e-4"]
    cfg = load_config(REPO / entry[2], [a for a in entry[3:] if "=" in a])  # the overrides are valid for the config
    assert (cfg.sweep.storage_path, cfg.cache_dir, cfg.output_dir) == ("/mnt/x/tune", "/mnt/x/cache", "/mnt/x/runs")
    assert cfg.training.lr == 1e-4

    # secrets only in the runtime-env file (mode 600, removed afterwards), never on the command line
    assert "hf-secret-value" not in " ".join(args) and "hf-secret-value" not in res.stdout + res.stderr
    runtime_env = json.loads(Path(env["FAKE_RAY_ARGS"] + ".env").read_text())
    assert Path(env["FAKE_RAY_ARGS"] + ".mode").read_text().strip() == "600"
    assert not Path(opts["--runtime-env"]).exists()
    resume = runtime_env["env_vars"].pop("RAMOE_RESUME_COMMAND")
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "https://mlflow.test", "HF_TOKEN": "hf-secret-value"}
    # the command the sweep prints when it is stopped: this submission again, with --resume and the overrides
    assert shlex.split(resume) == ["RAY_ADDRESS=http://127.0.0.1:8265", "MLFLOW_TRACKING_URI=https://mlflow.test",
                                   "RAMOE_STORAGE=/mnt/x/", "CONFIG=sweeps/paper.yaml", "cluster/submit.sh", "--resume",
                                   "training.lr=1e-4"]
    assert "hf-secret-value" not in resume
    assert {".venv", "runs", ".ramoe_cache", ".git", "mlruns"} <= set(runtime_env["excludes"])
    assert Path(env["FAKE_RAY_ARGS"] + ".auth").read_text() == "token"

    # how to follow and stop the job
    assert "ray job logs --address http://127.0.0.1:8265 --follow ramoe-test-1" in res.stdout
    assert "ray job stop --address http://127.0.0.1:8265 ramoe-test-1" in res.stdout


@pytest.mark.slow  # runs bash
def test_submit_defaults_and_exit_status(submit_env):
    env = dict(submit_env, RAY_ADDRESS="http://203.0.113.7:8265", CONFIG="sweeps/synthetic-grid.yaml",
               MLFLOW_TRACKING_TOKEN="mlflow-secret", FAKE_RAY_RC="3")
    res = run_submit(env)
    assert res.returncode == 3, "ray's exit status is the script's"
    assert "not a loopback or private address" in res.stderr
    args = Path(env["FAKE_RAY_ARGS"]).read_text().split("\0")[:-1]
    assert "--no-wait" not in args
    sid = args[args.index("--submission-id") + 1]
    assert re.fullmatch(r"ramoe-synthetic-grid-\d{8}-\d{6}", sid)
    assert args[args.index("--") + 1:][:3] == ["ramoe", "sweep", "sweeps/synthetic-grid.yaml"]
    runtime_env = json.loads(Path(env["FAKE_RAY_ARGS"] + ".env").read_text())
    assert shlex.split(runtime_env["env_vars"].pop("RAMOE_RESUME_COMMAND"))[-2:] == ["cluster/submit.sh", "--resume"]
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "https://mlflow.test", "MLFLOW_TRACKING_TOKEN": "mlflow-secret"}
    assert "Ctrl-C" in res.stdout  # without --no-wait it streams the logs


def test_parse_override_accepts_the_submit_overrides():
    # the values submit.sh builds from paths and URIs stay strings after YAML parsing
    for text, value in [("tracking.mlflow_uri=http://10.0.0.5:5000", "http://10.0.0.5:5000"),
                        ("cache_dir=/mnt/shared/ramoe/cache", "/mnt/shared/ramoe/cache")]:
        assert parse_override(text)[1] == value


@pytest.mark.slow  # runs bash
def test_submit_env_vars_never_collide_with_the_sweeps_own_runtime_env(submit_env):
    """The sweep's driver calls ray.init(runtime_env={"env_vars": train.ray_env()}); inside a job, Ray refuses
    (ValueError) an env var key that the job's runtime_env sets as well."""
    from ramoe_ray import train as TR

    secrets = {k: "x" for k in ("HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    assert run_submit(dict(submit_env, **secrets)).returncode == 0
    env_vars = json.loads(Path(submit_env["FAKE_RAY_ARGS"] + ".env").read_text())["env_vars"]
    assert set(env_vars) == {"MLFLOW_TRACKING_URI", "RAMOE_RESUME_COMMAND", *secrets}
    assert not set(env_vars) & set(TR.ray_env())


# ----------------------------------------------------------------------------- paper.yaml: memory per GPU


def _real_fits(cfg) -> dict:
    return {m.name: memory.fit(cfg, m, _hf_config(m.path)) for m in cfg.models}


def test_real_models_counted_on_the_meta_device_have_their_published_sizes():
    cfg = load_config(PAPER)
    published = {"olmoe": 6.92e9, "qwen3-moe": 30.5e9, "gpt-oss": 20.9e9}  # the model cards' totals
    for name, f in _real_fits(cfg).items():
        assert abs(f.size.total - published[name]) / published[name] < 0.01, (name, f.size.total)
    olmoe = _real_fits(cfg)["olmoe"].size
    # a decoder layer (a ZeRO-3 leaf) is gathered whole: its MoE block (64 experts x (gate, up, down) of
    # 2048 x 1024, + the router), attention (q, k, v, o of 2048 x 2048) and four norms of 2048 (input,
    # post-attention, q, k)
    assert olmoe.largest_unit == 64 * 3 * 2048 * 1024 + 64 * 2048 + 4 * 2048 * 2048 + 4 * 2048
    assert olmoe.lora == 16 * 64 * ((2048 + 2 * 1024) + (1024 + 2048))  # rank-1 expert LoRA on gate_up and down


def test_memory_fit_accepts_the_paper_plan_and_olmoe_on_one_gpu():
    cfg = load_config(PAPER)
    fits = memory.check_fit(cfg, {m.name: _hf_config(m.path) for m in cfg.models})
    assert fits["olmoe"].workers == 1 and fits["olmoe"].fits
    assert 20 < fits["olmoe"].train_gb < 0.9 * 80  # 13.8 GB of bf16 weights, RISE's experts' Adam state, activations
    assert all(f.fits and f.gpu_gb == 80 for f in fits.values())
    # a model without GPUs has nothing to fit (and needs no HF config here)
    cpu = load_config(PAPER, ["models.0.resources.gpus_per_worker=0"])
    assert set(memory.check_fit(cpu, {m.name: _hf_config(m.path) for m in cpu.models[1:]})) == {"qwen3-moe", "gpt-oss"}


def test_memory_fit_refuses_a_plan_that_cannot_fit_with_its_numbers(tmp_path, real_model_configs):
    general = tmp_path / "general.jsonl"
    general.write_text('{"text": "a document"}\n')
    over = [f"tasks.{i}.general_source={general}" for i in range(3)] + [
        f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", f"sweep.storage_path={tmp_path / 'tune'}",
        "models.1.resources.num_workers=1"]  # Qwen3-30B-A3B on one 80 GB GPU
    cfg = load_config(PAPER, over)
    with pytest.raises(ConfigError) as e:
        sweep.plan_sweep(cfg)  # the real sweep: refused before anything is built or queued
    msg = str(e.value)
    assert "qwen3-moe" in msg and "DOES NOT FIT" in msg and "1 worker(s)" in msg and "usable 72 of 80 GB" in msg
    assert re.search(r"training 10\d\.\d GB/GPU", msg), msg  # 61 GB of bf16 weights alone
    assert "fits with 2 workers: models.1.resources.num_workers: 2" in msg
    assert "olmoe" not in msg and "gpt-oss" not in msg
    assert not any(tmp_path.glob("runs")) and not any(tmp_path.glob("cache"))
    # smaller GPUs refuse the 4-GPU Qwen3 plan too: its evaluation actor holds the whole model
    with pytest.raises(ConfigError, match="evaluation actor holds the whole model"):
        memory.check_fit(load_config(PAPER, ["resources.gpu_memory_gb=40"]),
                         {m.name: _hf_config(m.path) for m in load_config(PAPER).models})


def test_twins_are_the_trials_whose_band_resolves_to_the_same_layers():
    """grid.twins on synthetic-grid.yaml: where stage 2 resolved auto to band 0.25-0.5's layers, each RA-MoE and
    steering trial with band auto is a twin of the same trial with band 0.25-0.5 (earlier in grid order);
    SFT, RISE and the other bands are not; a cell whose bands all differ has none."""
    from ramoe_ray import grid

    cfg = load_config(GRID)
    todo = grid.trials(cfg)
    cells = {t.cell for t in todo}
    layers = {c: {"0.25-0.5": [1, 2], "0.375-0.625": [2, 3], "auto": [1, 2]} for c in cells}
    first = sorted(cells)[0]
    layers[first]["auto"] = [3]
    run, twins = grid.twins(todo, layers)
    got = [t for v in twins.values() for t in v]
    assert len(got) == (len(cells) - 1) * (27 + 27) // 3 and len(run) + len(got) == len(todo)
    by_key = {t.key: t for t in todo}
    for key, ts in twins.items():
        for t in ts:
            assert t.band == "auto" and t.cell != first and t.method in ("ramoe", "steering")
            assert by_key[key].band == [0.25, 0.5] and by_key[key].index < t.index
            assert (by_key[key].lam, by_key[key].top_k, by_key[key].strength) == (t.lam, t.top_k, t.strength)
    assert grid.twins(todo, {})[1] == {}  # nothing resolved: nothing is a twin
