"""The embedded default: a synthetic multilingual world (docs/architecture.md).

English plus six target languages render the same concepts, so every example has an exact
translation. Languages differ from English in graded ways, as real ones do:

- ``share``: the fraction of content words (names, nouns, number words, ...) whose surface form is
  the English one (names, numbers and cognates); the others get the language's own pseudo-word;
- ``sov``: verb-final word order in statements and questions;
- ``weight``: the language's share of the pretraining corpus (English has the most);
- ``task_scale``: how much rarer task-format documents are in its corpus than in English's (real
  languages have far less task-like text — math word problems, quizzes — than English).

Three tasks mirror the real formats: ``arith`` (generative numeric, like MGSM), ``category`` (4-way
multiple choice, like Global-MMLU) and ``passage`` (passage + question, 4-way, like Belebele; the
answer is the option the passage mentions, which a small model can learn). Task examples are
written as jsonl in the canonical record schema of ``ramoe_ray.tasks`` and read back through the
same loader as real data; they are never part of the pretraining corpus.

``build_data`` writes the task files, general text and tokenizer; ``build_model`` pretrains a small
MoE of one family on the corpus (CPU, one thread, seeded). Both are cached under a content hash of the
world's parameters and this module's code version. The package ships the default world's models of
``SHIPPED_FAMILIES`` (``ramoe_ray/world/KEY/FAMILY/``, made by ``ship``): ``build_model`` copies them
into the cache when KEY is the key the code computes now, and pretrains otherwise.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ramoe_ray import inference
from ramoe_ray.cache import atomic_dir, code_digest, content_key
from ramoe_ray.models import shape_of_config, tiny_config
from ramoe_ray.tasks import build_prompt, choice_continuations

# ------------------------------------------------------------------------------------------ concepts

NAMES = ["alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry", "iris", "jack", "kate", "leo"]
CATEGORIES = {
    "animal": ["cat", "dog", "horse", "bird", "fish", "cow", "goat", "mouse"],
    "fruit": ["apple", "pear", "plum", "grape", "lemon", "melon", "cherry", "peach"],
    "tool": ["hammer", "saw", "drill", "knife", "rope", "shovel", "wrench", "ladder"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "place": ["paris", "rome", "lima", "oslo", "cairo", "delhi", "tokyo", "quito"],
}
COUNTABLE = CATEGORIES["animal"] + CATEGORIES["fruit"] + CATEGORIES["tool"]
NUMBERS = [str(i) for i in range(21)]
FUNCTION_WORDS = [
    "has", "gets", "more", "gives", "to", "how", "many", "does", "have", "which", "of", "these", "is",
    "a", "an", "the", "lives", "in", "live", "where", "likes", "like", "what", "and", "then", "counts",
    "sees", "big", "small", "eats", "buys", "sells", "after", "before", "makes",
]
CONCEPTS = NAMES + [w for ws in CATEGORIES.values() for w in ws] + list(CATEGORIES) + NUMBERS + FUNCTION_WORDS


@dataclass(frozen=True)
class Language:
    code: str
    share: float  # fraction of concepts rendered with the English surface form
    sov: bool  # verb-final word order
    weight: float  # share of the pretraining corpus
    syllables: tuple[str, ...]  # the language's own pseudo-words are built from these
    task_scale: float  # task documents are this much rarer in the language's corpus than in English's


# Graded distance from English; codes are private to the synthetic world (not ISO 639-1).
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("en", 1.0, False, 0.40, (), 1.0),
        Language("syn1", 0.75, False, 0.14, ("ka", "lo", "mi", "ne", "ru", "sa"), 0.25),
        Language("syn2", 0.60, True, 0.12, ("ba", "do", "gi", "ku", "te", "zo"), 0.15),
        Language("syn3", 0.45, False, 0.10, ("fa", "hi", "jo", "pe", "tu", "wa"), 0.10),
        Language("syn4", 0.30, True, 0.09, ("qa", "xe", "yi", "vo", "lu", "ce"), 0.06),
        Language("syn5", 0.20, False, 0.08, ("ma", "no", "pi", "ri", "so", "tu"), 0.04),
        Language("syn6", 0.10, True, 0.07, ("da", "ge", "ko", "li", "mu", "we"), 0.02),
    )
}
TARGET_LANGUAGES = [c for c in LANGUAGES if c != "en"]
TASKS = {"arith": "generative_numeric", "category": "multiple_choice", "passage": "passage_multiple_choice"}
CHOICES = "texts"  # multiple-choice scoring of the world's tasks (tasks.choice_continuations explains why)


def lexicon(seed: int) -> dict[str, dict[str, str]]:
    """language -> concept -> surface form. Deterministic in ``seed``; every own form is unique
    within its language and never equal to an English form."""
    out: dict[str, dict[str, str]] = {"en": {c: c for c in CONCEPTS}}
    english = set(CONCEPTS)
    for code, lang in LANGUAGES.items():
        if code == "en":
            continue
        rng = random.Random(f"{seed}-lexicon-{code}")
        used: set[str] = set()
        forms = {}
        for concept in CONCEPTS:
            if rng.random() < lang.share:
                forms[concept] = concept
                continue
            while True:
                word = "".join(rng.choice(lang.syllables) for _ in range(rng.randint(2, 3)))
                if word not in used and word not in english:
                    used.add(word)
                    forms[concept] = word
                    break
        out[code] = forms
    return out


# ----------------------------------------------------------------------------------------- sentences
# A sentence is a list of (role, concept) pairs; "V" marks the verb group, moved last in SOV
# languages. Rendering maps concepts through the lexicon.


def _render(parts: list[tuple[str, str]], lang: Language, lex: dict[str, str]) -> str:
    if lang.sov:
        verbs = [p for p in parts if p[0] == "V"]
        rest = [p for p in parts if p[0] != "V"]
        end = [rest.pop()] if rest and rest[-1][1] in ("?", ".") else []
        parts = rest + verbs + end
    return " ".join(lex.get(c, c) for _, c in parts)


def _s(*items: str) -> list[tuple[str, str]]:
    """_s("S:alice", "V:has", "O:3", ...) -> [(role, concept)]."""
    return [tuple(x.split(":", 1)) if ":" in x and len(x) > 1 else ("O", x) for x in items]  # type: ignore[misc]


ARITH_MAX = 6  # operands 0..6: answers 0..12, a table a 6-layer model learns in its pretraining budget


def _arith_problem(rng: random.Random) -> dict:
    who, other = rng.sample(NAMES, 2)
    obj = rng.choice(COUNTABLE)
    a = rng.randint(0, ARITH_MAX)
    if rng.random() < 0.5:
        b = rng.randint(0, ARITH_MAX)
        story = [_s(f"S:{who}", "V:has", f"O:{a}", f"O:{obj}", "."), _s(f"S:{who}", "V:gets", f"O:{b}", "O:more", f"O:{obj}", ".")]
        answer = a + b
        other = None  # not in the text: not in the key either
    else:
        b = rng.randint(0, a)
        story = [_s(f"S:{who}", "V:has", f"O:{a}", f"O:{obj}", "."), _s(f"S:{who}", "V:gives", f"O:{b}", f"O:{obj}", "O:to", f"O:{other}", ".")]
        answer = a - b
    question = _s("O:how", "O:many", f"O:{obj}", "V:does", f"S:{who}", "V:have", "?")
    # the key is what the text shows
    return {"key": ("arith", who, other, obj, a, b, answer), "story": story, "question": question, "answer": str(answer)}


def _category_problem(rng: random.Random) -> dict:
    cat = rng.choice(list(CATEGORIES))
    right = rng.choice(CATEGORIES[cat])
    others = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
    options = [right] + rng.sample(others, 3)
    rng.shuffle(options)
    question = _s("O:which", "O:of", "O:these", "V:is", "O:a", f"O:{cat}", "?")
    return {"key": ("category", cat, tuple(options)), "story": [], "question": question,
            "options": options, "answer": "ABCD"[options.index(right)]}


_PASSAGE_SLOTS = {"animal": ("has", "a"), "place": ("lives", "in"), "fruit": ("likes", None)}


def _passage_problem(rng: random.Random) -> dict:
    who = rng.choice(NAMES)
    facts = {cat: rng.choice(CATEGORIES[cat]) for cat in _PASSAGE_SLOTS}
    story = []
    for cat in rng.sample(list(_PASSAGE_SLOTS), len(_PASSAGE_SLOTS)):
        verb, prep = _PASSAGE_SLOTS[cat]
        story.append(_s(f"S:{who}", f"V:{verb}", *( [f"O:{prep}"] if prep else []), f"O:{facts[cat]}", "."))
    asked = rng.choice(list(_PASSAGE_SLOTS))
    if asked == "place":
        question = _s("O:where", "V:does", f"S:{who}", "V:live", "?")
    else:
        verb = "have" if asked == "animal" else "like"
        question = _s("O:what", f"O:{asked}", "V:does", f"S:{who}", f"V:{verb}", "?")
    right = facts[asked]
    options = [right] + rng.sample([w for w in CATEGORIES[asked] if w != right], 3)
    rng.shuffle(options)
    return {"key": ("passage", who, tuple(sorted(facts.items())), asked, tuple(options)), "story": story,
            "question": question, "options": options, "answer": "ABCD"[options.index(right)]}


_PROBLEMS = {"arith": _arith_problem, "category": _category_problem, "passage": _passage_problem}


def _record(task: str, problem: dict, ident: str, code: str, lex: dict[str, dict[str, str]]) -> dict:
    lang, forms = LANGUAGES[code], lex[code]
    story = " ".join(_render(s, lang, forms) for s in problem["story"])
    question = _render(problem["question"], lang, forms)
    if task == "arith":  # the story is part of the question, as in MGSM
        return {"id": ident, "language": code, "question": f"{story} {question}", "passage": "",
                "choices": [], "answer": problem["answer"]}
    return {"id": ident, "language": code, "question": question, "passage": story,
            "choices": [forms[o] for o in problem["options"]], "answer": problem["answer"]}


def task_examples(task: str, n: int, seed: int) -> tuple[dict[str, list[dict]], set]:
    """n distinct problems of a task rendered in every language (same ids), and their keys."""
    rng = random.Random(f"{seed}-task-{task}")
    lex = lexicon(seed)
    problems, keys = [], set()
    while len(problems) < n:
        p = _PROBLEMS[task](rng)
        if p["key"] not in keys:
            keys.add(p["key"])
            problems.append(p)
    out = {code: [_record(task, p, f"{task}-{i:05d}", code, lex) for i, p in enumerate(problems)] for code in LANGUAGES}
    return out, keys


# -------------------------------------------------------------------------------------- general text


# Relative frequency of the seven kinds of general sentence. Only the category facts ("cat is a
# animal") say which category a word belongs to: the other kinds put words of every category in
# their slots, so they teach a language's vocabulary but not its categories. The facts are the rare
# kind: English also learns category membership from its many task documents, a target language
# mostly from these facts and from the forms it shares with English, so its category accuracy grades
# with its share and corpus size instead of saturating.
SENTENCE_KINDS = (0.15, 1, 1, 1, 1, 1, 1)
WORDS = [w for ws in CATEGORIES.values() for w in ws]


def _general_sentence(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.choices(range(7), SENTENCE_KINDS)[0]
    who, other = rng.sample(NAMES, 2)
    if kind == 0:  # category facts
        cat = rng.choice(list(CATEGORIES))
        word = rng.choice(CATEGORIES[cat])
        return _s(f"S:{word}", "V:is", "O:a", f"O:{cat}", ".")
    if kind == 1:  # counting: teaches the number words in order
        start = rng.randint(0, 14)
        return _s("S:" + who, "V:counts", *[f"O:{i}" for i in range(start, start + rng.randint(3, 6))], ".")
    if kind == 2:
        return _s(f"S:{rng.choice(WORDS)}", "V:is", "O:big", ".")
    if kind == 3:
        return _s(f"S:{who}", "V:lives", "O:in", f"O:{rng.choice(CATEGORIES['place'])}", ".")
    if kind == 4:
        return _s(f"S:{who}", "V:likes", f"O:{rng.choice(WORDS)}", "O:and", f"O:{other}", "V:sees", f"O:{rng.choice(WORDS)}", ".")
    if kind == 5:
        return _s(f"S:{who}", "V:makes", f"O:{rng.choice(WORDS)}", "O:after", f"O:{rng.choice(WORDS)}", ".")
    return _s(f"S:{who}", "V:sells", f"O:{rng.randint(2, 20)}", f"O:{rng.choice(WORDS)}", "O:to", f"O:{other}", ".")


def _general_document(rng: random.Random, lang: Language, forms: dict[str, str]) -> str:
    return " ".join(_render(_general_sentence(rng), lang, forms) for _ in range(rng.randint(2, 4)))


def general_text(code: str, n: int, seed: int) -> list[str]:
    """n short non-task documents (2-4 sentences) in a language: for the task-expert contrast and
    as part of pretraining."""
    rng = random.Random(f"{seed}-general-{code}")
    lang, forms = LANGUAGES[code], lexicon(seed)[code]
    return [_general_document(rng, lang, forms) for _ in range(n)]


# ------------------------------------------------------------------------------------------- prompts
# The prompt of a record and its continuation; the same text is used in pretraining and evaluation.


def prompt(record: dict) -> str:
    """The task format's own prompt (ramoe_ray.tasks), as for real data."""
    return build_prompt(record, TASKS[record["id"].split("-", 1)[0]])


def continuation(record: dict) -> str:
    """The target text after the prompt: the number, or the right option's text (CHOICES)."""
    if record["choices"]:
        return record["choices"]["ABCD".index(record["answer"])]
    return record["answer"]


# ---------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the world; its hash (with the code version) is the cache key."""

    seed: int = 0
    n_task_examples: int = 1000  # per task, rendered in every language
    n_general: int = 400  # general-text documents per language (task-expert contrast)
    num_layers: int = 6
    hidden_size: int = 64
    intermediate_size: int = 128
    num_experts: int = 8
    experts_per_token: int = 2
    steps: int = 1000
    batch_size: int = 64
    seq_len: int = 64
    lr: float = 6e-3
    task_fraction: float = 0.5  # of each language's pretraining documents
    answer_weight: float = 8.0  # loss weight of a task document's answer tokens (other tokens: 1)
    languages: tuple[str, ...] = tuple(LANGUAGES)

    def key(self) -> str:
        return content_key([asdict(self), code_digest(sys.modules[__name__])], 16)


SMALL = WorldSpec(n_task_examples=60, n_general=40, num_layers=4, hidden_size=32, intermediate_size=32,
                  num_experts=4, steps=6, batch_size=8, seq_len=48)  # for tests: builds in seconds

# Config path schemes: model path "synthetic:olmoe", task source "synthetic:arith" use the default
# world; "synthetic-small:..." the reduced one the tests use.
WORLDS = {"synthetic": WorldSpec(), "synthetic-small": SMALL}

SHIPPED = Path(__file__).parent / "world"  # the package's pretrained world models: SHIPPED/KEY/FAMILY/ (``ship``)
SHIPPED_FAMILIES = ("olmoe", "qwen3_moe", "mixtral")  # the default world's: the demo's two and synthetic-grid's third


def parse_scheme(text: str) -> tuple[WorldSpec, str] | None:
    """"synthetic:olmoe" -> (WorldSpec(), "olmoe"); None when ``text`` is not a world reference."""
    scheme, sep, name = str(text).partition(":")
    if not sep or scheme not in WORLDS:
        return None
    if not name:
        raise ValueError(f"{text!r}: name a family or task after '{scheme}:'")
    return WORLDS[scheme], name


def pretraining_documents(spec: WorldSpec, exclude: set, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n pretraining documents (text, answer) drawn by language weight: a task document is its
    prompt and its answer (the continuation), a general document has answer "". Task documents
    whose problem is in ``exclude`` (the task benchmark) are redrawn."""
    lex = lexicon(spec.seed)
    codes = list(spec.languages)
    weights = [LANGUAGES[c].weight for c in codes]
    docs = []
    for code in rng.choices(codes, weights, k=n):
        if rng.random() < spec.task_fraction * LANGUAGES[code].task_scale:
            task = rng.choice(list(TASKS))
            while (p := _PROBLEMS[task](rng))["key"] in exclude:
                pass
            rec = _record(task, p, f"{task}-pretrain", code, lex)
            docs.append((prompt(rec), continuation(rec)))
        else:
            docs.append((_general_document(rng, LANGUAGES[code], lex[code]), ""))
    return docs


def _word_tokenizer(texts: list[str], out_dir: Path):
    """Word-level tokenizer over the world's vocabulary (every surface form is one token), saved as a
    standard HF tokenizer folder. Special tokens: <pad>=0, <bos>=1, <eos>=2, <unk>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="right",
    )
    fast.save_pretrained(out_dir)
    return fast


def model_config(spec: WorldSpec, family: str, vocab_size: int):
    """The HF config of the world's model of ``family`` (its shape is known from the spec alone)."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_experts_per_tok=spec.experts_per_token,
        max_position_embeddings=max(128, spec.seq_len), output_router_logits=True, router_aux_loss_coef=0.01,
    )
    fields["num_local_experts" if family in ("mixtral", "gpt_oss") else "num_experts"] = spec.num_experts
    if family in ("qwen3_moe", "deepseek_v2"):
        fields["moe_intermediate_size"] = spec.intermediate_size
    if family == "gpt_oss":
        fields["layer_types"] = ["sliding_attention", "full_attention"] * (spec.num_layers // 2) + ["full_attention"] * (spec.num_layers % 2)
    return tiny_config(family, **fields)


def _batches(spec: WorldSpec, tokenizer, exclude: set, seed: int):
    """Endless packed batches of pretraining tokens, documents joined by <eos>: (ids, weights), both
    (batch, seq_len); weights[i] is the loss weight of predicting ids[i] (``answer_weight`` on a task
    document's answer tokens, 1 elsewhere)."""
    import torch

    rng = random.Random(f"{spec.seed}-pretrain-{seed}")
    need = spec.batch_size * spec.seq_len
    ids: list[int] = []
    weights: list[float] = []
    eos = tokenizer.eos_token_id
    while True:
        while len(ids) < need:
            for text, answer in pretraining_documents(spec, exclude, rng, 64):
                body = tokenizer(text)["input_ids"]
                tail = tokenizer(answer)["input_ids"] if answer else []
                ids += body + tail + [eos]
                weights += [1.0] * len(body) + [spec.answer_weight] * len(tail) + [1.0]
        shape = (spec.batch_size, spec.seq_len)
        yield torch.tensor(ids[:need]).view(shape), torch.tensor(weights[:need]).view(shape)
        ids, weights = ids[need:], weights[need:]


def pretrain(spec: WorldSpec, family: str, tokenizer, exclude: set, *, log_every: int = 50, on_log=None):
    """Pretrains a small MoE of ``family`` on the world (CPU, seeded): next-token cross-entropy,
    weighted per token (see ``_batches``), plus the model's own router load-balancing loss.
    Returns the model (eval mode). ``on_log(step, model)`` is called at every log step."""
    import math
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(model_config(spec, family, len(tokenizer)), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    )
    t0, seen = time.time(), 0
    for step, (batch, weights) in zip(range(spec.steps), _batches(spec, tokenizer, exclude, seed=0)):
        out = model(input_ids=batch)
        ce = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        w = weights[:, 1:].flatten()
        loss = (ce * w).sum() / w.sum()
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += batch.numel()
        if log_every and (step % log_every == 0 or step == spec.steps - 1):
            print(f"  [{family}] step {step + 1}/{spec.steps} loss {loss.item():.3f} "
                  f"({seen / (time.time() - t0):,.0f} tok/s)", flush=True)
            if on_log is not None:
                on_log(step + 1, model)
                model.train()
    return model.eval()


def evaluate_world(model, tokenizer, examples: dict[str, dict[str, list[dict]]], *, batch_size: int = 128) -> pd.DataFrame:
    """Accuracy of a world model on task examples: one row per (task, language, id) with the
    prediction and correctness, scored by stage 1's predictor (``inference.predict_rows``). Every
    answer and option of the world is one token, so one generated token is the answer (numeric
    task) and the options' log-likelihoods are the last prompt position's (multiple choice, scored
    on the option texts: CHOICES)."""
    k = shape_of_config(model.config).experts_per_token
    out = []
    for task, by_lang in examples.items():
        for code, records in by_lang.items():
            rows = [dict(id=r["id"], language=code, kind="task", fmt=TASKS[task], prompt=prompt(r), answer=r["answer"],
                         continuations=choice_continuations(r, CHOICES) if r["choices"] else []) for r in records]
            for i in range(0, len(rows), batch_size):
                res = inference.predict_rows(model, tokenizer, rows[i : i + batch_size], k=k, max_new_tokens=1)
                out += [dict(task=task, language=code, id=r["id"], prediction=r["prediction"], correct=r["correct"])
                        for r in res]
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------- build and cache


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def world_dir(spec: WorldSpec, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "world" / spec.key()


def build_data(spec: WorldSpec, cache_dir: str | Path) -> Path:
    """Task files (tasks/TASK/LANG.jsonl), general text (general/LANG.jsonl) and the tokenizer."""

    def build(tmp: Path) -> None:
        texts = []
        for task in TASKS:
            examples, _ = task_examples(task, spec.n_task_examples, spec.seed)
            for code in spec.languages:
                _write_jsonl(tmp / "tasks" / task / f"{code}.jsonl", examples[code])
                texts += [f"{prompt(r)} {continuation(r)}" for r in examples[code]]
        for code in spec.languages:
            general = general_text(code, spec.n_general, spec.seed)
            _write_jsonl(tmp / "general" / f"{code}.jsonl", [{"id": f"general-{i:05d}", "language": code, "text": t}
                                                             for i, t in enumerate(general)])
            texts += general
        # the vocabulary must cover every surface form, including those only pretraining shows
        texts += [f"{t} {a}" for t, a in pretraining_documents(spec, set(), random.Random(f"{spec.seed}-vocab"), 20000)]
        texts += [" ".join(lexicon(spec.seed)[c].values()) for c in spec.languages]
        _word_tokenizer(texts, tmp / "tokenizer")
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2))

    return atomic_dir(world_dir(spec, cache_dir) / "data", build)


def task_folder(spec: WorldSpec, task: str, cache_dir: str | Path) -> Path:
    """The world's files for ``task`` (one LANG.jsonl per language), built on first use."""
    if task not in TASKS:
        raise ValueError(f"synthetic task {task!r} does not exist; allowed: {', '.join(TASKS)}")
    return build_data(spec, cache_dir) / "tasks" / task


def general_file(spec: WorldSpec, language: str, cache_dir: str | Path) -> Path:
    """The world's general (non-task) text of a language: jsonl with id, language, text."""
    return build_data(spec, cache_dir) / "general" / f"{language}.jsonl"


def load_task_examples(data: Path, task: str, languages) -> dict[str, list[dict]]:
    return {c: [json.loads(l) for l in (data / "tasks" / task / f"{c}.jsonl").open(encoding="utf-8")] for c in languages}


def shipped_model(spec: WorldSpec, family: str) -> Path | None:
    """The package's shipped pretrained model of ``family`` for this world and code version, if any."""
    folder = SHIPPED / spec.key() / family
    return folder if (folder / "model.safetensors").is_file() else None


def build_model(spec: WorldSpec, family: str, cache_dir: str | Path, *, log_every: int = 100, shipped: bool = True) -> Path:
    """The world's pretrained model of ``family`` (a save_pretrained folder with its tokenizer, eval.parquet
    and a report.json of per-cell accuracy), cached: copied from the package's shipped model when there is
    one for this world's key (``shipped_model``), pretrained here otherwise (and always with ``shipped=False``)."""
    data = build_data(spec, cache_dir)
    final = world_dir(spec, cache_dir) / "models" / family
    source = shipped_model(spec, family) if shipped else None
    if source is not None:
        return atomic_dir(final, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
    if log_every and not final.is_dir():
        why = _not_shipped(family) if shipped else "shipped=False: the package's model is not used"
        print(f"world {spec.key()}: pretraining its {family} model on CPU ({why})", flush=True)
    return atomic_dir(final, lambda tmp: _pretrain_into(tmp, spec, family, data, log_every))


def _not_shipped(family: str) -> str:
    """Why a world's model of ``family`` is pretrained although the package may ship one."""
    keys = sorted(p.parent.name for p in SHIPPED.glob(f"*/{family}"))
    if not keys:
        return f"the package ships no {family} model"
    return (f"the package ships {family} models for world {', '.join(keys)} only: the world's spec or synthetic.py "
            "differs from theirs; `python bench/world.py --ship` remakes them")


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread for a world build: reductions split over threads round differently (20 pretraining
    steps on 1 and on 2 threads already differ in every tensor), so one thread makes a build the same on any
    number of cores. The models are too small for a second thread to pay (measured on a shared 2-core machine, 20
    pretraining steps: 0.45 s a step on one thread, 0.60 s on two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pretrain_into(out: Path, spec: WorldSpec, family: str, data: Path, log_every: int) -> None:
    """``build_model``'s build: pretrain, save with the tokenizer, evaluate on every task example."""
    import time

    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    exclude = set()
    examples = {}
    for task in TASKS:
        exclude |= task_examples(task, spec.n_task_examples, spec.seed)[1]
        examples[task] = load_task_examples(data, task, spec.languages)
    with _one_thread():
        t0 = time.time()
        model = pretrain(spec, family, tokenizer, exclude, log_every=log_every)
        seconds = time.time() - t0
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        df = evaluate_world(model, tokenizer, examples)
    df.to_parquet(out / "eval.parquet")
    acc = df.groupby(["task", "language"]).correct.mean().unstack()
    report = {"train_seconds": seconds, "torch": torch.__version__, "transformers": transformers.__version__,
              "accuracy": acc.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2))


def ship(spec: WorldSpec = WORLDS["synthetic"], families: tuple[str, ...] = SHIPPED_FAMILIES) -> Path:
    """Pretrains the world's models of ``families`` in a fresh cache and makes them the package's shipped
    models, ``SHIPPED/KEY/FAMILY/``, in place of all others. Run in a source checkout after changing this
    module (``python bench/world.py --ship``), then commit ramoe_ray/world/."""
    with tempfile.TemporaryDirectory() as cache:
        built = [build_model(spec, f, cache, shipped=False) for f in families]
        for old in SHIPPED.glob("*"):
            shutil.rmtree(old)
        for path in built:
            shutil.copytree(path, SHIPPED / spec.key() / path.name)
    return SHIPPED / spec.key()
