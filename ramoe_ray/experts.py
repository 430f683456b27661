"""Stage 2: routing analysis — the layer band and the English task experts of one cell, as experts.json.

Entry: ``run_experts(cfg, model_cfg, task_cfg, language, band, top_k) -> (experts.json, cache_hit)``; the
sweep calls ``build_experts`` on taxonomy artefacts it already has. The math is in routing_stats.py;
this module reads stage 1's artefacts, applies it, and writes the artefact (content-addressed under
``cache_dir/experts/<key>/``: experts.json, divergence.parquet, divergence.png, importance.png).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ramoe_ray import routing_stats, taxonomy
from ramoe_ray.cache import atomic_dir, code_digest, content_key, write_json_atomic
from ramoe_ray.config import ConfigError, band_json, band_label, parse_band
from ramoe_ray.routing_stats import (
    RULES,
    auto_band,
    budget_split,
    depth_zones,
    divergence_curve,
    pooled_frequency,
    rise_select,
    task_expert_scores,
    task_experts,
    to_numpy,
)
from ramoe_ray.taxonomy import routing_array


def experts_artifact(
    *,
    moe_layers: Sequence[int],
    band_spec: Any,
    band_layers: Sequence[int],
    task_experts: Mapping[int, Sequence[int]],
    task_scores: Any,
    rise: Mapping[str, Mapping[int, Sequence[int]]],
    rise_settings: Mapping[str, Any],
    divergence: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> dict:
    """The content of experts.json (JSON-native types; layer keys as strings).

    task_scores: the (L, E) ``task_expert_scores``; each band layer lists its chosen experts (best
    first) with their scores and the full score row. rise: target language -> ``rise_select`` output;
    rise_settings: {"budget": K, "alpha", "languages"} it was chosen with (recorded with the depth zones
    and the per-zone split).
    divergence: target language -> (L,) curve. provenance: the inputs' cache keys (from the caller).
    """
    layers = [int(l) for l in moe_layers]
    row = {l: j for j, l in enumerate(layers)}
    scores = np.asarray(to_numpy(task_scores), dtype=np.float64)
    n_exp = scores.shape[-1]
    zones = depth_zones(layers)
    budget = int(rise_settings["budget"])
    te = {}
    for l, experts in task_experts.items():
        s = scores[row[int(l)]]
        te[str(int(l))] = {
            "experts": [int(e) for e in experts],
            "scores": [float(s[int(e)]) for e in experts],
            "all_scores": [float(x) for x in s],
        }
    return {
        "moe_layers": layers,
        "band": {"spec": band_json(band_spec), "layers": [int(l) for l in band_layers]},
        "task_experts": te,
        "rise": {
            **dict(rise_settings),
            "zones": zones,
            "split": budget_split(budget, {z: len(ls) * n_exp for z, ls in zones.items()}),
            "experts": {
                lang: {str(int(l)): [int(e) for e in es] for l, es in sel.items()} for lang, sel in rise.items()
            },
        },
        "divergence": {
            lang: {str(l): float(v) for l, v in zip(layers, np.asarray(to_numpy(c), dtype=np.float64))}
            for lang, c in divergence.items()
        },
        "rules": dict(RULES),
        "provenance": dict(provenance),
    }


# ------------------------------------------------------------------------------- the stage entry

def _code_version() -> str:
    """Hash of the code that determines an experts artefact: this module and the stage-2 math."""
    return code_digest(sys.modules[__name__], routing_stats)


def rise_settings(plan: Any, language: str) -> dict:
    """What RISE's selection of ``language`` uses besides the frequencies: K (``rise.budget``, or the
    default resolved on the model's shape), α, and its languages (``rise.languages``: English and every
    language of the plan, or English and the target)."""
    rise, shape = plan.cfg.rise, plan.shape
    langs = plan.languages if rise.languages == "all" else [language]
    return {"budget": rise.budget_for(len(shape.moe_layers) * shape.num_experts), "alpha": float(rise.alpha),
            "languages": ["en"] + sorted(langs)}


def experts_key_inputs(plan: Any, language: str, band: Any, top_k: int) -> dict:
    """What an experts artefact depends on: the taxonomy artefacts' keys (every language of the
    plan, for RISE), the general-text key, the target language, band, top_k, RISE's settings, code."""
    return {
        "stage": "experts", "code": _code_version(), "taxonomy": dict(plan.keys), "general": plan.general_key,
        "target": language, "band": band_json(band), "top_k": int(top_k), "rise": rise_settings(plan, language),
        "split": plan.split,
    }


_PNGS: dict[str, bytes] = {}  # a figure's inputs -> its PNG: stage 2 draws the same figures for every top-k


def _png(path: Path, inputs: list, draw) -> Path:
    """``draw()``'s matplotlib figure as a PNG at ``path``; the bytes of a figure of the same ``inputs`` drawn
    earlier in this process are written again instead (the importance figure is a cell's, divergence a band's)."""
    key = content_key(inputs, 24)
    if key not in _PNGS:
        if len(_PNGS) >= 256:
            _PNGS.clear()
        buf = io.BytesIO()
        draw().savefig(buf, format="png", dpi=100)
        _PNGS[key] = buf.getvalue()
    path.write_bytes(_PNGS[key])
    return path


def experts_figures(out_dir: Any, *, curves: Mapping[str, Any], moe_layers: Sequence[int], band_layers: Sequence[int],
                    en_importance: Any, tgt_importance: Any, language: str, title: str = "") -> list:
    """Two PNGs in ``out_dir``: divergence.png (divergence by MoE layer, one line per language, the
    band shaded) and importance.png (mean importance, layer × expert, English vs ``language``). Bare
    matplotlib Figures (no pyplot state) with fixed margins, not tight_layout or a tight bounding box
    (each draws the figure once more)."""
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    layers = list(moe_layers)
    curves = {lang: np.asarray(c).tolist() for lang, c in curves.items()}

    def divergence():
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for lang, c in curves.items():
            ax.plot(layers, c, marker="o", label=lang, linewidth=2.5 if lang == language else 1.2)
        if band_layers:
            ax.axvspan(min(band_layers) - 0.5, max(band_layers) + 0.5, color="tab:gray", alpha=0.2, label="band")
        ax.set_xticks(layers)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("normalised JSD to English")
        ax.set_title(title or "routing divergence")
        ax.legend(fontsize=8)
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
        return fig

    en, tg = np.asarray(to_numpy(en_importance)), np.asarray(to_numpy(tgt_importance))

    def importance():
        vmax = float(max(en.max(), tg.max()))
        fig = Figure(figsize=(8, 3.5))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, m, name in zip(axes, (en, tg), ("en", language)):
            im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"importance ({name})")
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        axes[0].set_ylabel("MoE layer")
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.15, top=0.9, wspace=0.08)
        fig.colorbar(im, ax=list(axes))
        return fig

    div = _png(out_dir / "divergence.png", ["divergence", curves, layers, list(band_layers), language, title], divergence)
    imp = _png(out_dir / "importance.png", ["importance", en.tolist(), tg.tolist(), layers, language], importance)
    return [div, imp]


def _log_mlflow(folder: Any, artifact_path: str) -> bool:
    """Logs the files of ``folder`` to the active MLflow run; nothing (and no import) without one."""
    if "mlflow" not in sys.modules:  # no run can be active in a process that never imported mlflow
        return False
    import mlflow

    if mlflow.active_run() is None:
        return False
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            mlflow.log_artifact(str(f), artifact_path=artifact_path)
    return True


def build_experts(plan: Any, cells: Mapping[str, Any], general: Any, language: str, band: Any, top_k: int) -> tuple:
    """experts.json, divergence.parquet and the figures of one (cell, band, top_k) from the taxonomy
    artefacts (``cells``: target language -> taxonomy.parquet of every language of the plan;
    ``general``: rows.parquet of the English general text). Cached under
    ``cache_dir/experts/<key>/``; returns (experts.json path, cache_hit)."""
    inputs = experts_key_inputs(plan, language, band, top_k)
    key = content_key(inputs, 24)
    final = Path(plan.cfg.cache_dir) / "experts" / key
    hit = final.is_dir()
    shape = plan.shape
    layers = list(shape.moe_layers)

    def build(tmp: Path) -> None:
        frames = {lang: pd.read_parquet(cells[lang]) for lang in plan.languages}
        first = frames[language]
        en = first[first.language == "en"].sort_values("id")
        imp_en = routing_array(en, "importance")
        imps, freqs = {}, {"en": pooled_frequency(routing_array(en, "frequency"), en.n_tokens.to_numpy())}
        for lang, df in frames.items():
            tg = df[df.language == lang].sort_values("id")
            if tg.id.tolist() != en.id.tolist():
                raise ValueError(f"taxonomy of {lang!r} is not parallel to English")
            imps[lang] = routing_array(tg, "importance")
            freqs[lang] = pooled_frequency(routing_array(tg, "frequency"), tg.n_tokens.to_numpy())
        curves = {lang: divergence_curve(imp_en, imps[lang]) for lang in plan.languages}
        if band == "auto":
            band_layers = auto_band(curves[language], layers, shape.num_layers)
        else:
            band_layers = band.layers(layers, shape.num_layers)
        if not band_layers:
            raise ValueError(f"band {band_label(band)} holds no MoE layer (MoE layers {layers})")
        correct = en.correct.to_numpy(bool)
        task_rows, used = (imp_en[correct], "correct") if correct.any() else (imp_en, "all (no correct English example)")
        gen = routing_array(pd.read_parquet(general), "importance")
        row = {l: j for j, l in enumerate(layers)}
        chosen = task_experts(task_rows, gen, band_layers, row, top_k=top_k)
        scores = task_expert_scores(task_rows, gen)
        rs = inputs["rise"]
        rise = {language: rise_select({lang: freqs[lang] for lang in rs["languages"]}, target=language,
                                      moe_layers=layers, num_layers=shape.num_layers, budget=rs["budget"],
                                      alpha=rs["alpha"])}
        art = experts_artifact(
            moe_layers=layers, band_spec=band, band_layers=band_layers,
            task_experts=chosen, task_scores=scores, rise=rise, rise_settings=rs,
            divergence=curves,
            provenance={"taxonomy": dict(plan.keys), "taxonomy_cells": dict(plan.cell_keys),
                        "general": plan.general_key, "key": key, "inputs": inputs},
        )
        art["cell"] = {"model": plan.model_cfg.name, "task": plan.task_cfg.name, "language": language,
                       "split": plan.split, "top_k": int(top_k), "n_pairs": len(en),
                       "n_task_examples": int(len(task_rows)), "task_examples": used, "n_general": int(len(gen))}
        write_json_atomic(tmp / "experts.json", art)
        pd.DataFrame([{"language": lang, "layer": l, "divergence": float(v)}
                      for lang, c in curves.items() for l, v in zip(layers, c)]).to_parquet(tmp / "divergence.parquet")
        experts_figures(tmp, curves=curves, moe_layers=layers, band_layers=band_layers,
                        en_importance=imp_en.mean(axis=0), tgt_importance=imps[language].mean(axis=0),
                        language=language,
                        title=f"{plan.model_cfg.name} / {plan.task_cfg.name}: band {band_label(band)} {band_layers}")

    atomic_dir(final, build)
    _log_mlflow(final, f"experts/{plan.model_cfg.name}/{plan.task_cfg.name}/{language}/{band_label(band)}-top{top_k}")
    return final / "experts.json", hit


def run_experts(cfg: Any, model_cfg: Any, task_cfg: Any, language: str, band: Any = None, top_k: int | None = None,
                *, split: str = "train", num_actors: int | None = None, batch_size: int | None = None) -> tuple:
    """Stage 2 for one cell and one (band, top_k) -> (experts.json, cache_hit).

    ``band``: 'auto', a config Band or a (start, end) pair (default: the config's first band);
    ``top_k`` default: the config's first. Runs (or loads) the taxonomy of English and every
    language of the config plus ``language`` (RISE compares them all) and the English general text,
    in one pass; all inputs are checked before any model runs. The folder of experts.json also holds
    divergence.parquet (language, layer, divergence) and divergence.png / importance.png; with an
    active MLflow run they are logged as its artifacts."""
    band = cfg.knobs.bands[0] if band is None else parse_band(band)
    top_k = cfg.knobs.top_k[0] if top_k is None else top_k
    langs = [language] + [l for l in cfg.languages if l != language]
    plan = taxonomy.plan(cfg, model_cfg, task_cfg, langs, split, general=True)
    if not 1 <= top_k <= plan.shape.num_experts:
        raise ConfigError(f"top_k = {top_k}: allowed 1..{plan.shape.num_experts} (experts of {model_cfg.name!r})")
    cells, general = taxonomy.execute(plan, num_actors=num_actors, batch_size=batch_size)
    return build_experts(plan, {l: p for l, (p, _) in cells.items()}, general[0], language, band, top_k)
