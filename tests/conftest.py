import os
import subprocess

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest

from ramoe_ray import sources, synthetic, train_worker
from ramoe_ray.config import config_from_dict

# The reduced synthetic world is built once into a persistent, content-addressed cache (its key
# hashes the world's parameters and synthetic.py), and linked into each test's fresh cache folder.
WORLD_CACHE = Path(os.environ.get("RAMOE_TEST_CACHE", Path(__file__).parents[1] / ".ramoe_cache"))


@pytest.fixture(scope="session")
def small_world() -> Path:
    synthetic.build_model(synthetic.SMALL, "olmoe", WORLD_CACHE, log_every=0)
    return WORLD_CACHE / "world"


@pytest.fixture
def cache_dir(tmp_path, small_world) -> Path:
    """A fresh cache folder in which the small world (data and olmoe model) is already built."""
    c = tmp_path / "cache"
    c.mkdir()
    (c / "world").symlink_to(small_world.resolve(), target_is_directory=True)
    return c


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (CPU only, so results match the CPU reference)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fresh_ray_for_deepspeed_workers() -> None:
    """A local Ray whose Ray Train workers run DeepSpeed on CPU (compiled ops from the repo's cache). An
    earlier test's Ray is shut down first: its environment would not reach these workers."""
    import ray

    env = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path(__file__).parents[1] / ".ramoe_cache" / "torch_extensions"))}
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)


def small_config(cache_dir, *, task="arith", languages=("syn3",), **extra):
    """A resolved RunConfig on the small world: olmoe model, one synthetic task."""
    d = dict(models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
             tasks=[dict(name=task, format=synthetic.TASKS[task], source=f"synthetic-small:{task}")],
             languages=list(languages), cache_dir=str(cache_dir))
    d.update(extra)
    return sources.resolve(config_from_dict(d))


@pytest.fixture
def make_config(cache_dir):
    """make_config(task="arith", languages=("syn3",), **fields) -> RunConfig in this test's cache."""
    return lambda **kw: small_config(cache_dir, **kw)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, small_world):
    """One cache per test module, holding the small world (linked): stages 1-2 of a cell run once per module."""
    c = tmp_path_factory.mktemp("cache") / "cache"
    c.mkdir()
    (c / "world").symlink_to(small_world.resolve(), target_is_directory=True)
    return c


HEAVY_PROCESSES = {"bash", "sh", "ray", "gcs_server", "raylet", "ramoe"}


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """The fast tier (`pytest -m "not slow"`) stays fast: a test without the `slow` marker fails if it
    starts a process (Ray starts its raylet and GCS as subprocesses) or sets up DeepSpeed training."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(what):
        def fail(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow", pytrace=False)
        return fail

    popen, refused = subprocess.Popen.__init__, refuse("starts a process (Ray, a CLI, a shell)")

    def guarded_popen(self, args, *rest, **kwargs):
        cmd = os.path.basename(str(args if isinstance(args, str) else args[0]).split()[0])
        if cmd in HEAVY_PROCESSES or cmd.startswith("python"):  # Ray's gcs_server/raylet, shells, CLIs
            return refused()
        return popen(self, args, *rest, **kwargs)  # probes such as `uname -p` or MLflow's `git`

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    monkeypatch.setattr(train_worker, "setup", refuse("sets up DeepSpeed training"))
