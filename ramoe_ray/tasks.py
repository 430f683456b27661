"""Tasks: parallel examples, their prompts, their scoring, loading, validation and the train/test split.

Every later stage works on one record shape, a *parallel example* in one language::

    {"id": str,            # the same id in every language (that is what makes the data parallel)
     "language": str,      # ISO 639-1 code
     "question": str,
     "passage": str,       # "" when the format has none
     "choices": list[str], # [] for generative tasks; exactly 4 for multiple choice
     "answer": str}        # generative: canonical number ("18", "-3", "3.5"); multiple choice: "A".."D"

The three task formats differ in one table, ``FORMATS``: prompt function, how a model's output is
scored, and how a native hub row becomes a record. The choices follow lm-evaluation-harness
(EleutherAI/lm-evaluation-harness), read from:

- ``lm_eval/tasks/mgsm/direct/direct_yaml`` (mgsm_direct, versions 3.0 and 4.0 alike):
  ``generate_until`` (greedy), filter "flexible-extract" = regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``
  with ``group_select: -1``, then metric ``exact_match`` with ``ignore_case: true``,
  ``ignore_punctuation: true`` and no ``regexes_to_ignore`` (those are gsm8k's, not mgsm's); the
  target is ``str(answer_number)`` (``direct/mgsm_direct_<lang>.yaml``);
- ``lm_eval/filters/extraction.py`` (``RegexFilter``): ``findall``, take match ``[group_select]``,
  from a tuple of groups the first non-empty one, ``strip()``; no match -> "[invalid]";
- ``lm_eval/api/metrics.py`` (``exact_match_hf_evaluate``): to BOTH prediction and reference, in
  order: ``re.sub`` each of ``regexes_to_ignore`` away, lower-case, delete ``string.punctuation``;
  then string equality. Our ``scoring: numeric`` (``TaskConfig.scoring``) is a named alternative,
  off by default: equal numbers after the same extraction;
- ``lm_eval/tasks/global_mmlu/default/en/_en_template_yaml`` (and ``global_mmlu/_default_yaml``):
  ``"{{question.strip()}}\\nA. {{option_a}}\\nB. ...\\nD. {{option_d}}\\nAnswer:"``,
  ``doc_to_choice: ["A", "B", "C", "D"]``, metric ``acc``;
- ``lm_eval/tasks/belebele/_default_template_yaml``:
  ``"P: {{flores_passage}}\\nQ: {{question.strip()}}\\nA: {{mc_answer1}}\\n...\\nD: {{mc_answer4}}\\nAnswer："``,
  ``doc_to_choice: ["A", "B", "C", "D"]``, target = index of ``correct_answer_num`` in "1".."4", metric ``acc``;
- ``lm_eval/api/task.py`` (``process_results``, multiple_choice): ``acc`` = ``np.argmax(lls) == gold``
  over the summed log-likelihoods, the first maximum on ties (``score_choices``).

Loading reads and checks; it never writes into the data folder (hub and local parquet go through
``datasets`` in streaming mode, which keeps no copy; tsv and jsonl are parsed here, strictly, so
that a bad row is reported by the line number an editor shows).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")
FIELDS = ("id", "language", "question", "passage", "choices", "answer")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
SPLITS = ("train", "validation", "test")

# FLORES-200 codes (the config names of facebook/belebele) for the languages of config.LANGUAGES.
BELEBELE_FLORES: dict[str, str] = {
    "en": "eng_Latn", "ar": "arb_Arab", "bn": "ben_Beng", "cs": "ces_Latn", "de": "deu_Latn",
    "el": "ell_Grek", "es": "spa_Latn", "fa": "pes_Arab", "fi": "fin_Latn", "fr": "fra_Latn",
    "ha": "hau_Latn", "he": "heb_Hebr", "hi": "hin_Deva", "id": "ind_Latn", "ig": "ibo_Latn",
    "it": "ita_Latn", "ja": "jpn_Jpan", "ko": "kor_Hang", "ky": "kir_Cyrl", "lt": "lit_Latn",
    "mg": "plt_Latn", "ms": "zsm_Latn", "ne": "npi_Deva", "nl": "nld_Latn", "ny": "nya_Latn",
    "pl": "pol_Latn", "pt": "por_Latn", "ro": "ron_Latn", "ru": "rus_Cyrl", "si": "sin_Sinh",
    "sn": "sna_Latn", "so": "som_Latn", "sr": "srp_Cyrl", "sv": "swe_Latn", "sw": "swh_Latn",
    "te": "tel_Telu", "th": "tha_Thai", "tr": "tur_Latn", "uk": "ukr_Cyrl", "vi": "vie_Latn",
    "yo": "yor_Latn", "zh": "zho_Hans", "am": "amh_Ethi", "fil": "tgl_Latn",
}


class TaskDataError(ValueError):
    """Task data that cannot be used. The message names the file (or hub dataset), row/id and field."""


# ------------------------------------------------------------------------------------------ numbers

# lm-eval's MGSM "flexible-extract" pattern (lm_eval/tasks/mgsm/direct/direct_yaml).
FLEXIBLE_EXTRACT = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
INVALID = "[invalid]"  # lm-eval RegexFilter's fallback when nothing matches
# The exact_match settings of lm-eval's mgsm_direct (direct_yaml metric_list): no regexes_to_ignore.
MGSM_EXACT_MATCH = {"regexes_to_ignore": (), "ignore_case": True, "ignore_punctuation": True}
# How a generated answer is scored: "exact" = lm-eval's flexible-extract + exact_match (the default:
# accuracies comparable with published ones); "numeric" = the same extraction, then equal numbers
# ("18.0" = "18", "3.50" = "3.5"; but "-3" != "3" and "1.8" != "18", which "exact" accepts).
SCORINGS = ("exact", "numeric")


def canonical_number(text: Any) -> str | None:
    """The canonical string of a number, or None when ``text`` is not one.

    Rule: strip spaces; drop every ``$`` and ``,`` (commas are thousands separators, ``.`` is the
    decimal point: "1,000" -> "1000", "1.000" -> "1"); drop one trailing ``.`` (end of sentence);
    then the exact decimal value without a trailing zero or exponent: "18.0" -> "18",
    "3.50" -> "3.5", "-0" -> "0", "007" -> "7". Used for stored answers and by the ``numeric``
    scoring (lm-eval's MGSM compares strings: there "18.0" != "18").
    """
    if isinstance(text, bool) or text is None:
        return None
    s = str(text).strip().replace("$", "").replace(",", "")
    if s.endswith("."):
        s = s[:-1]
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex above admits only valid decimals
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def flexible_extract(text: str) -> str | None:
    """lm-eval's MGSM "flexible-extract" filter (``RegexFilter``): the LAST match of
    ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (``group_select: -1``), of its two groups the first non-empty
    one, stripped; the raw text ("18.", "$1,000", "..."). None where lm-eval gives "[invalid]"."""
    matches = FLEXIBLE_EXTRACT.findall(text or "")
    if not matches:
        return None
    return [g for g in matches[-1] if g][0].strip()


def extract_number(text: str) -> str | None:
    """The number ``flexible_extract`` finds, made canonical (``canonical_number``). None when nothing
    matches or when the last match is not a number ("It is 18. Done..." -> last match "...")."""
    got = flexible_extract(text)
    return None if got is None else canonical_number(got)


def exact_match(prediction: str, reference: str, *, regexes_to_ignore=(), ignore_case: bool = False,
                ignore_punctuation: bool = False) -> bool:
    """lm-eval's ``exact_match`` (``exact_match_hf_evaluate``, lm_eval/api/metrics.py) of one pair.
    In this order, to BOTH strings: delete every match of each of ``regexes_to_ignore``; lower-case;
    delete every ASCII punctuation character (``string.punctuation``, so "-", "." and "," go too:
    "-3" = "3", "1.8" = "18", "18.0" != "18"). Then equal strings."""
    for pattern in regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return prediction == reference


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r}; allowed: {', '.join(SCORINGS)}")


def generative_prediction(text: str, scoring: str = "exact") -> str:
    """What is compared with the answer: ``exact``: ``flexible_extract`` (raw match); ``numeric``:
    ``extract_number`` (canonical number). "" when there is none."""
    _check_scoring(scoring)
    got = flexible_extract(text) if scoring == "exact" else extract_number(text)
    return got or ""


def score_generative(predictions: list[str], answers: list[str], scoring: str = "exact") -> list[bool]:
    """Correctness of generated texts against canonical answers, element-wise (a batch function).

    ``exact`` (the default, lm-eval's mgsm_direct): ``exact_match(flexible_extract(text) or
    "[invalid]", answer, **MGSM_EXACT_MATCH)``. ``numeric``: ``extract_number(text)`` equals
    ``canonical_number(answer)``; no number -> incorrect. The answer is lm-eval's target
    (``str(answer_number)``): for MGSM an integer such as "18".
    """
    _check_scoring(scoring)
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    out = []
    for pred, ans in zip(predictions, answers):
        gold = canonical_number(ans)
        if gold is None:
            raise ValueError(f"answer {ans!r} is not a number")
        got = generative_prediction(pred, scoring)
        if scoring == "exact":
            out.append(exact_match(got or INVALID, gold, **MGSM_EXACT_MATCH))
        else:
            out.append(got == gold)
    return out


# ------------------------------------------------------------------------------------ multiple choice


CHOICE_MODES = ("letters", "texts")


def choice_continuations(example: dict, mode: str = "letters") -> list[str]:
    """The continuations scored by log-likelihood after the prompt, joined with lm-eval's default
    ``target_delimiter`` " ".

    - ``letters`` (the default, for real data): " A", " B", " C", " D", as lm-eval's global_mmlu and
      belebele tasks (``doc_to_choice: ["A", "B", "C", "D"]``).
    - ``texts``: " " + each option's text, as lm-eval's ARC/HellaSwag-style tasks
      (``doc_to_choice`` = the options). The synthetic world uses it: binding an answer to a letter
      is an ability that emerges late in real LLMs, and a model of a few hundred thousand
      parameters trained for minutes does not acquire it (measured: a 6-layer world model trained
      only on letter-scored questions stayed at chance, loss ln 4, for 600 steps; scored on the
      option texts it reached 1.0 in 200 steps).
    """
    if mode == "letters":
        return [" " + LETTERS[i] for i in range(len(example["choices"]))]
    if mode == "texts":
        return [" " + str(c) for c in example["choices"]]
    raise ValueError(f"choice mode {mode!r}; allowed: {', '.join(CHOICE_MODES)}")


def score_choices(loglikelihoods: list[list[float]], answers: list[str]) -> tuple[list[str], list[bool]]:
    """Predicted letters and correctness from each example's per-choice summed log-likelihoods.

    lm-eval's ``acc``: the prediction is the argmax of the summed log-likelihoods (no length
    normalisation; that would be ``acc_norm``). Ties go to the FIRST maximum, as ``numpy.argmax``.
    A NaN log-likelihood is an error.
    """
    if len(loglikelihoods) != len(answers):
        raise ValueError(f"{len(loglikelihoods)} rows of log-likelihoods but {len(answers)} answers")
    letters, correct = [], []
    for i, (row, ans) in enumerate(zip(loglikelihoods, answers)):
        row = [float(x) for x in row]
        if not row or len(row) > len(LETTERS):
            raise ValueError(f"row {i}: {len(row)} log-likelihoods; expected 1..{len(LETTERS)}")
        if any(math.isnan(x) for x in row):
            raise ValueError(f"row {i}: NaN log-likelihood in {row}")
        best = max(range(len(row)), key=lambda j: (row[j], -j))  # first maximum
        letters.append(LETTERS[best])
        correct.append(LETTERS[best] == ans)
    return letters, correct


# ------------------------------------------------------------------------------------------ prompts


def prompt_generative(example: dict) -> str:
    """MGSM direct: ``"Question: {question}\\nAnswer:"``.

    lm-eval's mgsm_direct localises the two words per language (e.g. "Frage: ...\\nAntwort:"); we
    use the English words for every language on purpose, so that the only difference between the
    parallel prompts compared by routing is the translated question itself.
    """
    return f"Question: {example['question'].strip()}\nAnswer:"


def prompt_multiple_choice(example: dict) -> str:
    """Global-MMLU (lm-eval global_mmlu template): question, then "A. ..." lines, then "Answer:"."""
    lines = [example["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(example["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def prompt_passage_multiple_choice(example: dict) -> str:
    """Belebele (lm-eval belebele template): "P: passage", "Q: question", "A: ..." lines, "Answer:".

    lm-eval's template ends in a full-width colon "Answer："; we use the ASCII ":" as in the
    Global-MMLU template (a deliberate departure: the continuations " A".." D" are the same).
    """
    lines = [f"P: {example['passage']}", f"Q: {example['question'].strip()}"]
    lines += [f"{LETTERS[i]}: {c}" for i, c in enumerate(example["choices"])]
    return "\n".join(lines) + "\nAnswer:"


# ----------------------------------------------------------------------- native rows -> records


def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise TaskDataError(f"field {key!r}: missing")
    return str(v)


def _row_id(row: dict, fmt: str, index: int) -> str:
    """The id of a row: its ``id``; else Global-MMLU's ``sample_id``; else Belebele's
    "{link}#{question_number}" (together they name a question in every language); else the
    position, "{mgsm|mmlu|belebele}-{index:04d}" (so line i of every MGSM file is "mgsm-{i:04d}")."""
    for keys in (("id",), ("sample_id",), ("link", "question_number")):
        if all(row.get(k) not in (None, "") for k in keys):
            return "#".join(str(row[k]) for k in keys)
    return f"{FORMATS[fmt]['id_prefix']}-{index:04d}"


def _mgsm_from_native(row: dict, language: str, index: int) -> dict:
    """MGSM (juletxara/mgsm or a tsv line): question + answer_number (hub) or answer (tsv)."""
    raw = row.get("answer_number")
    if raw is None:
        raw = row.get("answer")
    return {"id": _row_id(row, "generative_numeric", index), "language": language,
            "question": _text(row, "question"), "passage": "", "choices": [], "answer": _answer_number(raw)}


def _mmlu_from_native(row: dict, language: str, index: int) -> dict:
    """Global-MMLU: question, option_a..option_d, answer letter (kept as the letter)."""
    return {"id": _row_id(row, "multiple_choice", index), "language": language, "question": _text(row, "question"),
            "passage": "", "choices": [_text(row, f"option_{c}") for c in "abcd"],
            "answer": _answer_letter(row.get("answer"))}


def _belebele_from_native(row: dict, language: str, index: int) -> dict:
    """Belebele: flores_passage, question, mc_answer1..4, correct_answer_num "1".."4" -> "A".."D"."""
    num = str(row.get("correct_answer_num", "")).strip()
    if num not in ("1", "2", "3", "4"):
        raise TaskDataError(f"field 'correct_answer_num': {row.get('correct_answer_num')!r} is not one of 1, 2, 3, 4")
    return {"id": _row_id(row, "passage_multiple_choice", index), "language": language,
            "question": _text(row, "question"), "passage": _text(row, "flores_passage"),
            "choices": [_text(row, f"mc_answer{i}") for i in range(1, 5)], "answer": LETTERS[int(num) - 1]}


def _answer_number(raw: Any) -> str:
    if raw is None or str(raw).strip() == "":
        raise TaskDataError("field 'answer': missing")
    num = canonical_number(raw)
    if num is None:
        raise TaskDataError(f"field 'answer': {raw!r} is not a number")
    return num


def _answer_letter(raw: Any) -> str:
    if raw is None or str(raw).strip() == "":
        raise TaskDataError("field 'answer': missing")
    letter = str(raw).strip().upper()
    if letter not in LETTERS:
        raise TaskDataError(f"field 'answer': {raw!r} is not one of {', '.join(LETTERS)}")
    return letter


# The three task formats. prompt: record -> prompt string. output: what the model produces for it
# ("generate": greedy text until "\n", scored by score_generative; "loglikelihood": summed
# log-likelihood of each of choice_continuations(record) after the prompt, scored by score_choices).
# from_native: native hub row -> record. id_prefix: ids of rows that carry none.
FORMATS: dict[str, dict[str, Any]] = {
    "generative_numeric": {"prompt": prompt_generative, "output": "generate", "score": score_generative,
                           "from_native": _mgsm_from_native, "id_prefix": "mgsm"},
    "multiple_choice": {"prompt": prompt_multiple_choice, "output": "loglikelihood", "score": score_choices,
                        "from_native": _mmlu_from_native, "id_prefix": "mmlu"},
    "passage_multiple_choice": {"prompt": prompt_passage_multiple_choice, "output": "loglikelihood",
                                "score": score_choices, "from_native": _belebele_from_native, "id_prefix": "belebele"},
}


def build_prompt(example: dict, fmt: str) -> str:
    return FORMATS[fmt]["prompt"](example)


def check_example(ex: dict, fmt: str) -> dict:
    """Checks a canonical record and returns it normalised; raises TaskDataError naming the field."""
    if not str(ex.get("id") or "").strip():
        raise TaskDataError("field 'id': missing or empty")
    if not str(ex.get("question") or "").strip():
        raise TaskDataError("field 'question': empty")
    choices = ex.get("choices") or []
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
        raise TaskDataError(f"field 'choices': {choices!r} is not a list")
    out = {"id": str(ex["id"]), "language": str(ex.get("language") or ""), "question": str(ex["question"]),
           "passage": str(ex.get("passage") or ""), "choices": ["" if c is None else str(c) for c in choices],
           "answer": ex.get("answer")}
    if fmt == "generative_numeric":
        if out["choices"]:
            raise TaskDataError(f"field 'choices': a generative example has none, got {len(out['choices'])}")
        out["answer"] = _answer_number(out["answer"])
    else:
        if len(out["choices"]) != 4 or any(not c.strip() for c in out["choices"]):
            raise TaskDataError(f"field 'choices': need exactly 4 non-empty choices, got {out['choices']!r}")
        out["answer"] = _answer_letter(out["answer"])
        if fmt == "passage_multiple_choice" and not out["passage"].strip():
            raise TaskDataError("field 'passage': empty")
    return out


def example_from_row(row: dict, fmt: str, language: str, index: int) -> dict:
    """A checked record from one row (``index``: its 0-based position) of either schema:
    canonical (has ``id``, ``question``, ``answer`` and, for multiple choice, ``choices``; other
    columns are ignored) or the native hub schema of the format (MGSM / Global-MMLU / Belebele)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown task format {fmt!r}; one of {', '.join(FORMATS)}")
    if all(k in row for k in ("id", "question", "answer")) and (fmt == "generative_numeric" or "choices" in row):
        ex = {k: row.get(k) for k in FIELDS}
        ex["language"] = language
    else:
        ex = FORMATS[fmt]["from_native"](row, language, index)
    return check_example(ex, fmt)


# ---------------------------------------------------------------------------------------- loading
#
# Local layout: ``task.source`` is a folder (relative paths are resolved against ``root``, default
# the current directory), holding for each language exactly one of
#   mgsm_<lang>.tsv   MGSM as published: no header, 2 tab-separated columns question<TAB>answer,
#                     line i (0-based) of every language is example "mgsm-{i:04d}";
#   <lang>.jsonl      one JSON object per line,
#   <lang>.parquet    one row per example,
#   <lang>.tsv        a header row naming the columns, then one row per example (no quoting);
# where rows have the canonical schema (id, question, answer, optional passage and choices; choices
# as a list, so jsonl/parquet only) or the native hub schema of the format (MGSM: question +
# answer_number or answer; Global-MMLU: question, option_a..option_d, answer [, sample_id];
# Belebele: flores_passage, question, mc_answer1..4, correct_answer_num [, link, question_number]).
# Rows without an id are numbered by position, "<mgsm|mmlu|belebele>-{index:04d}".
#
# "row N" in a message is the line N an editor shows for a text file (tsv: the header is line 1, so
# the first example of a headed tsv is row 2; jsonl: blank lines count), and the N-th row counted
# from 1 for parquet and hub data.
#
# Hub: a ``source`` of the form owner/name that is not a local folder, and that is not path-like
# (``local_only``), is a hub dataset, read split "test" in streaming mode; its config is the
# language code (juletxara/mgsm, CohereLabs/Global-MMLU) or, for Belebele, the FLORES-200 code from
# BELEBELE_FLORES.

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OFFLINE_MISS = "not in the local HF cache (offline)"


def local_only(ref: str, root: str | os.PathLike | None = None) -> bool:
    """A reference (task source, model path) that can only be a local path: it starts with '.', '/'
    or '~', is not of the hub form owner/name, or its parent folder exists under ``root`` (default:
    the current folder): 'data/mgsm' with a folder 'data' is a path typo, never a hub id."""
    if ref.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(ref):
        return True
    return (Path(root or ".") / ref).parent.is_dir()


def hub_reason(error: Exception) -> str:
    """Why a hub id could not be read, for a message that also names the local reading: with the hub
    offline (HF_HUB_OFFLINE) it is not in the local cache; otherwise the hub's own first line."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return OFFLINE_MISS
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def locate(task_source: str, root: str | os.PathLike | None = None) -> tuple[str, Path | str]:
    """("local", folder) or ("hub", dataset id). A folder under ``root`` (default: the current folder)
    is local; a missing ``local_only`` source is refused here (no hub lookup); anything else is a hub id."""
    p = Path(task_source).expanduser()
    if not p.is_absolute():
        p = Path(root or ".") / p
    if p.is_dir():
        return "local", p
    if p.exists() or local_only(task_source, root):
        what = "is a file, not a folder" if p.exists() else "does not exist"
        raise TaskDataError(f"no local folder {str(p.absolute())!r} ({what}; a local source is a folder of "
                            "per-language files)")
    return "hub", task_source


def _languages_in(folder: Path) -> list[str]:
    names = [f.name for f in folder.iterdir() if f.suffix in (".tsv", ".jsonl", ".parquet")]
    return sorted({n.removeprefix("mgsm_").rsplit(".", 1)[0] for n in names})


def language_file(folder: Path, language: str) -> Path:
    names = [f"mgsm_{language}.tsv", f"{language}.jsonl", f"{language}.parquet", f"{language}.tsv"]
    found = [folder / n for n in names if (folder / n).is_file()]
    if not found:
        raise TaskDataError(f"{folder}: no file for language {language!r}; expected one of {', '.join(names)} "
                            f"(languages in the folder: {', '.join(_languages_in(folder)) or 'none'})")
    if len(found) > 1:
        raise TaskDataError(f"{folder}: several files for language {language!r} ({', '.join(f.name for f in found)}); keep one")
    return found[0]


def _text_lines(path: Path) -> list[str]:
    """The file's lines (a last empty one dropped), read as UTF-8 without a byte-order mark."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first field
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _read_tsv(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; strict: every row has exactly as many columns as expected."""
    lines = _text_lines(path)
    headerless = path.name.startswith("mgsm_")
    columns = ["question", "answer"] if headerless else lines[0].split("\t") if lines else []
    first = 1 if headerless else 2
    rows = []
    for n, line in enumerate(lines[0 if headerless else 1:], start=first):
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise TaskDataError(
                f"{path}: row {n}: {len(cells)} tab-separated columns, expected {len(columns)} "
                f"({'<TAB>'.join(columns)}); field {columns[-1]!r} is followed by an extra column"
                if len(cells) > len(columns) else
                f"{path}: row {n}: {len(cells)} tab-separated columns, expected {len(columns)} "
                f"({'<TAB>'.join(columns)}); field {columns[len(cells)]!r} is missing"
            )
        rows.append((n, dict(zip(columns, cells))))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs, one JSON object per non-blank line (parsed here, not by pyarrow, so that
    a bad line is reported by the line number an editor shows)."""
    rows = []
    for n, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}: row {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}: row {n}: a JSON {type(row).__name__}, expected an object {{...}}")
        rows.append((n, row))
    return rows


def _read_datasets(kind: str, data_files: str | None = None, hub_id: str | None = None,
                   config: str | None = None, label: str = "", local: Path | None = None) -> list[tuple[int, dict]]:
    """(row number from 1, row) pairs of a local parquet file or a hub dataset; ``local``: the folder a
    hub id would have been, named when the hub does not have it either."""
    import datasets

    try:
        if hub_id is not None:
            ds = datasets.load_dataset(hub_id, config, split="test", streaming=True)
        else:
            ds = datasets.load_dataset(kind, data_files=data_files, split="train", streaming=True)
        return [(i + 1, dict(row)) for i, row in enumerate(ds)]
    except TaskDataError:
        raise
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        if hub_id is None:
            raise TaskDataError(f"{label}: cannot read ({type(e).__name__}: {e})") from None
        raise TaskDataError(f"no local folder {str(local)!r}; as a hub id: {hub_reason(e)}") from None
    except Exception as e:  # datasets / pyarrow / network errors: say which file
        raise TaskDataError(f"{label}: cannot read ({type(e).__name__}: {e})") from None


def _rows(task_source: str, language: str, root) -> tuple[str, list[tuple[int, dict]]]:
    kind, where = locate(task_source, root)
    if kind == "hub":
        config = BELEBELE_FLORES.get(language) if "belebele" in str(where).lower() else language
        if config is None:
            raise TaskDataError(f"{where}: language {language!r} has no FLORES-200 code in BELEBELE_FLORES")
        label, local = f"{where}[{config}]", (Path(root or ".") / task_source).absolute()
        return label, _read_datasets("hub", hub_id=str(where), config=config, label=label, local=local)
    path = language_file(where, language)
    if path.suffix == ".tsv":
        return str(path), _read_tsv(path)
    if path.suffix == ".jsonl":
        return str(path), _read_jsonl(path)
    return str(path), _read_datasets("parquet", data_files=str(path), label=str(path))


_LOADED: dict[tuple, tuple[str, list[dict], list[int]]] = {}  # _load's local files, this process (see _load)
_LOADED_MAX = 64


def _file_key(task_cfg, language: str, root) -> tuple | None:
    """What a local file's checked records depend on: its path and content (a digest: reading and hashing
    the bytes costs a fraction of parsing and checking them), the format and the language (None for a hub
    dataset)."""
    kind, where = locate(task_cfg.source, root)
    if kind == "hub":
        return None
    path = language_file(where, language)
    return str(path.resolve()), hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(), task_cfg.format, language


def _load(task_cfg, language: str, root) -> tuple[str, list[dict], list[int]]:
    """(label, checked records, the row number of each: see "row N" above). A local file read and checked
    before in this process, with the same content (``_file_key``), is not parsed and checked again: a sweep's trial process
    plans every trial of a cell from the same files. The records are the caller's own (shallow) copies."""
    key = _file_key(task_cfg, language, root)
    if key is None:
        return _read_and_check(task_cfg, language, root)
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = _read_and_check(task_cfg, language, root)
    label, out, rows = _LOADED[key]
    return label, [dict(ex) for ex in out], list(rows)


def _read_and_check(task_cfg, language: str, root) -> tuple[str, list[dict], list[int]]:
    label, rows = _rows(task_cfg.source, language, root)
    out, seen = [], {}
    for index, (n, row) in enumerate(rows):
        try:
            ex = example_from_row(row, task_cfg.format, language, index)
        except TaskDataError as e:
            raise TaskDataError(f"{label}: row {n} (id {_row_id(row, task_cfg.format, index)!r}), {e}") from None
        if ex["id"] in seen:
            raise TaskDataError(f"{label}: row {n}, field 'id': {ex['id']!r} repeats row {seen[ex['id']]}")
        seen[ex["id"]] = n
        out.append(ex)
    if not out:
        raise TaskDataError(f"{label}: no examples")
    return label, out, [n for n, _ in rows]


def load_examples(task_cfg, language: str, *, root: str | os.PathLike | None = None) -> list[dict]:
    """The checked records of one language, in file order (see the layout above). Writes nothing."""
    return _load(task_cfg, language, root)[1]


def load_parallel(task_cfg, languages: Iterable[str], *, root: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """English plus every language of ``languages``, checked to be parallel, before any model loads.

    Checks (each failure is a TaskDataError naming file, row/id and field): every record is valid
    (``check_example``); ids are unique in each language; every language has exactly English's ids
    (the missing and extra ids are listed); and the same id has the same answer in every language
    (the first row where it differs is named: a dropped or inserted line shifts everything after
    it). Returns {language: records}, every list in English's order, so index i is the same example
    in every language. Writes nothing.
    """
    langs = ["en"] + [l for l in dict.fromkeys(languages) if l != "en"]
    loaded = {l: _load(task_cfg, l, root) for l in langs}
    en_label, en, _ = loaded["en"]
    en_ids = [ex["id"] for ex in en]
    en_answer = {ex["id"]: ex["answer"] for ex in en}
    out = {"en": en}
    for lang in langs[1:]:
        label, recs, rows = loaded[lang]
        by_id = {ex["id"]: ex for ex in recs}
        problems = []
        missing = [i for i in en_ids if i not in by_id]
        extra = [ex["id"] for ex in recs if ex["id"] not in en_answer]
        if missing:
            problems.append(f"missing ids (in {Path(en_label).name} but not here): {_few(missing)}")
        if extra:
            problems.append(f"extra ids (not in {Path(en_label).name}): {_few(extra)}")
        for n, ex in zip(rows, recs):
            if ex["id"] in en_answer and ex["answer"] != en_answer[ex["id"]]:
                problems.append(
                    f"row {n} (id {ex['id']!r}), field 'answer': {ex['answer']!r} but English has "
                    f"{en_answer[ex['id']]!r} (a dropped or inserted line before this row?)"
                )
                break
        if problems:
            raise TaskDataError(f"{label} (language {lang!r}) is not parallel to English ({len(recs)} examples, "
                                f"English {len(en)}): " + "; ".join(problems))
        out[lang] = [by_id[i] for i in en_ids]
    return out


def _few(ids: list[str], k: int = 10) -> str:
    shown = ", ".join(ids[:k])
    return f"{shown} (+{len(ids) - k} more)" if len(ids) > k else shown


# ------------------------------------------------------------------------------------------ split


def split_ids(ids: Iterable[str], *, seed: int,
              fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[str]]:
    """{"train", "validation", "test"} -> ids, decided by a hash of (seed, id), never by position.

    Rule: each id gets the key sha256(f"{seed}\\x00{id}"); ids are ranked by that key and the first
    round(n·train) go to train, the next round(n·validation) to validation, the rest to test (exact
    sizes, so small sets get every split). Each list is sorted by id. The result depends only on the
    seed and the SET of ids: identical for every language of a parallel task and unchanged when
    rows are reordered.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("split_ids: repeated ids")
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions {fractions!r}: need three non-negative numbers (train, validation, test) summing to 1")
    ranked = sorted(ids, key=lambda i: (hashlib.sha256(f"{seed}\x00{i}".encode()).hexdigest(), i))
    n_train = round(len(ids) * fr[0])
    n_val = min(round(len(ids) * fr[1]), len(ids) - n_train)
    parts = (ranked[:n_train], ranked[n_train:n_train + n_val], ranked[n_train + n_val:])
    return {name: sorted(part) for name, part in zip(SPLITS, parts)}
