"""The synthetic multilingual world: exact translations, graded languages, cached seeded builds."""

import re

import pytest
import torch
from safetensors.torch import load_file

from ramoe_ray import sources
from ramoe_ray import synthetic as S
from ramoe_ray.config import ConfigError, TaskConfig, config_from_dict
from ramoe_ray.tasks import load_parallel


def test_lexicon_is_seeded_and_graded():
    lex = S.lexicon(0)
    assert lex == S.lexicon(0) and lex != S.lexicon(1)
    english = set(S.CONCEPTS)
    shares = {}
    for code in S.TARGET_LANGUAGES:
        forms = lex[code]
        own = [f for c, f in forms.items() if f != c]
        assert len(set(own)) == len(own) and not set(own) & english  # own forms unique, never English
        shares[code] = 1 - len(own) / len(forms)
        assert abs(shares[code] - S.LANGUAGES[code].share) < 0.15
    assert shares["syn1"] > shares["syn3"] > shares["syn6"]


@pytest.mark.parametrize("task", list(S.TASKS))
def test_task_examples_are_exact_translations_with_correct_answers(task):
    ex, keys = S.task_examples(task, 50, seed=3)
    assert len(keys) == 50 and set(ex) == set(S.LANGUAGES)
    en = ex["en"]
    for records in ex.values():
        assert [r["id"] for r in records] == [r["id"] for r in en]
        assert [r["answer"] for r in records] == [r["answer"] for r in en]
    for r in en:
        if task == "arith":  # recompute the answer from the English text
            nums = [int(x) for x in re.findall(r"\b\d+\b", r["question"])]
            a, b = nums[0], nums[1]
            assert int(r["answer"]) == (a + b if " gets " in r["question"] else a - b)
        else:
            right = r["choices"]["ABCD".index(r["answer"])]
            if task == "passage":
                assert right in r["passage"].split() and sum(c in r["passage"].split() for c in r["choices"]) == 1
            else:
                cat = r["question"].split()[-2]
                assert right in S.CATEGORIES[cat]
                assert sum(c in S.CATEGORIES[cat] for c in r["choices"]) == 1
    sov = ex["syn2"][0]["question"].split()
    assert S.LANGUAGES["syn2"].sov and sov != en[0]["question"].split()


def test_pretraining_never_contains_a_benchmark_problem():
    import random

    spec = S.SMALL
    bench, exclude = {}, set()
    for task in S.TASKS:
        ex, keys = S.task_examples(task, spec.n_task_examples, spec.seed)
        exclude |= keys
        bench.update({S.prompt(r): r for rs in ex.values() for r in rs})
    docs = S.pretraining_documents(spec, exclude, random.Random(0), 3000)
    task_docs = [(t, a) for t, a in docs if a]
    assert len(task_docs) > 500 and all("Answer:" in t for t, _ in task_docs)  # the corpus does hold task documents...
    assert not [t for t, _ in task_docs if t in bench]  # ...but none of the benchmark's


def test_world_task_files_load_through_the_real_task_loader(tmp_path):
    data = S.build_data(S.SMALL, tmp_path)
    for task, fmt in S.TASKS.items():
        cfg = TaskConfig(name=task, format=fmt, source=str(data / "tasks" / task))
        loaded = load_parallel(cfg, S.TARGET_LANGUAGES)
        assert len(loaded["en"]) == S.SMALL.n_task_examples
        assert loaded["syn3"][5]["id"] == loaded["en"][5]["id"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    rec = loaded["syn6"][0]
    ids = tok(S.prompt(rec))["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == " ".join(S.prompt(rec).split())  # words, not layout


def test_reduced_world_build_is_seeded_and_cached(tmp_path, monkeypatch):
    a = S.build_model(S.SMALL, "olmoe", tmp_path / "a", log_every=0)
    b = S.build_model(S.SMALL, "olmoe", tmp_path / "b", log_every=0)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    report = (a / "report.json").read_text()
    assert '"syn6"' in report and '"arith"' in report

    calls = []
    monkeypatch.setattr(S, "pretrain", lambda *args, **kw: calls.append(1))
    assert S.build_model(S.SMALL, "olmoe", tmp_path / "a", log_every=0) == a  # cache hit: no pretraining
    assert calls == []
    other = S.WorldSpec(**{**S.SMALL.__dict__, "seed": 1})
    assert other.key() != S.SMALL.key()


def test_synthetic_schemes_resolve_to_the_cached_world(tmp_path):
    """Config paths "synthetic-small:FAMILY" / sources "synthetic-small:TASK" resolve (sources.resolve) to the
    same cached world that build_model/build_data produce; mismatched formats and families are refused by
    sources.check, before anything is built."""
    d = dict(models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
             tasks=[dict(name="a", format="generative_numeric", source="synthetic-small:arith")], languages=["syn3"],
             cache_dir=str(tmp_path))
    cfg = config_from_dict(d)
    shape = sources.check(cfg)["m"]
    assert (shape.num_layers, shape.num_experts) == (S.SMALL.num_layers, S.SMALL.num_experts)
    assert not (tmp_path / "world").exists()  # the shape came from the spec: nothing built
    resolved = sources.resolve(cfg)
    par = load_parallel(resolved.tasks[0], ["syn3"])
    want, _ = S.task_examples("arith", S.SMALL.n_task_examples, S.SMALL.seed)
    assert par["syn3"] == want["syn3"] and par["en"] == want["en"]
    assert resolved.models[0].path == str(S.build_model(S.SMALL, "olmoe", tmp_path).resolve())
    assert resolved.tasks[0].general_source == str(S.general_file(S.SMALL, "en", tmp_path).resolve())
    assert sources.resolve(resolved) == resolved  # resolving twice changes nothing
    with pytest.raises(ConfigError, match="a generative_numeric task, but tasks.0.format is 'multiple_choice'"):
        sources.check(config_from_dict({**d, "tasks": [dict(name="a", format="multiple_choice", source="synthetic:arith")]}))
    with pytest.raises(ConfigError, match="a olmoe model, but models.0.family is 'mixtral'"):
        sources.check(config_from_dict({**d, "models": [dict(name="m", family="mixtral", path="synthetic:olmoe")]}))


def test_pretraining_batches_weight_exactly_the_answer_tokens(tmp_path):
    """_batches: weight answer_weight on each task document's answer token(s), 1 elsewhere; the
    packed stream is the documents' tokens joined by <eos>."""
    import dataclasses

    from transformers import AutoTokenizer

    spec = dataclasses.replace(S.SMALL, answer_weight=5.0, task_fraction=1.0, languages=("en",))  # task documents only
    tok = AutoTokenizer.from_pretrained(S.build_data(spec, tmp_path) / "tokenizer")
    ids, w = next(S._batches(spec, tok, set(), seed=0))
    ids, w = ids.flatten().tolist(), w.flatten().tolist()
    eos = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert eos and set(w) == {1.0, 5.0}
    for i, weight in enumerate(w):
        # an answer token is the last token before an <eos> (every world answer is one token)
        is_answer = i + 1 in eos
        assert (weight == 5.0) == is_answer, (i, ids[max(0, i - 3): i + 2])
