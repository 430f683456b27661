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
from ramoe_ray.config import BandSpec, RunConfig, band_json, band_label, parse_band, result_fields

TRIAL_JSON = "trial.json"  # a trial folder's record (written by the trial, logged and read back by the sweep)
TRIAL_FIGURE = "trial.png"

RULES: dict[str, str] = {
    "grid": ("ramoe: lambdas x bands x top_k; sft, rise: once per cell at bands[0], top_k[0]; steering: "
             "strengths x bands x top_k"),
    "selection": ("per (model, task, language, method): the finished trial with the highest validation accuracy "
                  "in the target language; ties go to the earlier trial in grid order"),
    "test": "only the selected trial of each (cell, method) and its replicates are evaluated on the test split",
    "stages_1_2": "train split, computed once per cell in the driver before any trial; trials read the cache",
    "twins": ("trials of a cell that differ only in the band's spelling (a band that resolves to the same layers as "
              "another, e.g. auto) are one computation: the first in grid order runs, each twin is logged as its own "
              "child with the first's results and the tag ramoe.same_as"),
    "seeds": ("the grid is searched at training.seeds[0] (which also fixes the data split); the selected "
              "configuration of each (cell, trained method) is then retrained with every other seed (a replicate, "
              "tagged ramoe.replicate_of) and evaluated on test with it; steering has no seed"),
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
    seed: int | None = None  # the training seed; None for steering (nothing is trained)
    replicate_of: str = ""  # a replicate: the key of the selected trial it retrains with another seed
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
    if t.replicate_of:
        return f"{t.replicate_of}/seed={t.seed}"
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
                        seed = None if method == "steering" else cfg.training.seed
                        draft = Trial(model=m.name, task=t.name, language=lang, method=method, index=len(out),
                                      seed=seed, **knobs)
                        out.append(_named(draft))
    return out


def _named(draft: Trial) -> Trial:
    key = trial_key(draft)
    return dataclasses.replace(draft, key=key, dir=hashlib.sha256(key.encode()).hexdigest()[:16])


def replicates(cfg: RunConfig, selected: list[Trial], start: int) -> list[Trial]:
    """The selected trials of trained methods again with each other seed (``RULES["seeds"]``), numbered
    from ``start`` in the order given."""
    out: list[Trial] = []
    for t in selected:
        if t.method == "steering":
            continue
        for seed in cfg.training.seeds[1:]:
            out.append(_named(dataclasses.replace(t, seed=seed, replicate_of=t.key, index=start + len(out))))
    return out


def n_replicates(cfg: RunConfig) -> int:
    """How many replicates a finished grid adds: one per (cell, trained method) and extra seed."""
    trained = sum(m != "steering" for m in cfg.methods)
    return len(cfg.models) * len(cfg.tasks) * len(cfg.languages) * trained * (len(cfg.training.seeds) - 1)


def twins(todo: list[Trial], band_layers: dict[str, dict[str, list[int]]]) -> tuple[list[Trial], dict[str, list[Trial]]]:
    """``RULES["twins"]``: (the trials to run, {run trial's key: its twins}). ``band_layers``: cell id -> band
    label -> the MoE layers stage 2 resolved it to (a cell or band not in it: the band's label stands)."""
    first: dict[tuple, Trial] = {}
    out: dict[str, list[Trial]] = {}
    for t in todo:
        layers = band_layers.get(t.cell, {}).get(t.band_label(), t.band_label())
        what = (t.cell, t.method, t.lam, str(layers), t.top_k, t.strength, t.seed, t.replicate_of)
        if what in first:
            out.setdefault(first[what].key, []).append(t)
        else:
            first[what] = t
    return list(first.values()), out


def config_hash(cfg: RunConfig) -> str:
    """What must not change between a sweep and its resume: every field that can change a result
    (``config.result_fields``; only ``config.NON_RESULT`` is left out)."""
    return content_key(result_fields(cfg), 16)
