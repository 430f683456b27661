"""The synthetic multilingual world: exact translations, graded languages, cached seeded builds."""

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
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


# ------------------------------------------------------------------------------ the shipped world models

STALE = "remake the shipped models with `python bench/world.py --ship` (~20 min on 2 cores) and commit ramoe_ray/world/"


def _demo_families() -> set[str]:
    """The synthetic-world families of sweeps/demo.yaml's models."""
    demo = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "demo.yaml").read_text())
    return {S.parse_scheme(m["path"])[1] for m in demo["models"] if S.parse_scheme(m["path"])}


def _english_floor(family: str) -> float:
    """The English accuracy a world model of ``family`` must reach: 0.9 for the demo's (its ci pairs need it),
    0.75 for the others (mixtral's arith is 0.80)."""
    return 0.9 if family in _demo_families() else 0.75


def test_shipped_world_models_have_the_key_the_code_computes():
    """ramoe_ray/world/ holds the default world's models under the key the code computes now, for every world
    model of the demo: a change to synthetic.py or the spec fails here at once, instead of every first run
    pretraining for minutes."""
    spec = S.WORLDS["synthetic"]
    shipped = sorted(p.name for p in S.SHIPPED.glob("*"))
    assert shipped == [spec.key()], (f"ramoe_ray/world/ holds world {shipped}, the code computes {spec.key()}: synthetic.py "
                                     f"or the default WorldSpec changed; {STALE}")
    assert sorted(p.name for p in (S.SHIPPED / spec.key()).iterdir()) == sorted(S.SHIPPED_FAMILIES)
    families = _demo_families()
    assert families and families <= set(S.SHIPPED_FAMILIES)


def test_the_default_world_model_is_copied_from_the_shipped_one(tmp_path, monkeypatch):
    """No pretraining: the cache gets the shipped files byte for byte, a model of the spec's shape; the demo's
    models' English is right (the demo's ci pairs need it; mixtral's arith is 0.80 in English)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(S, "pretrain", lambda *a, **k: pytest.fail("pretrained instead of copying the shipped model"))
    spec = S.WORLDS["synthetic"]
    for family in S.SHIPPED_FAMILIES:
        path, shipped = S.build_model(spec, family, tmp_path), S.shipped_model(spec, family)
        assert path == S.world_dir(spec, tmp_path) / "models" / family
        assert {p.name: p.read_bytes() for p in path.iterdir()} == {p.name: p.read_bytes() for p in shipped.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(path)
        assert S.shape_of_config(model.config) == S.shape_of_config(S.model_config(spec, family, model.config.vocab_size))
        english = json.loads((path / "report.json").read_text())["accuracy"]["en"]
        assert set(english) == set(S.TASKS) and min(english.values()) >= _english_floor(family), english


def test_a_shipped_model_is_used_only_under_its_key(tmp_path, monkeypatch, capsys, small_world):
    """A model shipped for the world's key is copied; a world of another key is pretrained, and says why."""
    built = small_world / S.SMALL.key() / "models" / "olmoe"
    monkeypatch.setattr(S, "SHIPPED", tmp_path / "shipped")
    shutil.copytree(built, S.SHIPPED / S.SMALL.key() / "olmoe")
    calls, pretrain = [], S.pretrain
    monkeypatch.setattr(S, "pretrain", lambda *a, **k: calls.append(1) or pretrain(*a, **k))
    copy = S.build_model(S.SMALL, "olmoe", tmp_path / "a", log_every=0)
    assert calls == [] and (copy / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    other = dataclasses.replace(S.SMALL, seed=1)
    S.build_model(other, "olmoe", tmp_path / "b", log_every=1000)
    assert calls == [1]
    assert f"pretraining its olmoe model on CPU (the package ships olmoe models for world {S.SMALL.key()} only" in capsys.readouterr().out


# Opt-in (RAMOE_REBUILD=1): a rebuild is 6-11 min of one core, a third of the suite on CI's slower hosts, and it
# checks what only changes with the world, torch or transformers (a change to synthetic.py already fails
# test_shipped_world_models_have_the_key_the_code_computes). One family: OLMoE; `bench/world.py` rebuilds every
# shipped family and compares them bit for bit.
REBUILD = os.environ.get("RAMOE_REBUILD") == "1"
PROFILE_TOLERANCE = 0.06  # a language's accuracy over the tasks, rebuilt on another kind of CPU against shipped


def _language_profile(accuracy: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each language's accuracy averaged over the tasks: the world's difficulty gradient."""
    return {lang: sum(by_task.values()) / len(by_task) for lang, by_task in accuracy.items()}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not REBUILD, reason="pretrains the olmoe world model again (6-11 min): RAMOE_REBUILD=1 runs it")
@pytest.mark.parametrize("family", ["olmoe"])
def test_a_shipped_model_is_what_build_model_makes(tmp_path, family):
    """Pretrains a shipped model again (6-11 min of one core) and compares.

    One thread and one seed give the same weights bit for bit on the same torch and the same kind of CPU (the
    reduced world's double build checks that on every host: test_reduced_world_build_is_seeded_and_cached).
    Another kind of CPU rounds its kernels differently, and 1,000 training steps carry a last-bit difference into
    every weight: CI's hosts vary, and on one kind all 201 tensors differed (max 0.75), the per-cell accuracies by up
    to 0.22. There the test checks what the code fixes and the rounding does not, and warns that it did: the same
    tensors and shapes, English at the floor, and each language's accuracy over the tasks within PROFILE_TOLERANCE
    of the shipped model's (0.026 at most on that host)."""
    spec = S.WORLDS["synthetic"]
    shipped = S.shipped_model(spec, family)
    assert shipped is not None, f"no shipped {family} model for world {spec.key()}; {STALE}"
    built = S.build_model(spec, family, tmp_path, log_every=0, shipped=False)
    old, new = load_file(shipped / "model.safetensors"), load_file(built / "model.safetensors")
    assert old.keys() == new.keys() and all(old[k].shape == new[k].shape for k in old)
    differ = {k: (old[k] - new[k]).abs().max().item() for k in old if not torch.equal(old[k], new[k])}
    accuracy = [json.loads((p / "report.json").read_text())["accuracy"] for p in (shipped, built)]
    if not differ:
        assert accuracy[0] == accuracy[1]
        return
    profile = [_language_profile(a) for a in accuracy]
    assert profile[0].keys() == profile[1].keys() and min(accuracy[1]["en"].values()) >= _english_floor(family), accuracy[1]
    gap = {lang: abs(profile[0][lang] - profile[1][lang]) for lang in profile[0]}
    assert max(gap.values()) <= PROFILE_TOLERANCE, (
        f"{len(differ)} of {len(old)} tensors differ from the shipped ones (max {max(differ.values()):.3g}) and the "
        f"languages' accuracy moved by up to {max(gap.values()):.3f} (allowed {PROFILE_TOLERANCE}): shipped "
        f"{profile[0]}, rebuilt {profile[1]}; the shipped models are not this code's, or another torch trains "
        f"differently; {STALE}")
    warnings.warn(f"{family}: this CPU rounds unlike the one that built the shipped model ({len(differ)} of {len(old)} "
                  f"tensors differ, max {max(differ.values()):.3g}), so the rebuild was compared by its accuracy "
                  f"profile, not bit for bit: the languages' accuracies agree within {max(gap.values()):.3f}", stacklevel=1)
