"""Stage 4: evaluation (docs/architecture.md, "The method") — one evaluator for the base model, a trained adapter
(SFT, RA-MoE, RISE) and Routing Steering.

Entry: ``evaluate_cell(cfg, model_cfg, task_cfg, languages, adapter=None, steering=None, split="test")``.

It is stage 1's predictor (``inference.Predictor``, run by ``inference.map_rows`` as a Ray Data actor pool
or in process with ``resources.inference_actors = 0``) on the split's English and target examples:

- base model: exactly the taxonomy of that split (its cached artefacts are reused, or computed);
- adapter: the folder ``train.train_cell`` saved (peft format + ramoe_lora.json); loaded into our expert
  LoRA (``lora.apply_expert_lora`` + ``load_lora_state_dict``), so the model stays a plain HF model whose
  routers ``models.capture`` finds (peft's PeftModel computes the same function: tests/test_train.py);
  or, with ``loaded``, the trained model itself, still in the training's process (``train.train_cell``'s
  ``on_trained``: a sweep trial's validation), which predicts as its saved adapter does (tests/test_evaluate.py);
  a full-weight RISE folder (``expert_delta.save_experts``) has its experts' weights copied into the model;
- steering: {"experts": {layer: [experts]}, "strength": s}; every forward runs under ``models.steer``
  (whose hooks run before capture's, so the recorded routing is the steered one).

Per language (English included): accuracy; per target language: the divergence curve to English
(``experts.divergence_curve`` of the per-example importance arrays, one value per MoE layer); per
language the mean importance (L, E) (a steering check: the task experts' share); eval.json also names the
generative scoring (``TaskConfig.scoring``; None for multiple choice). Written to
``out_dir/eval.json`` + ``out_dir/rows.parquet``; with an active MLflow run also logged as metrics
(``acc_<lang>``, ``div_<lang>_L<layer>``, ``div_<lang>_mean``) and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ramoe_ray import expert_delta, inference, lora, models, taxonomy
from ramoe_ray.cache import content_key, write_json_atomic
from ramoe_ray.config import ConfigError
from ramoe_ray.routing_stats import divergence_curve

EVAL = "eval.json"


def _steering_spec(steering: dict | None) -> dict | None:
    if steering is None:
        return None
    return {"experts": {int(l): [int(e) for e in v] for l, v in steering["experts"].items()},
            "strength": float(steering["strength"])}


def load_adapter(model, adapter: str | os.PathLike):
    """Our expert LoRA on ``model`` with the saved factors of ``adapter``, or (a full-weight RISE folder,
    ``expert_delta.EXPERTS_META``) its trained experts' weights copied in (in place; returns the model)."""
    from safetensors.torch import load_file

    folder = Path(adapter)
    if (folder / expert_delta.EXPERTS_META).is_file():
        try:
            return expert_delta.load_experts(model, folder).eval()
        except (KeyError, ValueError) as e:
            raise ConfigError(f"adapter {str(folder)!r} does not fit the model: {e}") from None
    meta_file = folder / lora.RAMOE_LORA
    if not meta_file.is_file() or not (folder / lora.ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"adapter {str(folder)!r}: no {lora.RAMOE_LORA} / {lora.ADAPTER_WEIGHTS} (train.train_cell writes both)")
    meta = json.loads(meta_file.read_text())
    fam = models.family_of(model)
    if meta["family"] != fam.name:
        raise ConfigError(f"adapter {str(folder)!r} was trained on a {meta['family']} model, this is {fam.name}")
    lora.apply_expert_lora(model, rank=int(meta["rank"]), alpha=float(meta["alpha"]), seed=0)
    state = load_file(str(folder / lora.ADAPTER_WEIGHTS))
    try:
        lora.load_lora_state_dict(model, {k: v.to(next(model.parameters()).dtype) for k, v in state.items()})
    except (KeyError, ValueError) as e:
        raise ConfigError(f"adapter {str(folder)!r} does not fit the model: {e}") from None
    return model.eval()


class EvalPredictor(inference.Predictor):
    """``inference.Predictor`` with an adapter loaded and/or steering applied to every forward. With
    ``settings`` (several steering specs), each row's ``setting`` column picks its spec: every setting of a
    cell in one model load."""

    loads = 0  # models loaded in this process (tests count the loads of a cell's steering settings)

    def __init__(self, model_path: str, model_cfg: dict, k: int, max_new_tokens: int, device: str = "cpu",
                 threads: int | None = None, adapter: str | None = None, steering: dict | None = None,
                 settings: list[dict] | None = None):
        super().__init__(model_path, model_cfg, k, max_new_tokens, device, threads)
        type(self).loads += 1
        if adapter:
            load_adapter(self.model, adapter)
        self.steering = _steering_spec(steering)
        self.settings = [_steering_spec(x) for x in settings] if settings is not None else None

    def _steered(self, batch: pd.DataFrame, s: dict | None) -> pd.DataFrame:
        with models.steer(self.model, s["experts"], s["strength"]) if s else contextlib.nullcontext():
            return super().__call__(batch)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.settings is None:
            return self._steered(batch, self.steering)
        parts = [self._steered(g.drop(columns="setting"), self.settings[int(i)]).assign(setting=int(i))
                 for i, g in batch.groupby("setting", sort=False)]
        return pd.concat(parts, ignore_index=True)


def _label(adapter, steering) -> str:
    if adapter is None and steering is None:
        return "base"
    h = content_key([str(adapter), steering], 10)
    return ("adapter" if adapter else "steering") + "-" + h


def _checked_steering(steering: dict | None, plan, model_cfg) -> dict | None:
    """A steering spec as JSON (layer keys as strings), its layers checked to be MoE layers of the model."""
    if steering is None:
        return None
    steering = {"experts": {str(l): list(v) for l, v in _steering_spec(steering)["experts"].items()},
                "strength": float(steering["strength"])}
    bad = sorted(int(l) for l in steering["experts"] if int(l) not in plan.shape.moe_layers)
    if bad:
        raise ConfigError(f"steering layers {bad} are not MoE layers of {model_cfg.name!r} ({list(plan.shape.moe_layers)})")
    return steering


def _languages(languages) -> list[str]:
    languages = [languages] if isinstance(languages, str) else languages
    return [l for l in dict.fromkeys(languages) if l != "en"]


def evaluate_cell(cfg, model_cfg, task_cfg, languages, *, adapter: str | os.PathLike | None = None,
                  steering: dict | None = None, split: str = "test", out_dir: str | os.PathLike | None = None,
                  num_actors: int | None = None, batch_size: int | None = None, loaded: tuple | None = None) -> dict:
    """Accuracy per language (English included) and the divergence to English per MoE layer, for the base
    model, base + ``adapter`` or base under ``steering`` (module docstring). Returns the eval.json content
    plus "path". ``loaded``: (model, tokenizer) already carrying ``adapter`` (a training's own model:
    ``train.train_cell``'s on_trained), predicted in this process without loading either."""
    languages = _languages(languages)
    if adapter is not None and not Path(adapter).is_dir():
        raise ConfigError(f"adapter {str(adapter)!r} is not a folder")
    if loaded is not None and (adapter is None or steering is not None):
        raise ValueError("evaluate_cell: a loaded model is evaluated as its adapter (adapter given, no steering)")
    plan = taxonomy.plan(cfg, model_cfg, task_cfg, languages, split)
    steering = _checked_steering(steering, plan, model_cfg)
    num_actors = cfg.resources.inference_actors if num_actors is None else num_actors
    batch_size = batch_size or inference.BATCH_SIZE
    langs = ["en"] + languages
    if adapter is None and steering is None:  # the base model: the taxonomy of this split
        taxonomy.execute(plan, num_actors=num_actors, batch_size=batch_size)
        frames = [pd.read_parquet(plan.root / plan.keys[l] / "rows.parquet") for l in langs]
        out = pd.concat(frames, ignore_index=True)
    else:
        rows = taxonomy.rows_frame(plan, langs, False)
        kwargs = {**taxonomy.predictor_kwargs(plan), "adapter": str(adapter) if adapter else None, "steering": steering}
        if loaded is not None:
            out = inference.predict_frame(*loaded, rows, k=kwargs["k"], max_new_tokens=kwargs["max_new_tokens"],
                                          batch_size=batch_size)
        else:
            out = inference.map_rows(rows, EvalPredictor, kwargs, num_actors=num_actors, batch_size=batch_size,
                                     cpus_per_actor=cfg.resources.cpus_per_worker)
        if len(out) != len(rows):
            raise RuntimeError(f"predictor returned {len(out)} rows for {len(rows)}")
    out_dir = Path(out_dir) if out_dir else Path(cfg.run_dir) / "eval" / f"{model_cfg.name}-{task_cfg.name}-{split}-{_label(adapter, steering)}"
    return _written(out, plan, langs, split, out_dir, adapter=adapter, steering=steering)


def evaluate_steering(cfg, model_cfg, task_cfg, languages, settings: list[dict], out_dirs: list, *,
                      split: str = "validation", num_actors: int | None = None, batch_size: int | None = None) -> list[dict]:
    """``evaluate_cell`` for several steering settings of one cell in ONE pass of the predictor (one model
    load per actor): the rows are repeated once per setting and each carries its setting's index.
    Returns one eval.json content (plus "path") per setting, written to ``out_dirs[i]``."""
    languages = _languages(languages)
    plan = taxonomy.plan(cfg, model_cfg, task_cfg, languages, split)
    settings = [_checked_steering(x, plan, model_cfg) for x in settings]
    langs = ["en"] + languages
    rows = taxonomy.rows_frame(plan, langs, False)
    every = pd.concat([rows.assign(setting=i) for i in range(len(settings))], ignore_index=True)
    kwargs = {**taxonomy.predictor_kwargs(plan), "settings": settings}
    out = inference.map_rows(every, EvalPredictor, kwargs, batch_size=batch_size or inference.BATCH_SIZE,
                             num_actors=cfg.resources.inference_actors if num_actors is None else num_actors,
                             cpus_per_actor=cfg.resources.cpus_per_worker)
    if len(out) != len(every):
        raise RuntimeError(f"predictor returned {len(out)} rows for {len(every)}")
    return [_written(out[out.setting == i].drop(columns="setting"), plan, langs, split, Path(d), adapter=None, steering=st)
            for i, (st, d) in enumerate(zip(settings, out_dirs))]


def _written(out: pd.DataFrame, plan, langs: list[str], split: str, out_dir: Path, *, adapter, steering) -> dict:
    """The evaluation's numbers from the predictor's rows; eval.json and rows.parquet written to ``out_dir``."""
    out = out.sort_values(["language", "id"], kind="stable").reset_index(drop=True)
    by_lang = {l: out[out.language == l].sort_values("id") for l in langs}
    imp = {l: taxonomy.routing_array(df, "importance") for l, df in by_lang.items()}
    result = {
        "model": plan.model_cfg.name, "task": plan.task_cfg.name, "scoring": plan.inputs["en"]["task"]["scoring"],
        "split": split, "languages": langs,
        "adapter": str(adapter) if adapter else None, "steering": steering, "moe_layers": list(plan.shape.moe_layers),
        "n": {l: int(len(df)) for l, df in by_lang.items()},
        "accuracy": {l: float(df.correct.mean()) for l, df in by_lang.items()},
        "divergence": {l: [float(x) for x in divergence_curve(imp["en"], imp[l])] for l in langs[1:]},
        "importance_mean": {l: imp[l].mean(axis=0).tolist() for l in langs},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out.drop(columns=[c for c in ("continuations",) if c in out]).copy()
    for c in ("importance", "frequency"):  # (L, E) per row, whether from the predictor or read back from parquet
        table[c] = [np.stack([np.asarray(r, dtype=np.float32) for r in x]) for x in table[c]]
    taxonomy.write_parquet(table, out_dir / "rows.parquet")
    write_json_atomic(out_dir / EVAL, result)
    result["path"] = str(out_dir / EVAL)
    result["mlflow"] = _log_mlflow(result, out_dir)
    return result


def _log_mlflow(result: dict, out_dir: Path) -> bool:
    """Metrics and the artefact files to the active MLflow run; nothing (no import) without one."""
    if "mlflow" not in sys.modules:
        return False
    import mlflow

    if mlflow.active_run() is None:
        return False
    metrics = {f"acc_{l}": v for l, v in result["accuracy"].items()}
    for lang, curve in result["divergence"].items():
        metrics.update({f"div_{lang}_L{l}": v for l, v in zip(result["moe_layers"], curve)})
        metrics[f"div_{lang}_mean"] = float(np.mean(curve))
    mlflow.log_metrics(metrics)
    for f in (EVAL, "rows.parquet"):
        mlflow.log_artifact(str(out_dir / f), artifact_path=f"eval/{out_dir.name}")
    return True
