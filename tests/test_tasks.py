import json
import random
import re
import shutil
from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
from pydantic import ValidationError

from ramoe_ray.config import TaskConfig
from ramoe_ray.tasks import (
    FIELDS,
    FORMATS,
    SCORINGS,
    TaskDataError,
    build_prompt,
    canonical_number,
    choice_continuations,
    exact_match,
    example_from_row,
    extract_number,
    flexible_extract,
    generative_prediction,
    load_examples,
    load_parallel,
    score_choices,
    score_generative,
    split_ids,
)

MGSM = Path(__file__).parents[2] / "shared/data/mgsm"
MGSM_LANGS = ["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]


def mgsm_task(source) -> TaskConfig:
    return TaskConfig(name="mgsm", format="generative_numeric", source=str(source))


def listing(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$1,000", "1000"),
        ("The answer is 18.", "18"),
        ("It costs $1,000.50 in total", "1000.5"),
        ("3.50", "3.5"),
        ("18.0", "18"),
        ("-3", "-3"),
        ("The temperature fell to -12 degrees", "-12"),
        ("She had 5 apples, then 7 more, so 12", "12"),  # several numbers: the LAST counts
        ("12 is the answer, not 5", "5"),  # ... even when the right one comes first
        ("costs 5 dollars", "5"),  # a single digit: the second alternative of the regex
        ("no number here", None),
        ("", None),
        ("It is 18. Done...", None),  # lm-eval quirk: the last match is "..." -> no number
        ("Answer: 1,234,567", "1234567"),
    ],
)
def test_extract_number_follows_flexible_extract(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("18", "18"), (18, "18"), ("18.0", "18"), ("3.50", "3.5"), ("-0", "0"), ("007", "7"), ("5,600", "5600"),
     ("1.000", "1"), (".5", "0.5"), ("$20", "20"), ("abc", None), ("1.2.3", None), ("", None), (None, None)],
)
def test_canonical_number(raw, expected):
    assert canonical_number(raw) == expected


# lm-eval's mgsm_direct, row by row: model output, reference, expected correctness written by hand from
# lm-eval's flexible-extract (last match of (-?[$0-9.,]{2,})|(-?[0-9]+); nothing -> "[invalid]") and its
# exact_match with ignore_case + ignore_punctuation (string.punctuation deleted from BOTH strings).
LM_EVAL_MGSM_DIRECT = [
    ("18", "18", True),  # the bare number
    (" 18", "18", True),  # the space a model puts after "Answer:" is not in the match
    ("The answer is 18.", "18", True),  # match "18." (two chars of the class); "." is punctuation, deleted
    ("18.0", "18", False),  # "18.0" -> "180" != "18": no numeric normalisation (the point of `exact`)
    ("$18", "18", True),  # "$" is punctuation
    ("$1,800", "1800", True),  # "$" and "," deleted
    ("18 apples", "18", True),  # the words are not in the match
    ("#### 18", "18", True),  # "#" is not in the pattern's class; the match is "18"
    ("-3", "-3", True),  # "-" deleted from both: "3" = "3"
    ("3", "-3", True),  # ... so the sign is lost: a positive answer matches a negative reference
    ("3.50", "3.5", False),  # "350" != "35"
    ("3.5", "3.5", True),  # "35" = "35"
    ("1.8", "18", True),  # the decimal point is deleted: "18" = "18"
    ("18.000", "18", False),  # "18000" != "18"
    ("0018", "18", False),  # leading zeros stay: strings, not numbers
    ("", "18", False),  # no match -> "[invalid]" -> "invalid" != "18"
    ("eighteen", "18", False),  # a number in words is no match
    ("She had 5, then 7 more: 12", "12", True),  # several numbers: the LAST match counts
    ("12 is the answer, not 5", "12", False),  # ... even when the right one comes first
    ("It is 18. Done...", "18", False),  # the last match is "...": punctuation only, "" != "18"
    ("18\nQuestion: 4 more", "18", False),  # the scorer sees all of it (last match "4"); cutting at "\n" is generation's job
    ("1 8", "18", False),  # a space is not in the class: two matches "1", "8"; the last is "8"
    ("18/2", "18", False),  # "/" is not in the class: last match "2"
    ("18%", "18", True),  # "%" is not in the match
    ("(-18)", "18", True),  # the match "-18" loses its sign
]


@pytest.mark.parametrize("output, reference, expected", LM_EVAL_MGSM_DIRECT)
def test_exact_scoring_is_lm_eval_mgsm_direct(output, reference, expected):
    assert score_generative([output], [reference]) == [expected]
    assert score_generative([output], [reference], "exact") == [expected]


def test_exact_scoring_table_is_scored_in_one_batch():
    outputs, references, expected = zip(*LM_EVAL_MGSM_DIRECT)
    assert score_generative(list(outputs), list(references)) == list(expected)
    assert len(LM_EVAL_MGSM_DIRECT) >= 20


@pytest.mark.parametrize("text, expected", [("The answer is 18.", "18."), ("costs $1,000 now", "$1,000"),
                                            ("It is 18. Done...", "..."), ("-7 degrees", "-7"), ("none", None)])
def test_flexible_extract_returns_the_raw_last_match(text, expected):
    assert flexible_extract(text) == expected
    assert generative_prediction(text) == (expected or "")


def test_exact_match_applies_every_setting_to_both_strings():
    assert exact_match("18", "18.", regexes_to_ignore=[r"\.$"])  # the regex is removed from the reference too
    assert not exact_match("18", "18.")
    assert exact_match("#### 18", "18", regexes_to_ignore=[r"(?s).*#### "])
    assert exact_match("ABC", "abc", ignore_case=True) and not exact_match("ABC", "abc")
    assert exact_match("a-b.c", "abc", ignore_punctuation=True) and not exact_match("a-b.c", "abc", ignore_case=True)


def test_numeric_scoring_keeps_the_old_leniency():
    preds = ["The answer is 1,000.", "3.50", "18.0", "-3", "no idea", "17", "18 eggs, 3 eaten: 15", "$18", "0018", "3", "1.8"]
    answers = ["1000", "3.5", "18", "-3", "5", "18", "18", "18", "18", "-3", "18"]
    assert score_generative(preds, answers, "numeric") == [True, True, True, True, False, False, False, True, True, False, False]
    # the rows where the two scorings differ: numbers equal as numbers, or strings equal without punctuation
    assert score_generative(preds, answers) == [True, False, False, True, False, False, False, True, False, True, True]
    assert generative_prediction("It was 18.0 dollars", "numeric") == "18"
    assert generative_prediction("It was 18.0 dollars", "exact") == "18.0"


def test_scoring_is_a_task_config_choice_defaulting_to_exact():
    assert mgsm_task(MGSM).scoring == "exact"
    assert set(get_args(TaskConfig.model_fields["scoring"].annotation)) == set(SCORINGS)
    assert TaskConfig(name="m", format="generative_numeric", source="x", scoring="numeric").scoring == "numeric"
    with pytest.raises(ValidationError):
        TaskConfig(name="m", format="generative_numeric", source="x", scoring="loose")


def test_score_generative_rejects_bad_input():
    with pytest.raises(ValueError):
        score_generative(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="not a number"):
        score_generative(["1"], ["one"])
    with pytest.raises(ValueError, match="allowed: exact, numeric"):
        score_generative(["1"], ["1"], "loose")


# ------------------------------------------------------------------------------ multiple choice


def test_choice_continuations_are_letters():
    ex = {"choices": ["red", "green", "blue", "black"]}
    assert choice_continuations(ex) == [" A", " B", " C", " D"]


def test_choice_continuations_texts_mode_and_bad_mode():
    ex = {"choices": ["cat", "red apple", "7", "paris"]}
    assert choice_continuations(ex, "texts") == [" cat", " red apple", " 7", " paris"]
    assert choice_continuations(ex) == [" A", " B", " C", " D"]
    with pytest.raises(ValueError, match="allowed: letters, texts"):
        choice_continuations(ex, "words")


def test_score_choices_argmax_and_first_max_on_ties():
    lls = [
        [-4.0, -1.0, -3.0, -2.0],  # B best, answer B
        [-1.0, -1.0, -2.0, -3.0],  # tie A/B -> A (first max); answer B -> wrong
        [-5.0, -2.0, -9.0, -2.0],  # tie B/D -> B
        [-3.0, -2.0, -0.5, -7.0],  # correct answer in position C
        [-1.0, -2.0, -3.0, -4.0],  # A best, answer D -> wrong
    ]
    letters, correct = score_choices(lls, ["B", "B", "B", "C", "D"])
    assert letters == ["B", "A", "B", "C", "A"]
    assert correct == [True, False, True, True, False]


def test_score_choices_rejects_nan_and_length_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        score_choices([[0.0, float("nan"), 0.0, 0.0]], ["A"])
    with pytest.raises(ValueError):
        score_choices([[0.0] * 4], ["A", "B"])


# ------------------------------------------------------------------------------------- prompts

MMLU_ROW = {"sample_id": "astronomy/test/3", "question": " What is 2+2? ", "option_a": "3", "option_b": "4",
            "option_c": "5", "option_d": "22", "answer": "B", "subject": "astronomy"}
BELEBELE_ROW = {"link": "https://en.wikibooks.org/x", "question_number": 2, "flores_passage": "The cat sat.",
                "question": "Where did the cat sit?", "mc_answer1": "bed", "mc_answer2": "roof",
                "mc_answer3": "mat", "mc_answer4": "car", "correct_answer_num": "3", "dialect": "eng_Latn"}


def test_prompts_follow_lm_eval_templates():
    mmlu = example_from_row(MMLU_ROW, "multiple_choice", "en", 0)
    assert build_prompt(mmlu, "multiple_choice") == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    bele = example_from_row(BELEBELE_ROW, "passage_multiple_choice", "en", 0)
    assert build_prompt(bele, "passage_multiple_choice") == (
        "P: The cat sat.\nQ: Where did the cat sit?\nA: bed\nB: roof\nC: mat\nD: car\nAnswer:"
    )
    gen = example_from_row({"question": "How many?", "answer": "3"}, "generative_numeric", "de", 7)
    assert build_prompt(gen, "generative_numeric") == "Question: How many?\nAnswer:"
    assert set(FORMATS) == {"generative_numeric", "multiple_choice", "passage_multiple_choice"}


# ------------------------------------------------------------------------ native -> canonical


def test_native_rows_become_canonical_records():
    mmlu = example_from_row(MMLU_ROW, "multiple_choice", "de", 0)
    assert mmlu == {"id": "astronomy/test/3", "language": "de", "question": " What is 2+2? ", "passage": "",
                    "choices": ["3", "4", "5", "22"], "answer": "B"}
    bele = example_from_row(BELEBELE_ROW, "passage_multiple_choice", "sw", 0)
    assert bele["answer"] == "C" and bele["id"] == "https://en.wikibooks.org/x#2"
    assert bele["passage"] == "The cat sat." and bele["choices"] == ["bed", "roof", "mat", "car"]
    # juletxara/mgsm test rows: answer is None, answer_number holds the number
    mgsm = example_from_row({"question": "q", "answer": None, "answer_number": 1000, "equation_solution": None},
                            "generative_numeric", "fr", 12)
    assert mgsm == {"id": "mgsm-0012", "language": "fr", "question": "q", "passage": "", "choices": [], "answer": "1000"}
    assert tuple(mgsm) == FIELDS
    # a canonical row passes through (language set by the loader, answer normalised)
    canon = example_from_row({"id": "x1", "question": "q", "answer": "3.50", "language": "??"}, "generative_numeric", "ja", 0)
    assert canon == {"id": "x1", "language": "ja", "question": "q", "passage": "", "choices": [], "answer": "3.5"}


@pytest.mark.parametrize(
    "row, fmt, field",
    [
        ({**BELEBELE_ROW, "correct_answer_num": "5"}, "passage_multiple_choice", "correct_answer_num"),
        ({**BELEBELE_ROW, "flores_passage": " "}, "passage_multiple_choice", "passage"),
        ({**MMLU_ROW, "answer": "E"}, "multiple_choice", "answer"),
        ({**MMLU_ROW, "option_d": ""}, "multiple_choice", "choices"),
        ({k: v for k, v in MMLU_ROW.items() if k != "option_c"}, "multiple_choice", "option_c"),
        ({**MMLU_ROW, "question": "  "}, "multiple_choice", "question"),
        ({"id": "a", "question": "q", "choices": ["x", "y", "z"], "answer": "A"}, "multiple_choice", "choices"),
        ({"question": "q", "answer": "many"}, "generative_numeric", "answer"),
        ({"question": "q", "answer": ""}, "generative_numeric", "answer"),
    ],
)
def test_bad_rows_name_the_field(row, fmt, field):
    with pytest.raises(TaskDataError, match=f"field '{field}'"):
        example_from_row(row, fmt, "en", 0)


# -------------------------------------------------------------------------------------- loading


def test_real_mgsm_all_languages_are_parallel():
    before = listing(MGSM)
    data = load_parallel(mgsm_task(MGSM), [l for l in MGSM_LANGS if l != "en"])
    assert sorted(data) == sorted(MGSM_LANGS)
    en_ids = [ex["id"] for ex in data["en"]]
    assert en_ids == [f"mgsm-{i:04d}" for i in range(250)]
    for lang, recs in data.items():
        assert len(recs) == 250
        assert [ex["id"] for ex in recs] == en_ids
        assert [ex["answer"] for ex in recs] == [ex["answer"] for ex in data["en"]]
        assert all(ex["language"] == lang and ex["question"].strip() and ex["choices"] == [] for ex in recs)
    assert data["en"][0]["answer"] == "18" and data["de"][0]["question"].startswith("Janets Enten")
    assert data["zh"][249]["answer"] == "5600"  # "5,600" in the file
    assert listing(MGSM) == before


@pytest.fixture
def mgsm_copy(tmp_path):
    for lang in ("en", "de"):
        shutil.copy(MGSM / f"mgsm_{lang}.tsv", tmp_path / f"mgsm_{lang}.tsv")
    return tmp_path


def _edit_lines(path: Path, fn) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    path.write_text("\n".join(fn(lines)) + "\n", encoding="utf-8")


def test_dropped_line_names_file_ids_and_row(mgsm_copy):
    _edit_lines(mgsm_copy / "mgsm_de.tsv", lambda ls: ls[:100] + ls[101:])  # drop line 101 (mgsm-0100)
    before = listing(mgsm_copy)
    with pytest.raises(TaskDataError) as e:
        load_parallel(mgsm_task(mgsm_copy), ["de"])
    msg = str(e.value)
    assert "mgsm_de.tsv" in msg and "'de'" in msg
    assert "missing ids" in msg and "mgsm-0249" in msg
    # the first row whose answer no longer matches English is the dropped line's position
    assert "row 101 (id 'mgsm-0100'), field 'answer'" in msg
    assert listing(mgsm_copy) == before


def test_non_numeric_answer_names_file_row_field(mgsm_copy):
    _edit_lines(mgsm_copy / "mgsm_de.tsv", lambda ls: ls[:4] + [ls[4].split("\t")[0] + "\tzwölf"] + ls[5:])
    before = listing(mgsm_copy)
    with pytest.raises(TaskDataError) as e:
        load_parallel(mgsm_task(mgsm_copy), ["de"])
    msg = str(e.value)
    assert "mgsm_de.tsv" in msg and "row 5 (id 'mgsm-0004')" in msg and "field 'answer'" in msg and "zwölf" in msg
    assert listing(mgsm_copy) == before


def test_extra_column_names_file_and_row(mgsm_copy):
    _edit_lines(mgsm_copy / "mgsm_de.tsv", lambda ls: ls[:6] + [ls[6] + "\tnote"] + ls[7:])
    before = listing(mgsm_copy)
    with pytest.raises(TaskDataError) as e:
        load_parallel(mgsm_task(mgsm_copy), ["de"])
    msg = str(e.value)
    assert "mgsm_de.tsv" in msg and "row 7" in msg and "3 tab-separated columns, expected 2" in msg
    assert "field 'answer'" in msg
    assert listing(mgsm_copy) == before


def test_empty_question_and_missing_language_file(mgsm_copy):
    _edit_lines(mgsm_copy / "mgsm_de.tsv", lambda ls: ls[:2] + ["  \t3"] + ls[3:])
    with pytest.raises(TaskDataError, match=r"mgsm_de\.tsv: row 3 \(id 'mgsm-0002'\), field 'question'"):
        load_examples(mgsm_task(mgsm_copy), "de")
    with pytest.raises(TaskDataError, match=r"no file for language 'fr'.*mgsm_fr\.tsv"):
        load_parallel(mgsm_task(mgsm_copy), ["fr"])


def test_relative_source_resolves_against_root(mgsm_copy):
    recs = load_examples(mgsm_task(mgsm_copy.name), "en", root=mgsm_copy.parent)
    assert len(recs) == 250 and recs[0]["id"] == "mgsm-0000"
    with pytest.raises(TaskDataError, match="no local folder"):
        load_examples(mgsm_task("./not-there"), "en", root=mgsm_copy)


def test_jsonl_parquet_tsv_canonical_and_native(tmp_path):
    n = 6
    en = [{"sample_id": f"s{i}", "question": f"Q{i}?", "option_a": "a", "option_b": "b", "option_c": "c",
           "option_d": "d", "answer": "ABCD"[i % 4]} for i in range(n)]
    pd.DataFrame(en).to_parquet(tmp_path / "en.parquet")  # native Global-MMLU schema
    de = [{"id": f"s{i}", "question": f"F{i}?", "choices": ["w", "x", "y", "z"], "answer": "ABCD"[i % 4]}
          for i in reversed(range(n))]  # canonical schema, other row order
    (tmp_path / "de.jsonl").write_text("".join(json.dumps(r) + "\n" for r in de))
    cols = list(en[0])
    (tmp_path / "sw.tsv").write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in en))
    task = TaskConfig(name="mmlu", format="multiple_choice", source=str(tmp_path))
    before = listing(tmp_path)
    data = load_parallel(task, ["de", "sw"])
    assert listing(tmp_path) == before
    assert [ex["id"] for ex in data["de"]] == [f"s{i}" for i in range(n)]  # put in English order
    assert data["de"][1]["choices"] == ["w", "x", "y", "z"] and data["de"][1]["answer"] == "B"
    assert data["sw"][3] == {**data["en"][3], "language": "sw"}

    # a wrong letter in one language is caught with file, row, id and field
    de[0]["answer"] = "A" if de[0]["answer"] != "A" else "B"
    (tmp_path / "de.jsonl").write_text("".join(json.dumps(r) + "\n" for r in de))
    with pytest.raises(TaskDataError, match=r"de\.jsonl.*row 1 \(id 's5'\), field 'answer'"):
        load_parallel(task, ["de"])
    # an extra id in one language is listed
    de[0]["answer"] = "B"
    (tmp_path / "de.jsonl").write_text("".join(json.dumps(r) + "\n" for r in de + [{**de[0], "id": "s99"}]))
    with pytest.raises(TaskDataError, match=r"de\.jsonl.*extra ids.*s99"):
        load_parallel(task, ["de"])


def test_duplicate_id_is_an_error(tmp_path):
    rows = [{"id": "a", "question": "q", "answer": 1}, {"id": "a", "question": "q2", "answer": 2}]
    (tmp_path / "en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match=r"en\.jsonl: row 2, field 'id': 'a' repeats row 1"):
        load_examples(mgsm_task(tmp_path), "en")


# ---------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_order_free():
    ids = [f"mgsm-{i:04d}" for i in range(250)]
    s = split_ids(ids, seed=3)
    assert s == split_ids(ids, seed=3)
    assert {k: len(v) for k, v in s.items()} == {"train": 150, "validation": 50, "test": 50}
    parts = [set(v) for v in s.values()]
    assert set().union(*parts) == set(ids) and sum(len(p) for p in parts) == len(ids)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert split_ids(shuffled, seed=3) == s
    assert split_ids(ids, seed=4)["test"] != s["test"]
    # not by position: the test set is not a contiguous block of the input
    assert s["test"] != sorted(ids)[-50:] and s["test"] != sorted(ids)[:50]
    # membership depends on the id, not on the other ids: a subset keeps its ranking
    small = split_ids(ids[:10], seed=3, fractions=(0.5, 0.2, 0.3))
    assert [len(small[k]) for k in ("train", "validation", "test")] == [5, 2, 3]


def test_split_is_the_same_for_every_language():
    data = load_parallel(mgsm_task(MGSM), ["de", "zh"])
    splits = {lang: split_ids([ex["id"] for ex in recs], seed=0) for lang, recs in data.items()}
    assert splits["de"] == splits["en"] == splits["zh"]


def test_split_rejects_bad_fractions_and_repeats():
    with pytest.raises(ValueError, match="fractions"):
        split_ids(["a", "b"], seed=0, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="repeated"):
        split_ids(["a", "a"], seed=0)


def test_hub_sources_use_language_or_flores_config(monkeypatch):
    """The hub path, with datasets.load_dataset replaced by a fake (no network here)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split, streaming):
        calls.append((path, name, split, streaming))
        if path == "facebook/belebele":
            return iter([{**BELEBELE_ROW, "dialect": name}])
        return iter([{"question": "q", "answer": None, "answer_number": 7, "equation_solution": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bele = load_examples(TaskConfig(name="belebele", format="passage_multiple_choice", source="facebook/belebele"), "sw")
    mgsm = load_examples(TaskConfig(name="mgsm", format="generative_numeric", source="juletxara/mgsm"), "de")
    assert calls == [("facebook/belebele", "swh_Latn", "test", True), ("juletxara/mgsm", "de", "test", True)]
    assert bele[0]["answer"] == "C" and bele[0]["language"] == "sw"
    assert mgsm == [{"id": "mgsm-0000", "language": "de", "question": "q", "passage": "", "choices": [], "answer": "7"}]
    with pytest.raises(TaskDataError, match=r"facebook/belebele: language 'xx' has no FLORES-200 code"):
        load_examples(TaskConfig(name="belebele", format="passage_multiple_choice", source="facebook/belebele"), "xx")


def test_every_config_language_has_a_flores_code():
    from ramoe_ray.config import LANGUAGES
    from ramoe_ray.tasks import BELEBELE_FLORES

    assert set(BELEBELE_FLORES) == set(LANGUAGES)
    assert len(set(BELEBELE_FLORES.values())) == len(BELEBELE_FLORES)
    assert all(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", code) for code in BELEBELE_FLORES.values())


def test_a_file_read_before_is_parsed_again_only_when_its_content_changes(mgsm_copy, monkeypatch):
    """``load_parallel`` in one process (a sweep's trial process plans every trial from the same files): the
    second load parses no file and returns the caller's own records; an edited file (same size) is parsed
    again and its new content returned."""
    from ramoe_ray import tasks

    parsed = []
    real = tasks._read_tsv
    monkeypatch.setattr(tasks, "_read_tsv", lambda path: parsed.append(Path(path).name) or real(path))
    first = load_parallel(mgsm_task(mgsm_copy), ["de"])
    assert sorted(parsed) == ["mgsm_de.tsv", "mgsm_en.tsv"]
    first["de"][0]["question"] = "changed by the caller"
    second = load_parallel(mgsm_task(mgsm_copy), ["de"])
    assert sorted(parsed) == ["mgsm_de.tsv", "mgsm_en.tsv"]  # nothing parsed again
    assert second["de"][0]["question"] != "changed by the caller"
    assert second == load_parallel(mgsm_task(mgsm_copy), ["de"])
    size = (mgsm_copy / "mgsm_de.tsv").stat().st_size
    _edit_lines(mgsm_copy / "mgsm_de.tsv", lambda ls: [ls[0].replace("Janet", "Jabet", 1)] + ls[1:])
    assert (mgsm_copy / "mgsm_de.tsv").stat().st_size == size
    third = load_parallel(mgsm_task(mgsm_copy), ["de"])
    assert parsed.count("mgsm_de.tsv") == 2 and parsed.count("mgsm_en.tsv") == 1
    assert "Jabet" in third["de"][0]["question"] and "Janet" in second["de"][0]["question"]
