"""The sweep's trial grid (docs/architecture.md, "The method"): which trials a config asks for, and their names.

RA-MoE runs over λ x band x top-k; SFT and RISE run once per cell (the first band / top-k: they only set
which routing KL is reported); Routing Steering runs over strength x band x top-k. Cells are the outer
loops (model, task, language), then the methods in config order. A ``Trial`` is plain JSON
(``dataclasses.asdict``): Ray Tune's param_space, the trial's trial.json and the resume record all hold it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from ramoe_ray.cache import content_key
from ramoe_ray.config import BandSpec, RunConfig, band_json, band_label, parse_band

TRIAL_JSON = "trial.json"  # a trial folder's record (written by the trial, logged and read back by the sweep)
TRIAL_FIGURE = "trial.png"

RULES: dict[str, str] = {
    "grid": ("ramoe: lambdas x bands x top_k; sft, rise: once per cell at bands[0], top_k[0]; steering: "
             "strengths x bands x top_k"),
    "selection": ("per (model, task, language, method): the finished trial with the highest validation accuracy "
                  "in the target language; ties go to the earlier trial in grid order"),
    "test": "only the selected trial of each (cell, method) is evaluated on the test split",
    "stages_1_2": "train split, computed once per cell in the driver before any trial; trials read the cache",
}
SELECT_METRIC = "val_acc"


@dataclass
class Trial:
    """One trial of the grid. ``band`` is a band as JSON ('auto' or [start, end]); ``index`` is its place
    in grid order, ``key`` its readable unique name (the resume record), ``dir`` its folder name."""

    model: str
    task: str
    language: str
    method: str
    lam: float
    band: Any
    top_k: int
    strength: float | None
    index: int = -1
    key: str = ""
    dir: str = ""

    @property
    def cell(self) -> str:
        return f"{self.model}/{self.task}/{self.language}"

    def band_spec(self) -> BandSpec:
        return parse_band(self.band)

    def band_label(self) -> str:
        return band_label(self.band_spec())


def trial_key(t: Trial) -> str:
    """Readable, unique and stable name of a trial (the resume record)."""
    head = f"{t.model}/{t.task}/{t.language}/{t.method}"
    if t.method == "ramoe":
        return f"{head}/lam={t.lam:g}/band={t.band_label()}/top_k={t.top_k}"
    if t.method == "steering":
        return f"{head}/strength={t.strength:g}/band={t.band_label()}/top_k={t.top_k}"
    return head


def _knob_settings(cfg: RunConfig, method: str) -> list[dict]:
    """The knob values of one method's trials in a cell (module docstring)."""
    k = cfg.knobs
    bands = [band_json(b) for b in k.bands]
    if method == "ramoe":
        return [dict(lam=lam, band=b, top_k=tk, strength=None) for lam in k.lambdas for b in bands for tk in k.top_k]
    if method == "steering":
        return [dict(lam=0.0, band=b, top_k=tk, strength=s)
                for s in cfg.steering.strengths for b in bands for tk in k.top_k]
    return [dict(lam=0.0, band=bands[0], top_k=k.top_k[0], strength=None)]


def trials(cfg: RunConfig) -> list[Trial]:
    """Every trial of the config, in grid order (cells outer, then methods in config order)."""
    out: list[Trial] = []
    for m in cfg.models:
        for t in cfg.tasks:
            for lang in cfg.languages:
                for method in cfg.methods:
                    for knobs in _knob_settings(cfg, method):
                        draft = Trial(model=m.name, task=t.name, language=lang, method=method, index=len(out),
                                      **knobs)
                        key = trial_key(draft)
                        folder = hashlib.sha256(key.encode()).hexdigest()[:16]
                        out.append(dataclasses.replace(draft, key=key, dir=folder))
    return out


def config_hash(cfg: RunConfig) -> str:
    """What must not change between a sweep and its resume (everything but where it runs / logs)."""
    d = cfg.model_dump(mode="json")
    for k in ("resources", "sweep", "tracking", "output_dir", "cache_dir"):
        d.pop(k, None)
    d.get("training", {}).pop("eval_batch_size", None)
    return content_key(d, 16)
