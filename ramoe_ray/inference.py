"""Inference: run a model over rows of prompts (stage 1's predictor; evaluation reuses it).

A row is a dict with ``prompt``, ``fmt`` (a task format of ``tasks.FORMATS``, or "" for general
text: routing only), ``answer``, for multiple choice ``continuations`` (``tasks.choice_continuations``),
optionally ``scoring`` (generative formats, ``tasks.SCORINGS``; default "exact"), plus ``id`` /
``language`` / ``kind``, which are passed through.
Per row the result holds: prediction, output, correct, n_tokens (prompt tokens) and the prompt's
routing, ``importance`` / ``frequency`` (MoE layers x experts, ``routing_stats.sequence_importance``).

One batch of rows of one format (``predict_batch``):

1. Multiple-choice formats and general text: ``routing_forward``, ONE forward over the right-padded
   prompts (attention mask, each row's last real position) under ``models.capture``; it gives the
   routing and the log-probabilities of the next token after each prompt. The log-likelihood of each
   continuation (" A".." D", or the option texts) is read at the last prompt position; a continuation of
   several tokens is scored by a second, scoring-only forward (``full_logliks``).
2. Generative formats: ``generate_texts``, HF ``model.generate`` (greedy) on a left-padded copy of the
   prompts (so a row's text does not depend on its batch, sliding-window layers included). A row stops
   at an eos token or once its text holds a stop string (STOP_STRINGS); the text is cut at the first
   stop string. The routing is recorded from generation's prefill, its first forward, which is the
   prompt forward (``generate_with_routing``): no separate prompt forward.

``routing=False`` (ASHA's rungs) skips the capture: the answers only.

Many rows: ``predict_rows`` (rows of mixed formats, grouped per format), ``Predictor`` (a Ray Data
actor: the model is loaded once, then ``predict_rows`` per batch) and ``map_rows`` (a Ray Data actor
pool of any such actor class, or the same actor in this process with ``num_actors=0``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ramoe_ray import models
from ramoe_ray.config import ModelConfig
from ramoe_ray.routing_stats import sequence_importance
from ramoe_ray.tasks import FORMATS, generative_prediction, score_choices, score_generative

MAX_NEW_TOKENS = 16  # greedy generation length of generative formats
# Generation stops at the model's eos token or at the first of these strings (the text is cut
# there): lm-eval's MGSM stops at a new line; "Question:" ends a model that starts the next problem.
STOP_STRINGS = ("\n", "Question:")
BATCH_SIZE = 8
GENERAL_MAX_TOKENS = 256  # general documents are truncated to this many tokens


# -------------------------------------------------------------------------------- model, tokenizer


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


# ------------------------------------------------------------------------------ the prompt forward


@torch.no_grad()
def routing_forward(model, ids: torch.Tensor, mask: torch.Tensor, *, k: int):
    """THE forward pass over right-padded prompts, under ``models.capture``. Returns (importance,
    frequency) as (B, L, E) float32 numpy (``sequence_importance`` of the captured routing, ``k`` = the
    model's experts per token) and the (B, V) log-probabilities of the next token after each row's
    last real position."""
    with models.capture(model) as rec:
        logp = next_token_logp(model, ids, mask)
    routing = rec.routing(mask)
    importance, frequency = sequence_importance(routing.probs(), routing.selected, routing.mask, k=k)
    return importance, frequency, logp


@torch.no_grad()
def next_token_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (B, V) log-probabilities of the next token after each right-padded row's last real position."""
    last = mask.sum(1) - 1
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=last[:, None])
    return out.logits[:, -1].float().log_softmax(-1)


# -------------------------------------------------------------------------------------- generation


def cut_at_stop(text: str) -> str:
    """The generated text up to the first stop string (STOP_STRINGS)."""
    cut = len(text)
    for s in STOP_STRINGS:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def eos_ids(model, tok) -> list[int]:
    """The ids that end a generation: the tokenizer's eos and the model's generation_config eos (one or a list)."""
    ids = {tok.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return sorted(i for i in ids if i is not None)


class StopAtStrings(StoppingCriteria):
    """Stops a row once its generated text (decoded without special tokens) holds a stop string."""

    def __init__(self, tok, prompt_width: int):
        self.tok, self.prompt_width = tok, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop(t) != t for t in texts], dtype=torch.bool, device=input_ids.device)


def left_padded(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded copy of right-padded prompts (each row's tokens moved to the right end)."""
    width = ids.shape[1]
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        out_ids[b, width - n:] = ids[b, :n]
        out_mask[b, width - n:] = 1
    return out_ids, out_mask


@torch.no_grad()
def generate_texts(model, tok, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                   synced_gpus: bool = False) -> list[str]:
    """Greedy continuation of right-padded prompts by ``model.generate`` on a left-padded copy: at
    most ``max_new_tokens`` tokens, a row ends at an eos token (``eos_ids``) or once its text holds a
    stop string. Returns each row's text (special tokens skipped) cut at the first stop string."""
    left_ids, left_mask = left_padded(ids, mask, tok.pad_token_id)
    eos = eos_ids(model, tok)
    width = ids.shape[1]
    out = model.generate(
        input_ids=left_ids, attention_mask=left_mask, max_new_tokens=max_new_tokens,
        # plain greedy decoding whatever the model's generation_config says
        do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
        prefill_chunk_size=None,  # one prefill over the whole prompt: generate_with_routing records it
        eos_token_id=eos, pad_token_id=tok.pad_token_id, synced_gpus=synced_gpus,
        stopping_criteria=StoppingCriteriaList([StopAtStrings(tok, width)]),
    )
    texts = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))  # a finished row is padded after its eos
        texts.append(cut_at_stop(tok.decode(row[:end], skip_special_tokens=True)))
    return texts


@torch.no_grad()
def generate_with_routing(model, tok, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *, k: int,
                          synced_gpus: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``generate_texts`` under ``models.capture``: the texts, and the prompts' (importance, frequency) as
    ``routing_forward`` gives them, recorded from generation's prefill (its first forward: every prompt
    token, left-padded; a sequence's statistics are means over its real tokens, so the side it is padded on
    does not enter). The prompt forward is not run twice."""
    with models.capture(model) as rec:
        texts = generate_texts(model, tok, ids, mask, max_new_tokens, synced_gpus)
    _, left_mask = left_padded(ids, mask, tok.pad_token_id)
    routing = rec.routing(left_mask)
    importance, frequency = sequence_importance(routing.probs(), routing.selected, routing.mask, k=k)
    return texts, importance, frequency


# ---------------------------------------------------------------------------------- choice scoring


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


def choice_logliks(model, tok, rows: list[dict], ids: torch.Tensor, lengths: list[int], logp: torch.Tensor) -> list[list[float]]:
    """Each row's log-likelihood of each of its continuations: from the prompt forward's last-position
    log-probabilities ``logp`` when every continuation is one token, else by ``full_logliks``."""
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
    return lls


# --------------------------------------------------------------------------------- batches of rows


@torch.no_grad()
def predict_batch(model, tok, rows: list[dict], *, fmt: str | None, k: int, max_new_tokens: int = MAX_NEW_TOKENS,
                  max_length: int | None = None, scoring: str = "exact", synced_gpus: bool = False,
                  routing: bool = True) -> list[dict]:
    """One batch of rows of ONE format (``fmt`` None: routing only, as for general text; the module
    docstring gives the steps). ``max_length``: prompts are truncated to this many tokens. ``scoring``:
    how generated answers are scored (``tasks.score_generative``). ``routing`` False: the answers only
    (ASHA's rungs), the same predictions without the capture; importance and frequency are None.
    Returns one dict per row: prediction, output, correct, n_tokens, importance, frequency."""
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, truncation=max_length is not None,
              max_length=max_length)
    ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    lengths = mask.sum(1).tolist()
    generative = fmt is not None and FORMATS[fmt]["output"] == "generate"
    n = len(rows)
    importance, frequency, logp = [None] * n, [None] * n, None
    if not generative and routing:  # (a generative format's routing comes from generation's prefill)
        importance, frequency, logp = routing_forward(model, ids, mask, k=k)
    elif not generative and fmt is not None:
        logp = next_token_logp(model, ids, mask)

    preds, outputs, correct = [""] * n, [""] * n, [False] * n
    if generative:
        if routing:
            outputs, importance, frequency = generate_with_routing(model, tok, ids, mask, max_new_tokens, k=k,
                                                                   synced_gpus=synced_gpus)
        else:
            outputs = generate_texts(model, tok, ids, mask, max_new_tokens, synced_gpus)
        preds = [generative_prediction(t, scoring) for t in outputs]
        correct = score_generative(outputs, [r["answer"] for r in rows], scoring)
    elif fmt is not None:
        lls = choice_logliks(model, tok, rows, ids, lengths, logp)
        preds, correct = score_choices(lls, [r["answer"] for r in rows])
        outputs = [json.dumps([round(x, 6) for x in ll]) for ll in lls]
    return [
        dict(prediction=preds[i], output=outputs[i], correct=bool(correct[i]), n_tokens=lengths[i],
             importance=importance[i], frequency=frequency[i])
        for i in range(n)
    ]


def predict_rows(model, tok, rows: list[dict], *, k: int, max_new_tokens: int = MAX_NEW_TOKENS,
                 synced_gpus: bool = False, routing: bool = True) -> list[dict]:
    """``predict_batch`` over rows that may mix formats (``fmt``; "" = general text, truncated to
    GENERAL_MAX_TOKENS), in order; each output dict also carries the row's id, language, kind and answer.
    A row's optional ``scoring`` (the task's, ``TaskConfig.scoring``; default "exact") is passed on."""
    out: list[dict | None] = [None] * len(rows)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["fmt"], r.get("scoring") or "exact"), []).append(i)
    for (fmt, scoring), idx in groups.items():
        res = predict_batch(model, tok, [rows[i] for i in idx], fmt=fmt or None, k=k, max_new_tokens=max_new_tokens,
                            max_length=None if fmt else GENERAL_MAX_TOKENS, scoring=scoring, synced_gpus=synced_gpus,
                            routing=routing)
        for i, r in zip(idx, res):
            out[i] = {"id": rows[i]["id"], "language": rows[i]["language"], "kind": rows[i]["kind"],
                      "answer": rows[i]["answer"], **r}
    return out  # type: ignore[return-value]


def predict_frame(model, tok, rows: pd.DataFrame, *, k: int, max_new_tokens: int, batch_size: int) -> pd.DataFrame:
    """``predict_rows`` over a frame of rows in batches of ``batch_size``, with a model already in this process."""
    return pd.concat([pd.DataFrame(predict_rows(model, tok, rows.iloc[i : i + batch_size].to_dict("records"), k=k,
                                                max_new_tokens=max_new_tokens))
                      for i in range(0, len(rows), batch_size)], ignore_index=True)


class Predictor:
    """Ray Data actor: model and tokenizer loaded once in __init__, then ``predict_rows`` per batch
    (a pandas DataFrame of rows in, one of results out)."""

    def __init__(self, model_path: str, model_cfg: dict, k: int, max_new_tokens: int, device: str = "cpu",
                 threads: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tok = load_model_and_tokenizer(model_path, ModelConfig(**model_cfg), device)
        self.k, self.max_new_tokens = k, max_new_tokens

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        out = pd.DataFrame(predict_rows(self.model, self.tok, rows, k=self.k, max_new_tokens=self.max_new_tokens))
        if "part" in batch:  # which of several plans in one pass a row belongs to (taxonomy.execute_many)
            out["part"] = batch["part"].to_numpy()
        return out


# ------------------------------------------------------------------------------ Ray Data actor pool


def ensure_ray(env: dict | None = None) -> None:
    """The one place the project starts Ray: joins the cluster of RAY_ADDRESS (set by ``ray job submit``),
    or starts a local instance. ``env``: environment for Ray's processes (the stage's, the sweep's, a
    training's: ``train_worker.ray_env``); inside ``ray job submit`` the job's runtime_env wins on a key both
    set (Ray refuses a key set twice, even to the same value).

    The local instance runs the dashboard (on 127.0.0.1): Ray Train V2 removes the placement group of a
    controller that died (a Tune trial stopped early while its worker group trained) only through the
    State API, which the dashboard serves; without it the group's CPUs/GPUs stay held and the next trial
    waits forever. Actors' output stays in their log files (RAMOE_RAY_LOGS=1 streams it)."""
    import ray

    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job:
        job_env = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=True,
             runtime_env={"env_vars": env}, log_to_driver=os.environ.get("RAMOE_RAY_LOGS") == "1")


def map_rows(rows: pd.DataFrame, actor_cls, actor_kwargs: dict, *, num_actors: int, batch_size: int,
             cpus_per_actor: float = 1.0) -> pd.DataFrame:
    """``actor_cls(**actor_kwargs)`` (e.g. ``Predictor``) over ``rows`` in batches of ``batch_size``;
    the result frames concatenated (in Ray's block order; callers sort).

    ``num_actors`` > 0: Ray Data ``map_batches`` with an actor pool, ``num_actors`` actors of
    ``cpus_per_actor`` CPUs (``threads`` = that many torch threads) each; on a cluster with GPUs one
    actor per GPU instead (num_gpus=1, ``device="cuda"``). ``num_actors=0``: one actor in this process
    (on the GPU when there is one), no Ray."""
    if num_actors == 0:
        actor = actor_cls(device="cuda" if torch.cuda.is_available() else "cpu", **actor_kwargs)
        return pd.concat([actor(rows.iloc[i : i + batch_size]) for i in range(0, len(rows), batch_size)],
                         ignore_index=True)
    import ray

    ensure_ray()
    n_blocks = max(1, min(len(rows), 4 * num_actors))  # several blocks per actor: the pool stays busy
    blocks = [b for b in np.array_split(np.arange(len(rows)), n_blocks) if len(b)]
    ds = ray.data.from_pandas([rows.iloc[b] for b in blocks])
    kwargs = dict(actor_kwargs)
    if gpus := int(ray.cluster_resources().get("GPU", 0)):
        num_actors, resources = gpus, dict(num_gpus=1)
        kwargs["device"] = "cuda"
    else:
        resources = dict(num_cpus=cpus_per_actor)
        kwargs["threads"] = max(1, int(cpus_per_actor))
    out = ds.map_batches(actor_cls, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=num_actors),
                         batch_size=batch_size, batch_format="pandas", **resources)
    return out.to_pandas()
