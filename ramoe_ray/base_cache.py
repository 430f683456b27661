"""Stage 3's per-cell cache of the base model's passes: the English alignment targets and the "before"
metrics (routing KL over the ci examples, train CE) that every training of a cell would compute alike.

The first training of a cell computes them in its workers (``train_worker.base_passes``: the engine at
step 0, whose adapter is zero, so the model is the base model bit for bit) and writes them here; every
later training of the cell reads them. The values depend on neither the method, λ, the seed nor the
adapter kind (LoRA B = 0 and a zero RISE delta leave every weight as it is: ``W + 0 = W`` exactly); they
depend on what ``inputs`` hashes:

- from the driver (``TrainPlan.base_inputs``, ``train.base_inputs``): the model identity (stage 1's:
  path, revision, dtype, content hash of the folder), the train records (prompts, continuations,
  English prompts, ci labels), the band layers and their task experts (the KL), the batch size of the
  passes (padding), the code (``train_worker.code_version``);
- from the worker (``compute_inputs``): device and dtype, torch threads on CPU, world size, torch /
  transformers / deepspeed versions: what decides the last bits of a float.

Artefact ``cache_dir/base_passes/KEY/`` (``cache.atomic_dir``): ``targets.safetensors`` (ci id -> (L, E)
float32 English soft importance, the tensors the loss uses, bit for bit) and ``meta.json``
(``routing_kl_ci``, ``ce_train``, the key inputs).

Concurrency: rank 0 of a training holds an exclusive lock on the key (``first_computes``) while it looks
and, on a miss, computes and writes, so a concurrent training of the same cell waits and then reads;
the lock only saves work (``atomic_dir`` keeps a race correct). Under ZeRO-3 the passes are collectives:
every rank must take the same branch, so the ranks ``agree`` on a hit. A cache folder a worker cannot
write (a node without the shared file system) costs a recomputation, never the training.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from ramoe_ray.cache import atomic_dir, content_key

TARGETS = "targets.safetensors"
META = "meta.json"


@dataclass
class Baseline:
    """The base model's passes (LoRA B = 0): the alignment targets and the "before" metrics."""

    targets: dict[str, torch.Tensor]  # ci example id -> (L, E) soft importance of its English prompt
    routing_kl_ci: float
    ce_train: float


def compute_inputs(device: torch.device, dtype: torch.dtype, world_size: int) -> dict:
    """What the worker adds to the key: how its floats are computed."""
    gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "dtype": str(dtype),
            "threads": None if gpu else torch.get_num_threads(), "world_size": int(world_size),
            "torch": torch.__version__, "transformers": version("transformers"), "deepspeed": version("deepspeed")}


def folder(root: str | Path, inputs: dict) -> Path:
    return Path(root) / content_key(inputs, 24)


@contextlib.contextmanager
def first_computes(final: Path, rank: int):
    """Rank 0 holds an exclusive lock on ``final``'s key for the block (other ranks: no lock). Without a
    lockable file (no shared file system) the block runs unlocked."""
    if rank != 0:
        yield
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        f = open(final.parent / f".{final.name}.lock", "a")  # noqa: SIM115 (closed below: that releases the lock)
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
        f = None
    try:
        yield
    finally:
        if f is not None:
            f.close()


def agree(hit: bool, device: torch.device, world_size: int) -> bool:
    """A hit only where every rank sees one (the passes are ZeRO-3 collectives: all ranks or none)."""
    if world_size == 1:
        return hit
    import torch.distributed as dist

    flag = torch.tensor([int(hit)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(final: Path, base: Baseline, inputs: dict) -> None:
    """Writes the artefact (atomically); a folder that cannot be written is a warning, not an error."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in base.targets.items()}, str(tmp / TARGETS))
        nan = math.isnan(base.routing_kl_ci)
        (tmp / META).write_text(json.dumps({"routing_kl_ci": None if nan else base.routing_kl_ci,
                                            "ce_train": base.ce_train, "n_targets": len(base.targets),
                                            "inputs": inputs}, indent=2, default=str))

    try:
        atomic_dir(final, build)
    except OSError as e:
        warnings.warn(f"base passes not cached in {final}: {e}", stacklevel=2)


def load(final: Path) -> Baseline:
    from safetensors.torch import load_file

    meta = json.loads((final / META).read_text())
    kl = meta["routing_kl_ci"]
    return Baseline(targets=dict(load_file(str(final / TARGETS))), ce_train=float(meta["ce_train"]),
                    routing_kl_ci=math.nan if kl is None else float(kl))
