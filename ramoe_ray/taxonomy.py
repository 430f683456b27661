"""Stage 1: taxonomy (docs/architecture.md, "The method") — run the base model on both versions of every
example of a split, score them, label each pair cc/ci/ic/ii and record the prompt tokens' routing.

One entry function per use, config in, artefact out:

- ``run_taxonomy(cfg, model_cfg, task_cfg, language, split)`` -> (taxonomy.parquet, cache_hit);
- ``plan`` + ``execute``: the same for several languages in ONE Ray Data pass, all inputs checked by
  ``plan`` before any actor starts (the CLI plans every cell first); with ``plan(..., general=True)``
  the pass also records the routing of the English general text (rows.parquet), which the experts
  stage contrasts task routing with; ``execute_many``: several plans of one model (its tasks) in one pass,
  so an actor loads the model once for all of them (the sweep's stage 1).

The model runs in ``inference.py``: per example ONE forward pass over the prompt, under
``models.capture``, whose routing gives per MoE layer the importance and activation frequency
(``routing_stats.sequence_importance``). Multiple-choice formats read the log-likelihood of each
continuation (" A".." D", or the option texts) at the last prompt position of that forward;
generative formats decode greedily (``model.generate``), and that forward is generation's prefill.
This module plans, runs that predictor and writes the artefacts.

Artefacts (content-addressed, under ``cfg.cache_dir/taxonomy/<key>/``, written atomically):

- per language: ``rows.parquet`` + ``meta.json``. Columns: id, language, kind ("task"/"general"),
  prediction (generative: what was scored, ``tasks.generative_prediction``, or ""; multiple choice: the letter), output (the
  generated text; multiple choice: the four log-likelihoods as text), correct, answer, n_tokens
  (prompt tokens), and ``importance`` / ``frequency``: list<list<float32>> of shape
  (MoE layers × experts), row j = ``meta["moe_layers"][j]`` (``routing_array`` stacks a column into
  an (N, L, E) array). English rows are shared by every cell of the same model, task and split.
- per cell (English + target): ``taxonomy.parquet`` = both languages' rows (English first, each
  sorted by id) + ``category`` (cc/ci/ic/ii: English correctness first, target second), and
  ``meta.json`` with the counts and the keys of the two language artefacts.

The key hashes everything that determines the output (``Plan.inputs``): the configured model path,
revision and dtype plus a content hash of the model folder's files (hub ids: the revision; pin it),
the task's name/format/source (generative formats: and its scoring) plus a content hash of the
language's data file (hub datasets: the id), the split, seed and split fractions, the generation length
(generative formats), and the code version (source of this module, inference.py, tasks.py, models.py and
``routing_stats.sequence_importance``). A stage whose artefact exists loads it and runs no model.
``meta.json`` records how many prompt forwards computing it took.

Execution (``inference.map_rows``): ``num_actors`` > 0 runs Ray Data ``map_batches`` with an actor
pool of ``inference.Predictor`` (model and tokenizer loaded once per actor; on a cluster with GPUs
one actor per GPU, num_gpus=1); ``num_actors=0`` runs the same actor in this process (tests, the
bare-loop benchmark).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ramoe_ray import inference, models, tasks
from ramoe_ray.cache import atomic_dir, code_digest, content_key, file_digest, folder_digest
from ramoe_ray.config import ConfigError
from ramoe_ray.inference import MAX_NEW_TOKENS
from ramoe_ray.routing_stats import sequence_importance
from ramoe_ray.tasks import (
    DEFAULT_FRACTIONS,
    FORMATS,
    SPLITS,
    TaskDataError,
    build_prompt,
    choice_continuations,
    language_file,
    load_parallel,
    locate,
    split_ids,
)

GENERAL_LIMIT = 1000  # first documents of the general text used
CATEGORIES = ("cc", "ci", "ic", "ii")


# ---------------------------------------------------------------------------------- content hashes


def code_version() -> str:
    """Hash of the code that determines a taxonomy artefact."""
    return code_digest(sys.modules[__name__], inference, tasks, models, sequence_importance)


def _task_data_identity(task_cfg, language: str, cache_dir) -> dict:
    kind, where = locate(task_cfg.source)
    if kind == "hub":
        return {"hub": str(where)}
    path = language_file(Path(where), language)
    return {"file": path.name, "sha256": file_digest(path, cache_dir)}


def _model_identity(model_cfg, model_path: str, cache_dir) -> dict:
    ident = {"path": model_cfg.path, "revision": model_cfg.revision, "dtype": model_cfg.dtype}
    if Path(model_path).is_dir():
        ident["files"] = folder_digest(Path(model_path), cache_dir)
    else:
        ident["hub_revision"] = model_cfg.revision or "unpinned"
    return ident


# ------------------------------------------------------------------------------------------ planning


@dataclass
class Plan:
    """Everything a taxonomy run needs, checked (``plan``); no model has run yet."""

    cfg: Any
    model_cfg: Any
    task_cfg: Any
    split: str
    languages: list[str]  # target languages
    shape: models.MoEShape
    model_path: str
    examples: dict[str, list[dict]]  # language -> the split's records, English order
    keys: dict[str, str]  # language (English included) -> language-artefact key
    inputs: dict[str, dict]  # language -> what its key hashes
    cell_keys: dict[str, str]  # target language -> cell-artefact key
    max_new_tokens: int = MAX_NEW_TOKENS
    general: list[str] | None = None  # English general documents (for the experts stage)
    general_key: str | None = None
    general_inputs: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.cfg.cache_dir) / "taxonomy"


def _err(what: str, e: Exception) -> ConfigError:
    return ConfigError(f"{what}: {e}")


def general_source(task_cfg) -> Path:
    """The English general-text file of a task: ``task.general_source`` (a .jsonl with a ``text``
    field per line, or a .txt with one document per line; a synthetic-world task gets the world's own
    from sources.resolve)."""
    if task_cfg.general_source:
        p = Path(task_cfg.general_source).expanduser()
        if not p.is_file():
            raise ConfigError(f"task {task_cfg.name!r}: general_source {task_cfg.general_source!r} is not a file")
        return p
    raise ConfigError(
        f"task {task_cfg.name!r}: the experts stage needs English general text to contrast task routing with; "
        "set general_source to a local .jsonl (one {\"text\": ...} per line) or .txt (one document per line)"
    )


def read_general(path: Path, limit: int = GENERAL_LIMIT) -> list[str]:
    texts = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{path}: line {n}: not a JSON object with a 'text' field ({e})") from None
            else:
                text = line.rstrip("\n")
            if str(text).strip():
                texts.append(str(text))
            if len(texts) >= limit:
                break
    if not texts:
        raise ConfigError(f"{path}: no general text")
    return texts


def plan(cfg, model_cfg, task_cfg, languages: list[str], split: str = "train", *, general: bool = False,
         max_new_tokens: int = MAX_NEW_TOKENS) -> Plan:
    """Checks every input and computes the artefact keys; runs no model. Errors (ConfigError): a
    model that is not a supported MoE (dense, unknown family) or has no tokenizer, task data missing
    a language or not parallel, an unknown or empty split, missing general text (``general``)."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    languages = [l for l in dict.fromkeys(languages) if l != "en"]
    if not languages:
        raise ConfigError("no target language")
    try:
        shape = models.moe_shape(model_cfg)
    except (ValueError, OSError) as e:
        raise _err(f"model {model_cfg.name!r}", e) from None
    try:
        data = load_parallel(task_cfg, languages)
    except (TaskDataError, OSError) as e:
        raise _err(f"task {task_cfg.name!r}", e) from None
    ids = split_ids([ex["id"] for ex in data["en"]], seed=cfg.training.seed)
    chosen = set(ids[split])
    if not chosen:
        raise ConfigError(
            f"task {task_cfg.name!r}: split {split!r} is empty ({len(data['en'])} examples, fractions "
            f"train/validation/test {DEFAULT_FRACTIONS})"
        )
    examples = {l: [ex for ex in recs if ex["id"] in chosen] for l, recs in data.items()}

    model_path = model_cfg.path  # resolved (sources.resolve): an absolute folder or a hub id
    model_ident = _model_identity(model_cfg, model_path, cfg.cache_dir)
    code = code_version()
    inputs, keys = {}, {}
    for lang in ["en"] + languages:
        inputs[lang] = {
            "stage": "taxonomy/language", "code": code, "model": model_ident,
            "task": {"name": task_cfg.name, "format": task_cfg.format, "source": task_cfg.source,
                     "choices": task_cfg.choices if FORMATS[task_cfg.format]["output"] == "loglikelihood" else None,
                     "scoring": task_cfg.scoring if FORMATS[task_cfg.format]["output"] == "generate" else None,
                     "data": _task_data_identity(task_cfg, lang, cfg.cache_dir)},
            "language": lang, "split": split, "seed": cfg.training.seed, "fractions": list(DEFAULT_FRACTIONS),
            # the generation length matters only where the format generates
            "max_new_tokens": max_new_tokens if FORMATS[task_cfg.format]["output"] == "generate" else None,
        }
        keys[lang] = content_key(inputs[lang], 24)
    cell_keys = {l: content_key({"stage": "taxonomy/cell", "code": code, "en": keys["en"], "target": keys[l]}, 24)
                 for l in languages}
    p = Plan(cfg, model_cfg, task_cfg, split, languages, shape, model_path, examples, keys, inputs, cell_keys,
             max_new_tokens)
    if general:
        src = general_source(task_cfg)
        p.general = read_general(src)
        p.general_inputs = {"stage": "taxonomy/general", "code": code, "model": model_ident, "source": src.name,
                            "sha256": file_digest(src, cfg.cache_dir), "limit": GENERAL_LIMIT}
        p.general_key = content_key(p.general_inputs, 24)
    return p


# ----------------------------------------------------------------------------------------- running


def rows_frame(plan: Plan, languages: list[str], with_general: bool) -> pd.DataFrame:
    """The predictor's input rows (``inference`` module docstring) of ``languages``' examples and,
    with ``with_general``, of the plan's general text; sorted by prompt length."""
    rows = []
    for lang in languages:
        for ex in plan.examples[lang]:
            rows.append(dict(id=ex["id"], language=lang, kind="task", fmt=plan.task_cfg.format,
                             prompt=build_prompt(ex, plan.task_cfg.format), answer=ex["answer"],
                             scoring=plan.task_cfg.scoring,
                             continuations=choice_continuations(ex, plan.task_cfg.choices) if ex["choices"] else []))
    if with_general:
        for i, text in enumerate(plan.general or []):
            rows.append(dict(id=f"general-{i:05d}", language="en", kind="general", fmt="", prompt=text, answer="",
                             scoring="", continuations=[]))
    df = pd.DataFrame(rows)
    # similar lengths batch together (less padding); results do not depend on the order
    return df.iloc[np.argsort(df["prompt"].str.len().to_numpy(), kind="stable")].reset_index(drop=True)


def predictor_kwargs(plan: Plan) -> dict:
    """The arguments of ``inference.Predictor`` for a plan's model (plain data: they travel to Ray actors)."""
    return dict(model_path=plan.model_path, model_cfg=plan.model_cfg.model_dump(), k=plan.shape.experts_per_token,
                max_new_tokens=plan.max_new_tokens)


def _to_table(df: pd.DataFrame):
    import pyarrow as pa

    cols = {c: df[c].tolist() for c in df.columns if c not in ("importance", "frequency")}
    table = pa.table(cols)
    for c in ("importance", "frequency"):
        table = table.append_column(c, pa.array([np.asarray(a, dtype=np.float32).tolist() for a in df[c]],
                                                type=pa.list_(pa.list_(pa.float32()))))
    return table


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Predictor rows as parquet, ``importance`` / ``frequency`` as list<list<float32>>."""
    import pyarrow.parquet as pq

    pq.write_table(_to_table(df), path)


def routing_array(df: pd.DataFrame, column: str = "importance") -> np.ndarray:
    """An (N, L, E) float32 array of a per-row routing column (``importance`` or ``frequency``)."""
    if len(df) == 0:
        raise ValueError("no rows")
    return np.stack([np.stack([np.asarray(r, dtype=np.float32) for r in x]) for x in df[column]])


def _shape_meta(plan: Plan) -> dict:
    s = plan.shape
    return {"family": s.family, "num_layers": s.num_layers, "num_experts": s.num_experts,
            "experts_per_token": s.experts_per_token, "moe_layers": list(s.moe_layers)}


def _write_meta(tmp: Path, meta: dict) -> None:
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def categories(en_correct: pd.Series, tgt_correct: pd.Series) -> pd.Series:
    """cc/ci/ic/ii per id: English correctness first letter, target second (both indexed by id)."""
    en = en_correct.astype(bool)
    tg = tgt_correct.reindex(en.index).astype(bool)
    return en.map({True: "c", False: "i"}) + tg.map({True: "c", False: "i"})


def _write_rows(folder: Path, part: pd.DataFrame, meta: dict) -> None:
    """A language or general-text artefact: rows.parquet + meta.json, atomically."""

    def build(tmp: Path) -> None:
        write_parquet(part, tmp / "rows.parquet")
        _write_meta(tmp, meta)

    atomic_dir(folder, build)


def _todo(plan: Plan, cells: bool) -> tuple[list[str], list[str], bool]:
    """What of a plan is missing: (target languages without their cell artefact, languages whose rows must
    be predicted, whether the general text must be)."""
    root = plan.root
    missing = [l for l in (plan.languages if cells else []) if not (root / plan.cell_keys[l]).is_dir()]
    need = [x for x in (["en"] if missing else []) + missing if not (root / plan.keys[x]).is_dir()]
    need_general = plan.general is not None and not (root / plan.general_key).is_dir()
    return missing, need, need_general


def _predict_missing(work: list[tuple[Plan, list[str], bool]], *, num_actors: int, batch_size: int,
                     cpus_per_actor: float) -> None:
    """One predictor pass (one actor pool: one model load per actor) over every plan's missing languages
    and general text; writes their artefacts. ``work``: (plan, languages, general?) of plans of one model."""
    kwargs = predictor_kwargs(work[0][0])
    if any(predictor_kwargs(p) != kwargs for p, _, _ in work):
        raise ValueError("plans predicted in one pass must share the model and the generation length")
    frames, general_part = [], {}  # general-text key -> the part whose rows carry it (tasks may share it)
    for i, (p, need, need_general) in enumerate(work):
        with_general = need_general and p.general_key not in general_part
        if with_general:
            general_part[p.general_key] = i
        frames.append(rows_frame(p, need, with_general).assign(part=i))
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.iloc[np.argsort(rows["prompt"].str.len().to_numpy(), kind="stable")].reset_index(drop=True)
    t0 = time.time()
    out = inference.map_rows(rows, inference.Predictor, kwargs, num_actors=num_actors, batch_size=batch_size,
                             cpus_per_actor=cpus_per_actor)
    seconds = time.time() - t0
    if len(out) != len(rows):
        raise RuntimeError(f"predictor returned {len(out)} rows for {len(rows)}")
    out = out.sort_values(["part", "language", "id"], kind="stable").reset_index(drop=True)
    run = {"seconds_total": seconds, "rows_total": len(rows), "plans": len(work), "num_actors": num_actors,
           "batch_size": batch_size}
    for i, (p, need, need_general) in enumerate(work):
        general = None
        if need_general:
            rows_of = out[(out.part == general_part[p.general_key]) & (out.kind == "general")]
            general = rows_of.drop(columns="part").reset_index(drop=True)
        _write_predicted(p, out[out.part == i].drop(columns="part"), need, general, run)


def _write_predicted(plan: Plan, out: pd.DataFrame, need: list[str], general: pd.DataFrame | None, run: dict) -> None:
    """The language artefacts of ``need`` (and the general text's) from one plan's predicted rows."""
    for lang in need:
        part = out[(out.kind == "task") & (out.language == lang)].reset_index(drop=True)
        _write_rows(plan.root / plan.keys[lang], part, {
            "kind": "language", "key": plan.keys[lang], "inputs": plan.inputs[lang], "n": len(part),
            "forwards": len(part), "accuracy": float(part.correct.mean()), **_shape_meta(plan), "run": run})
    if general is not None:
        _write_rows(plan.root / plan.general_key, general, {
            "kind": "general", "key": plan.general_key, "inputs": plan.general_inputs, "n": len(general),
            "forwards": len(general), **_shape_meta(plan), "run": run})


def _write_cell(plan: Plan, lang: str, computed: list[str]) -> None:
    """The cell artefact of ``lang``: both languages' rows + category, from the language artefacts."""
    root = plan.root
    en = pd.read_parquet(root / plan.keys["en"] / "rows.parquet")
    tg = pd.read_parquet(root / plan.keys[lang] / "rows.parquet")
    cat = categories(en.set_index("id").correct, tg.set_index("id").correct)
    df = pd.concat([en, tg], ignore_index=True)
    df["category"] = df["id"].map(cat)
    meta = {"kind": "cell", "key": plan.cell_keys[lang], "model": plan.model_cfg.name,
            "task": plan.task_cfg.name, "language": lang, "split": plan.split, "n": len(cat),
            "counts": {c: int((cat == c).sum()) for c in CATEGORIES},
            "inputs": {"en": plan.keys["en"], lang: plan.keys[lang]},
            "computed": {x: x in computed for x in ("en", lang)}, **_shape_meta(plan)}

    def build(tmp: Path) -> None:
        df.to_parquet(tmp / "taxonomy.parquet")  # the rows' list columns keep their arrow types
        _write_meta(tmp, meta)

    atomic_dir(root / plan.cell_keys[lang], build)


def execute(plan: Plan, *, num_actors: int | None = None, batch_size: int | None = None,
            cpus_per_actor: float = 1.0, cells: bool = True
            ) -> tuple[dict[str, tuple[Path, bool]], tuple[Path, bool] | None]:
    """Computes what is missing of a plan in one pass (one actor pool) and writes the artefacts.

    Returns ({target language: (taxonomy.parquet, cache_hit)} (empty when ``cells`` is False),
    (general rows.parquet, cache_hit) or None when the plan has no general text). cache_hit: the
    artefact already existed, so nothing was computed for it."""
    return execute_many([plan], num_actors=num_actors, batch_size=batch_size, cpus_per_actor=cpus_per_actor,
                        cells=cells)[0]


def execute_many(plans: list[Plan], *, num_actors: int | None = None, batch_size: int | None = None,
                 cpus_per_actor: float = 1.0, cells: bool = True) -> list[tuple[dict, tuple[Path, bool] | None]]:
    """``execute`` of several plans of ONE model (e.g. its tasks) in one predictor pass: one actor pool, so
    one model load per actor for all of them rather than per plan. ``batch_size``: rows per forward, by
    default the config's ``training.eval_batch_size`` (results do not depend on it). Returns ``execute``'s
    result per plan."""
    if not plans:
        return []
    num_actors = plans[0].cfg.resources.inference_actors if num_actors is None else num_actors
    batch_size = batch_size or plans[0].cfg.training.eval_batch_size
    todo = [_todo(p, cells) for p in plans]
    work = [(p, need, need_general) for p, (_, need, need_general) in zip(plans, todo) if need or need_general]
    if work:
        _predict_missing(work, num_actors=num_actors, batch_size=batch_size,
                         cpus_per_actor=cpus_per_actor)
    results = []
    for p, (missing, need, need_general) in zip(plans, todo):
        for lang in missing:
            _write_cell(p, lang, need)
        targets = p.languages if cells else []
        out_cells = {l: (p.root / p.cell_keys[l] / "taxonomy.parquet", l not in missing) for l in targets}
        general = None if p.general is None else (p.root / p.general_key / "rows.parquet", not need_general)
        results.append((out_cells, general))
    return results


# ------------------------------------------------------------------------------------- entry points


def run_taxonomy(cfg, model_cfg, task_cfg, language: str, split: str = "train", *, num_actors: int | None = None,
                 batch_size: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[Path, bool]:
    """Stage 1 for one cell (model, task, language) on one split -> (taxonomy.parquet, cache_hit)."""
    p = plan(cfg, model_cfg, task_cfg, [language], split, max_new_tokens=max_new_tokens)
    cells, _ = execute(p, num_actors=num_actors, batch_size=batch_size)
    return cells[language]


def summary(path: str | os.PathLike) -> dict:
    """n pairs and cc/ci/ic/ii proportions of a cell artefact (from its meta.json)."""
    meta = json.loads((Path(path).parent / "meta.json").read_text())
    n = meta["n"]
    return {"n": n, **{c: meta["counts"][c] / n for c in CATEGORIES}}
