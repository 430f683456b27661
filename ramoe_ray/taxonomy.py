"""Stage 1: taxonomy (DESIGN.md, "The method" 1) — run the base model on both versions of every
example of a split, score them, label each pair cc/ci/ic/ii and record the prompt tokens' routing.

One entry function per use, config in, artefact out:

- ``run_taxonomy(cfg, model_cfg, task_cfg, language, split)`` -> (taxonomy.parquet, cache_hit);
- ``run_general(cfg, model_cfg, task_cfg)`` -> (rows.parquet of English general text, cache_hit),
  the routing the experts stage contrasts task routing with;
- ``plan`` + ``execute``: the same for several languages (and the general text) in ONE Ray Data pass,
  all inputs checked by ``plan`` before any actor starts (the CLI plans every cell first).

Per example the model makes ONE forward pass over the prompt (right padding, attention mask, each
row's last real position), under ``models.capture``; the routing of that pass gives, per MoE layer,
the importance and activation frequency (``experts.sequence_importance``). Then, with the KV cache
of that pass: generative formats decode greedily (``greedy_continue``: the cache is left-aligned per
row and each row continues at its own position, padding masked, so a row's text does not depend on
its batch, sliding-window layers included); multiple-choice formats
read the log-likelihood of each continuation " A".." D" at the last prompt position (a continuation
that tokenises to several tokens is scored by a second, scoring-only forward, ``full_logliks``).

Artefacts (content-addressed, under ``cfg.cache_dir/taxonomy/<key>/``, written atomically):

- per language: ``rows.parquet`` + ``meta.json``. Columns: id, language, kind ("task"/"general"),
  prediction (generative: the extracted number or ""; multiple choice: the letter), output (the
  generated text; multiple choice: the four log-likelihoods as text), correct, answer, n_tokens
  (prompt tokens), and ``importance`` / ``frequency``: list<list<float32>> of shape
  (MoE layers × experts), row j = ``meta["moe_layers"][j]`` (``routing_array`` stacks a column into
  an (N, L, E) array). English rows are shared by every cell of the same model, task and split.
- per cell (English + target): ``taxonomy.parquet`` = both languages' rows (English first, each
  sorted by id) + ``category`` (cc/ci/ic/ii: English correctness first, target second), and
  ``meta.json`` with the counts and the keys of the two language artefacts.

The key hashes everything that determines the output (``Plan.inputs``): the configured model path,
revision and dtype plus a content hash of the model folder's files (hub ids: the revision; pin it),
the task's name/format/source plus a content hash of the language's data file (hub datasets: the
id), the split, seed and split fractions, the generation length (generative formats), and the code version (source of
this module, tasks.py, models.py and ``experts.sequence_importance``). A stage whose artefact exists
loads it and runs no model. ``meta.json`` records how many prompt forwards computing it took.

Execution: ``num_actors`` > 0 runs Ray Data ``map_batches`` with an actor pool of ``Predictor``
(model and tokenizer loaded once per actor; on a cluster with GPUs one actor per GPU, num_gpus=1);
``num_actors=0`` runs the same ``predict_rows`` in this process (tests, the bare-loop benchmark).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ramoe_ray import models as M
from ramoe_ray.cache import atomic_dir
from ramoe_ray.config import ConfigError
from ramoe_ray.tasks import (
    DEFAULT_FRACTIONS,
    FORMATS,
    SPLITS,
    TaskDataError,
    build_prompt,
    choice_continuations,
    extract_number,
    load_parallel,
    score_choices,
    score_generative,
    split_ids,
)

MAX_NEW_TOKENS = 16  # greedy generation length of generative formats
# Generation stops at the model's eos token or at the first of these strings (the text is cut
# there): lm-eval's MGSM stops at a new line; "Question:" ends a model that starts the next problem.
STOP_STRINGS = ("\n", "Question:")
BATCH_SIZE = 8
PRESET_VOCAB = 1024  # vocabulary of the BPE tokenizer trained for a tiny preset (and of the preset)
GENERAL_LIMIT = 1000  # first documents of the general text used
GENERAL_MAX_TOKENS = 256  # general documents are truncated to this many tokens
CATEGORIES = ("cc", "ci", "ic", "ii")

FORWARDS = 0  # prompt forwards (examples) run by predict_batch in THIS process (Ray actors count their own)


# -------------------------------------------------------------------------------- model, tokenizer


def _texts_for_tokenizer(examples: dict[str, list[dict]], fmt: str) -> list[str]:
    out = []
    for lang in sorted(examples):
        for ex in examples[lang]:
            out.append(f"{build_prompt(ex, fmt)} {ex['answer']}")
    return out


def preset_folder(family: str, texts: list[str], cache_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny preset of ``family`` with a BPE tokenizer trained on ``texts`` (``tokenizer.py``),
    the model's vocabulary sized to the tokenizer (PRESET_VOCAB). Cached under a hash of the texts,
    the preset's config and the seed; the folder loads with AutoTokenizer / AutoModelForCausalLM."""
    from ramoe_ray.tokenizer import train_tokenizer

    config = M.tiny_config(family, vocab_size=PRESET_VOCAB)
    h = hashlib.sha256(json.dumps([config.to_dict(), seed, PRESET_VOCAB], sort_keys=True, default=str).encode())
    for t in texts:
        h.update(t.encode() + b"\x00")

    def build(tmp: Path) -> None:
        train_tokenizer(texts, vocab_size=PRESET_VOCAB, out_dir=tmp)
        M.build_tiny(family, seed=seed, vocab_size=PRESET_VOCAB).save_pretrained(tmp)

    return atomic_dir(Path(cache_dir) / "presets" / f"{family}-bpe-{h.hexdigest()[:16]}", build)


def load_model_and_tokenizer(model_path: str, model_cfg, device: str = "cpu"):
    """Model (eval, on ``device``) and tokenizer (right padding) from a resolved folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_cfg.dtype), **kw)
    model = model.to(device).eval()
    model.config.output_router_logits = False  # inference: no load-balancing loss
    tok = AutoTokenizer.from_pretrained(model_path, **kw)
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # any id works: padded positions are masked
    return model, tok


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------- one batch of rows


def _eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}


def cut_at_stop(text: str) -> str:
    """The generated text up to the first stop string (STOP_STRINGS)."""
    cut = len(text)
    for s in STOP_STRINGS:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def left_align(past_key_values, attention_mask: torch.Tensor) -> torch.Tensor:
    """Moves each row's cached prompt keys/values from the left (right padding) to the right end of
    the cache, in place, and returns the matching left-padded attention mask. Keys keep the rotary
    positions of the prompt pass, so afterwards the distance between cache slots equals the distance
    between positions for every row: sliding-window layers (GPT-OSS) then see exactly the tokens
    they would see without padding. Needs a cache that kept every position (``DynamicCache()``)."""
    t = attention_mask.shape[1]
    shift = t - attention_mask.sum(1)  # padding of each row
    slots = torch.arange(t, device=attention_mask.device)
    src = (slots[None, :] - shift[:, None]) % t  # new slot s holds old slot s - shift (pads wrap to the left)
    for layer in past_key_values.layers:
        for name in ("keys", "values"):
            x = getattr(layer, name)
            if x.shape[-2] != t:
                raise ValueError(f"cache holds {x.shape[-2]} positions, the prompts {t}: use a full DynamicCache()")
            setattr(layer, name, x.gather(2, src[:, None, :, None].expand_as(x)))
    return (slots[None, :] >= shift[:, None]).to(attention_mask.dtype)


@torch.no_grad()
def greedy_continue(model, tok, past_key_values, first_tokens: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int) -> list[str]:
    """Greedy decoding after the right-padded prompt forward, reusing its KV cache (no second pass
    over the prompt).

    The cache is first left-aligned (``left_align``); row b then continues at position len_b (its
    own prompt length, ``position_ids`` explicit) with its padding masked, so its text equals that of
    the row decoded alone. A row stops at an eos token or once its text holds a stop string; the
    batch stops when every row has. Returns the decoded texts cut at the first stop string."""
    b = first_tokens.shape[0]
    lengths = attention_mask.sum(1)
    eos = _eos_ids(model, tok)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    nxt, cache = first_tokens, past_key_values
    attn = left_align(cache, attention_mask)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
            else:
                out[i].append(t)
                text = tok.decode(out[i], skip_special_tokens=True)
                done[i] = cut_at_stop(text) != text
        if all(done) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(b, 1)], dim=1)
        o = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=(lengths + step)[:, None],
                  past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        nxt = o.logits[:, -1].argmax(-1)
    return [cut_at_stop(tok.decode(ids, skip_special_tokens=True)) for ids in out]


def continuation_ids(tok, prompt_ids: list[int], prompt: str, continuation: str, whole: list[int] | None = None) -> list[int]:
    """Token ids of ``continuation`` after ``prompt``, as lm-eval: encode prompt + continuation and
    take what follows the prompt's own ids (falls back to the continuation alone when the two
    tokenisations disagree on the prefix). ``whole``: the ids of prompt + continuation, if known."""
    whole = tok(prompt + continuation)["input_ids"] if whole is None else whole
    if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        return whole[len(prompt_ids):]
    return tok(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def full_logliks(model, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
    """Summed log-likelihood of each continuation after the prompt, by a forward over prompt +
    continuation (one right-padded batch of the continuations; scoring only, no capture)."""
    seqs = [prompt_ids + c for c in conts]
    width = max(map(len, seqs))
    dev = model.device
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=dev)
        mask[i, : len(s)] = 1
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    n = len(prompt_ids)
    return [float(sum(logp[i, n - 1 + j, t] for j, t in enumerate(c))) for i, c in enumerate(conts)]


@torch.no_grad()
def routing_forward(model, ids: torch.Tensor, mask: torch.Tensor, *, k: int, use_cache: bool = False):
    """THE forward pass over right-padded prompts, under ``models.capture``. Returns (importance,
    frequency) as (B, L, E) float32 numpy (``experts.sequence_importance`` of the captured routing),
    the (B, V) log-probabilities of the next token after each row's last real position, and the KV
    cache (``use_cache``) for generation."""
    global FORWARDS
    from ramoe_ray.experts import sequence_importance

    last = mask.sum(1) - 1
    from transformers import DynamicCache

    # a cache without the config keeps every position in every layer (no sliding-window cropping),
    # which greedy_continue's left_align needs
    cache = DynamicCache() if use_cache else None
    with M.capture(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=use_cache,
                    logits_to_keep=last[:, None])
    FORWARDS += ids.shape[0]
    routing = rec.routing(mask)
    importance, frequency = sequence_importance(routing.probs(), routing.selected, routing.mask, k=k)
    logp = out.logits[:, -1].float().log_softmax(-1)
    return importance, frequency, logp, (out.past_key_values if use_cache else None)


@torch.no_grad()
def predict_batch(model, tok, rows: list[dict], *, fmt: str | None, k: int, max_new_tokens: int = MAX_NEW_TOKENS,
                  max_length: int | None = None) -> list[dict]:
    """One batch of rows of ONE format (``fmt`` None: routing only, as for general text).

    rows: dicts with ``prompt`` (and ``answer``, and ``continuations`` (tasks.choice_continuations in
    the task's ``choices`` mode) for multiple choice). One forward
    over the right-padded prompts (``routing_forward``) gives each row's importance/frequency (L, E)
    and its last-position log-probabilities; then generation or choice scoring (module docstring).
    Returns one dict per row: prediction, output, correct, n_tokens, importance, frequency."""
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, truncation=max_length is not None,
              max_length=max_length)
    ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    lengths = mask.sum(1).tolist()
    generate = fmt is not None and FORMATS[fmt]["output"] == "generate"
    importance, frequency, logp, cache = routing_forward(model, ids, mask, k=k, use_cache=generate)

    n = len(rows)
    preds, outputs, correct = [""] * n, [""] * n, [False] * n
    if generate:
        outputs = greedy_continue(model, tok, cache, logp.argmax(-1), mask, max_new_tokens)
        preds = [extract_number(t) or "" for t in outputs]
        correct = score_generative(outputs, [r["answer"] for r in rows])
    elif fmt is not None:
        texts = [[r["prompt"] + c for c in r["continuations"]] for r in rows]
        whole = iter(tok([t for ts in texts for t in ts])["input_ids"])  # one batched tokenizer call
        lls = []
        for i, r in enumerate(rows):
            p_ids = ids[i, : lengths[i]].tolist()
            conts = [continuation_ids(tok, p_ids, r["prompt"], t[len(r["prompt"]):], next(whole)) for t in texts[i]]
            if all(len(c) == 1 for c in conts):
                lls.append([float(logp[i, c[0]]) for c in conts])
            else:
                lls.append(full_logliks(model, p_ids, conts))
        preds, correct = score_choices(lls, [r["answer"] for r in rows])
        outputs = [json.dumps([round(x, 6) for x in ll]) for ll in lls]
    return [
        dict(prediction=preds[i], output=outputs[i], correct=bool(correct[i]), n_tokens=lengths[i],
             importance=importance[i], frequency=frequency[i])
        for i in range(n)
    ]


def predict_rows(model, tok, rows: list[dict], *, k: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """``predict_batch`` over rows that may mix formats (``fmt`` column; "" = general text), in
    order; each output dict also carries the row's id, language and kind."""
    out: list[dict | None] = [None] * len(rows)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["fmt"], []).append(i)
    for fmt, idx in groups.items():
        res = predict_batch(model, tok, [rows[i] for i in idx], fmt=fmt or None, k=k, max_new_tokens=max_new_tokens,
                            max_length=None if fmt else GENERAL_MAX_TOKENS)
        for i, r in zip(idx, res):
            out[i] = {"id": rows[i]["id"], "language": rows[i]["language"], "kind": rows[i]["kind"],
                      "answer": rows[i]["answer"], **r}
    return out  # type: ignore[return-value]


class Predictor:
    """Ray Data actor: model and tokenizer loaded once in __init__, then ``predict_rows`` per batch."""

    def __init__(self, model_path: str, model_cfg: dict, k: int, max_new_tokens: int, device: str = "cpu",
                 threads: int | None = None):
        from ramoe_ray.config import ModelConfig

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_model_and_tokenizer(model_path, ModelConfig(**model_cfg), device)
        self.k, self.max_new_tokens = k, max_new_tokens

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        return pd.DataFrame(predict_rows(self.model, self.tok, rows, k=self.k, max_new_tokens=self.max_new_tokens))


# ---------------------------------------------------------------------------------- content hashes


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path, cache_dir: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised under ``cache_dir/hashes`` by (absolute path, size,
    mtime_ns): a multi-GB weight file is read once, not at every run."""
    path = Path(path).resolve()
    st = path.stat()
    memo = Path(cache_dir) / "hashes" / _sha([str(path), st.st_size, st.st_mtime_ns])[:32]
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def folder_digest(folder: Path, cache_dir: str | os.PathLike) -> str:
    """Content hash of every file under ``folder`` (names starting with '.' skipped)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return _sha([[str(p.relative_to(folder)), file_digest(p, cache_dir)] for p in files])


def code_version() -> str:
    """Hash of the code that determines a taxonomy artefact."""
    from ramoe_ray import experts, models, tasks

    h = hashlib.sha256()
    for source in (__file__, tasks.__file__, models.__file__):
        h.update(Path(source).read_bytes())
    h.update(inspect.getsource(experts.sequence_importance).encode())
    return h.hexdigest()[:16]


def _task_data_identity(task_cfg, language: str, cache_dir) -> dict:
    from ramoe_ray.tasks import _language_file, _where

    kind, where = _where(task_cfg.source, None, cache_dir)
    if kind == "hub":
        return {"hub": str(where)}
    path = _language_file(Path(where), language)
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
    shape: M.MoEShape
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


def general_source(cfg, task_cfg) -> Path:
    """The English general-text file of a task: ``task.general_source`` (a .jsonl with a ``text``
    field per line, or a .txt with one document per line), or the synthetic world's own."""
    from ramoe_ray import synthetic

    if task_cfg.general_source:
        p = Path(task_cfg.general_source).expanduser()
        if not p.is_file():
            raise ConfigError(f"task {task_cfg.name!r}: general_source {task_cfg.general_source!r} is not a file")
        return p
    world = synthetic.parse_scheme(task_cfg.source)
    if world is not None:
        return synthetic.general_file(world[0], "en", cfg.cache_dir)
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
        shape = M.moe_shape(model_cfg)
    except (ValueError, OSError) as e:
        raise _err(f"model {model_cfg.name!r}", e) from None
    try:
        data = load_parallel(task_cfg, languages, cache_dir=cfg.cache_dir)
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

    if (family := M.preset_family(model_cfg.path)) is not None:
        # the tokenizer learns every language of the config (all splits), so that each cell of a
        # config uses the same preset, whichever cells a call runs
        every = [l for l in cfg.languages if l not in data]
        try:
            texts_of = {**data, **(load_parallel(task_cfg, every, cache_dir=cfg.cache_dir) if every else {})}
        except (TaskDataError, OSError) as e:
            raise _err(f"task {task_cfg.name!r}", e) from None
        model_path = str(preset_folder(family, _texts_for_tokenizer(texts_of, task_cfg.format), cfg.cache_dir))
    else:
        try:
            model_path = M.resolve_model_path(model_cfg, cfg.cache_dir)
        except (ValueError, OSError) as e:
            raise _err(f"model {model_cfg.name!r}", e) from None
        if Path(model_path).is_dir() and not _has_tokenizer(Path(model_path)):
            raise ConfigError(f"model {model_cfg.name!r}: folder {model_path} has no tokenizer (tokenizer.json or "
                              "tokenizer_config.json)")
    budget_cap = len(shape.moe_layers) * shape.num_experts
    if cfg.rise.budget > budget_cap:
        raise ConfigError(f"rise.budget = {cfg.rise.budget}: larger than the {budget_cap} (layer, expert) pairs of "
                          f"model {model_cfg.name!r}")

    model_ident = _model_identity(model_cfg, model_path, cfg.cache_dir)
    code = code_version()
    inputs, keys = {}, {}
    for lang in ["en"] + languages:
        inputs[lang] = {
            "stage": "taxonomy/language", "code": code, "model": model_ident,
            "task": {"name": task_cfg.name, "format": task_cfg.format, "source": task_cfg.source,
                     "choices": task_cfg.choices if FORMATS[task_cfg.format]["output"] == "loglikelihood" else None,
                     "data": _task_data_identity(task_cfg, lang, cfg.cache_dir)},
            "language": lang, "split": split, "seed": cfg.training.seed, "fractions": list(DEFAULT_FRACTIONS),
            # the generation length matters only where the format generates
            "max_new_tokens": max_new_tokens if FORMATS[task_cfg.format]["output"] == "generate" else None,
        }
        keys[lang] = _sha(inputs[lang])[:24]
    cell_keys = {l: _sha({"stage": "taxonomy/cell", "code": code, "en": keys["en"], "target": keys[l]})[:24]
                 for l in languages}
    p = Plan(cfg, model_cfg, task_cfg, split, languages, shape, model_path, examples, keys, inputs, cell_keys,
             max_new_tokens)
    if general:
        src = general_source(cfg, task_cfg)
        p.general = read_general(src)
        p.general_inputs = {"stage": "taxonomy/general", "code": code, "model": model_ident, "source": src.name,
                            "sha256": file_digest(src, cfg.cache_dir), "limit": GENERAL_LIMIT}
        p.general_key = _sha(p.general_inputs)[:24]
    return p


# ----------------------------------------------------------------------------------------- running


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins the cluster; otherwise a local instance
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


def _rows_frame(plan: Plan, languages: list[str], with_general: bool) -> pd.DataFrame:
    rows = []
    for lang in languages:
        for ex in plan.examples[lang]:
            rows.append(dict(id=ex["id"], language=lang, kind="task", fmt=plan.task_cfg.format,
                             prompt=build_prompt(ex, plan.task_cfg.format), answer=ex["answer"],
                             continuations=choice_continuations(ex, plan.task_cfg.choices) if ex["choices"] else []))
    if with_general:
        for i, text in enumerate(plan.general or []):
            rows.append(dict(id=f"general-{i:05d}", language="en", kind="general", fmt="", prompt=text, answer="",
                             continuations=[]))
    df = pd.DataFrame(rows)
    # similar lengths batch together (less padding); results do not depend on the order
    return df.iloc[np.argsort(df["prompt"].str.len().to_numpy(), kind="stable")].reset_index(drop=True)


def _predict_rows(plan: Plan, rows: pd.DataFrame, *, num_actors: int, batch_size: int,
                  cpus_per_actor: float = 1.0) -> pd.DataFrame:
    """Runs the predictor over ``rows``: Ray Data actor pool (num_actors > 0) or in-process (0)."""
    k = plan.shape.experts_per_token
    if num_actors == 0:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = load_model_and_tokenizer(plan.model_path, plan.model_cfg, device)
        recs = rows.to_dict("records")
        out = []
        for i in range(0, len(recs), batch_size):
            out += predict_rows(model, tok, recs[i : i + batch_size], k=k, max_new_tokens=plan.max_new_tokens)
        return pd.DataFrame(out)

    import ray

    _ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n_blocks = max(1, min(len(rows), 4 * num_actors))
    blocks = [b for b in np.array_split(np.arange(len(rows)), n_blocks) if len(b)]
    ds = ray.data.from_pandas([rows.iloc[b] for b in blocks])
    kwargs = dict(model_path=plan.model_path, model_cfg=plan.model_cfg.model_dump(), k=k,
                  max_new_tokens=plan.max_new_tokens)
    if gpus:  # one actor per GPU (``inference_actors`` is the CPU pool size)
        num_actors = gpus
        res = dict(num_gpus=1)
        kwargs["device"] = "cuda"
    else:
        res = dict(num_cpus=cpus_per_actor)
        kwargs["threads"] = max(1, int(cpus_per_actor))
    out = ds.map_batches(Predictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=num_actors),
                         batch_size=batch_size, batch_format="pandas", **res)
    return out.to_pandas()


def _to_table(df: pd.DataFrame):
    import pyarrow as pa

    cols = {c: df[c].tolist() for c in df.columns if c not in ("importance", "frequency")}
    table = pa.table(cols)
    for c in ("importance", "frequency"):
        table = table.append_column(c, pa.array([np.asarray(a, dtype=np.float32).tolist() for a in df[c]],
                                                type=pa.list_(pa.list_(pa.float32()))))
    return table


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
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


def execute(plan: Plan, *, num_actors: int | None = None, batch_size: int | None = None,
            cpus_per_actor: float = 1.0, cells: bool = True
            ) -> tuple[dict[str, tuple[Path, bool]], tuple[Path, bool] | None]:
    """Computes what is missing of a plan in one pass (one actor pool) and writes the artefacts.

    Returns ({target language: (taxonomy.parquet, cache_hit)} (empty when ``cells`` is False),
    (general rows.parquet, cache_hit) or None when the plan has no general text). cache_hit: the
    artefact already existed, so nothing was computed for it."""
    root = plan.root
    num_actors = plan.cfg.resources.inference_actors if num_actors is None else num_actors
    batch_size = batch_size or BATCH_SIZE
    targets = plan.languages if cells else []
    cell_hit = {l: (root / plan.cell_keys[l]).is_dir() for l in targets}
    missing = [l for l in targets if not cell_hit[l]]
    need = [x for x in (["en"] if missing else []) + missing if not (root / plan.keys[x]).is_dir()]
    need_general = plan.general is not None and not (root / plan.general_key).is_dir()

    if need or need_general:
        rows = _rows_frame(plan, need, need_general)
        t0 = time.time()
        out = _predict_rows(plan, rows, num_actors=num_actors, batch_size=batch_size, cpus_per_actor=cpus_per_actor)
        seconds = time.time() - t0
        if len(out) != len(rows):
            raise RuntimeError(f"predictor returned {len(out)} rows for {len(rows)}")
        out = out.sort_values(["language", "id"], kind="stable").reset_index(drop=True)
        run = {"seconds_total": seconds, "rows_total": len(rows), "num_actors": num_actors, "batch_size": batch_size}
        for lang in need:
            part = out[(out.kind == "task") & (out.language == lang)].reset_index(drop=True)
            meta = {"kind": "language", "key": plan.keys[lang], "inputs": plan.inputs[lang], "n": len(part),
                    "forwards": len(part), "accuracy": float(part.correct.mean()), **_shape_meta(plan), "run": run}

            def build(tmp: Path, part=part, meta=meta) -> None:
                _write_parquet(part, tmp / "rows.parquet")
                _write_meta(tmp, meta)

            atomic_dir(root / plan.keys[lang], build)
        if need_general:
            part = out[out.kind == "general"].reset_index(drop=True)
            meta = {"kind": "general", "key": plan.general_key, "inputs": plan.general_inputs, "n": len(part),
                    "forwards": len(part), **_shape_meta(plan), "run": run}

            def build_general(tmp: Path) -> None:
                _write_parquet(part, tmp / "rows.parquet")
                _write_meta(tmp, meta)

            atomic_dir(root / plan.general_key, build_general)

    out_cells = {}
    for lang in targets:
        final = root / plan.cell_keys[lang]
        if not cell_hit[lang]:
            en = pd.read_parquet(root / plan.keys["en"] / "rows.parquet")
            tg = pd.read_parquet(root / plan.keys[lang] / "rows.parquet")
            cat = categories(en.set_index("id").correct, tg.set_index("id").correct)
            df = pd.concat([en, tg], ignore_index=True)
            df["category"] = df["id"].map(cat)
            counts = {c: int((cat == c).sum()) for c in CATEGORIES}
            meta = {"kind": "cell", "key": plan.cell_keys[lang], "model": plan.model_cfg.name,
                    "task": plan.task_cfg.name, "language": lang, "split": plan.split, "n": len(cat),
                    "counts": counts, "inputs": {"en": plan.keys["en"], lang: plan.keys[lang]},
                    "computed": {x: x in need for x in ("en", lang)}, **_shape_meta(plan)}

            def build_cell(tmp: Path, df=df, meta=meta) -> None:
                df.to_parquet(tmp / "taxonomy.parquet")  # the rows' list columns keep their arrow types
                _write_meta(tmp, meta)

            atomic_dir(final, build_cell)
        out_cells[lang] = (final / "taxonomy.parquet", cell_hit[lang])
    general = None
    if plan.general is not None:
        general = (root / plan.general_key / "rows.parquet", not need_general)
    return out_cells, general


# ------------------------------------------------------------------------------------- entry points


def run_taxonomy(cfg, model_cfg, task_cfg, language: str, split: str = "train", *, num_actors: int | None = None,
                 batch_size: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[Path, bool]:
    """Stage 1 for one cell (model, task, language) on one split -> (taxonomy.parquet, cache_hit)."""
    p = plan(cfg, model_cfg, task_cfg, [language], split, max_new_tokens=max_new_tokens)
    cells, _ = execute(p, num_actors=num_actors, batch_size=batch_size)
    return cells[language]


def run_general(cfg, model_cfg, task_cfg, *, num_actors: int | None = None,
                batch_size: int | None = None) -> tuple[Path, bool]:
    """Routing of the task's English general text (importance/frequency per document) -> (rows.parquet,
    cache_hit). The task examples are loaded and checked as well (a preset's tokenizer is trained on them)."""
    p = plan(cfg, model_cfg, task_cfg, cfg.languages, "train", general=True)
    return execute(p, num_actors=num_actors, batch_size=batch_size, cells=False)[1]


def summary(path: str | os.PathLike) -> dict:
    """n pairs and cc/ci/ic/ii proportions of a cell artefact (from its meta.json)."""
    meta = json.loads((Path(path).parent / "meta.json").read_text())
    n = meta["n"]
    return {"n": n, **{c: meta["counts"][c] / n for c in CATEGORIES}}
