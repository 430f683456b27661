"""Stage 1 (taxonomy.py, running inference.py): Ray Data == a plain loop written here, padding invariance
(batched ``model.generate`` == each row decoded alone, every family), the content-addressed cache, input
checks before any actor, the real MGSM path with a tiny preset, and the CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import small_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from ramoe_ray import inference, sources, sweep, synthetic, taxonomy
from ramoe_ray.cli import main
from ramoe_ray.config import ConfigError, config_from_dict
from ramoe_ray.models import FAMILIES, capture
from ramoe_ray.routing_stats import sequence_importance
from ramoe_ray.tasks import build_prompt, flexible_extract, generative_prediction, score_choices, score_generative

MGSM = Path(__file__).parents[2] / "shared/data/mgsm"
N_TEST = 12  # examples in the small world's test split (20 % of 60)


def reference_loop(model_path, examples, fmt, *, k, max_new_tokens, general=()):
    """The stage written as the plainest loop: one example at a time (no padding), HF ``generate``
    for the text, the last prompt position's log-probabilities for the option texts (the world's
    ``choices: texts``; every option is one token)."""
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    items = [(lang, ex["id"], build_prompt(ex, fmt), ex) for lang, exs in examples.items() for ex in exs]
    items += [("en", f"general-{i:05d}", text, None) for i, text in enumerate(general)]
    out = {}
    for lang, ident, prompt, ex in items:
        enc = tok(prompt, return_tensors="pt", truncation=ex is None, max_length=inference.GENERAL_MAX_TOKENS)
        with torch.no_grad(), capture(model) as rec:
            logits = model(**enc).logits
        r = rec.routing(enc["attention_mask"])
        imp, freq = sequence_importance(r.probs(), r.selected, r.mask, k=k)
        row = dict(importance=imp[0], frequency=freq[0], prediction="", correct=False)
        if ex is not None and fmt == "generative_numeric":
            with torch.no_grad():
                g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new = g[0, enc["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            text = tok.decode(new, skip_special_tokens=True)
            for stop in ("\n", "Question:"):
                text = text.split(stop)[0]
            row.update(prediction=generative_prediction(text), correct=score_generative([text], [ex["answer"]])[0])
        elif ex is not None:
            logp = logits[0, -1].log_softmax(-1)
            options = [tok(prompt + " " + option)["input_ids"][-1] for option in ex["choices"]]
            assert all(len(tok(" " + o)["input_ids"]) == 1 for o in ex["choices"])
            pred, correct = score_choices([[float(logp[i]) for i in options]], [ex["answer"]])
            row.update(prediction=pred[0], correct=correct[0])
        out[(lang, ident)] = row
    return out


def assert_matches_reference(df: pd.DataFrame, ref: dict) -> None:
    assert len(df) == len(ref)
    for r in df.itertuples():
        want = ref[(r.language, r.id)]
        assert (r.prediction, bool(r.correct)) == (want["prediction"], want["correct"]), (r.language, r.id)
        np.testing.assert_allclose(np.stack(r.importance), want["importance"], atol=2e-5)
        np.testing.assert_allclose(np.stack(r.frequency), want["frequency"], atol=1e-6)


def expected_categories(ref: dict, target: str) -> dict:
    ids = {i for (lang, i) in ref if lang == target}
    return {i: ("c" if ref[("en", i)]["correct"] else "i") + ("c" if ref[(target, i)]["correct"] else "i") for i in ids}


# ------------------------------------------------------------------------------------------ units


def test_categories_english_first_letter_target_second():
    en = pd.Series({"a": True, "b": True, "c": False, "d": False})
    tg = pd.Series({"d": False, "c": True, "b": False, "a": True})  # order differs: joined by id
    assert taxonomy.categories(en, tg).to_dict() == {"a": "cc", "b": "ci", "c": "ic", "d": "ii"}


def test_multi_token_continuation_scoring_agrees_with_token_by_token(make_config):
    """full_logliks (used when a continuation is several tokens) == the last prompt position's
    log-probabilities for one token, and == the chain rule by separate forwards for two."""
    cfg = make_config(task="category")
    p = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], ["syn3"], "test")
    model, tok = inference.load_model_and_tokenizer(p.model_path, cfg.models[0])
    prompt = build_prompt(p.examples["syn3"][0], "multiple_choice")
    ids = tok(prompt)["input_ids"]
    conts = [inference.continuation_ids(tok, ids, prompt, " " + letter) for letter in "ABCD"]
    assert all(len(c) == 1 for c in conts)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        two = model(input_ids=torch.tensor([ids + conts[0]])).logits[0, -1].log_softmax(-1)
    np.testing.assert_allclose(inference.full_logliks(model, ids, conts), [float(logp[c[0]]) for c in conts], atol=1e-5)
    chain = float(logp[conts[0][0]] + two[conts[1][0]])
    np.testing.assert_allclose(inference.full_logliks(model, ids, [conts[0] + conts[1]]), [chain], atol=1e-5)


# ------------------------------------------------------------------------------- Ray == plain loop


@pytest.mark.parametrize("task,actors", [
    pytest.param("arith", 2, marks=pytest.mark.slow, id="arith-ray-2-actors"),
    pytest.param("category", 0, id="category-in-process"),  # the same predictor; keeps the default run fast
])
def test_taxonomy_equals_a_plain_loop(task, actors, make_config, request):
    if actors:
        request.getfixturevalue("ray_local")
    cfg = make_config(task=task)
    p = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], ["syn3"], "test", general=(task == "arith"), max_new_tokens=3)
    cells, general = taxonomy.execute(p, num_actors=actors, batch_size=4)
    path, hit = cells["syn3"]
    assert not hit
    df = pd.read_parquet(path)
    assert len(df) == 2 * N_TEST and set(df.language) == {"en", "syn3"}

    ref = reference_loop(p.model_path, {l: p.examples[l] for l in ("en", "syn3")}, cfg.tasks[0].format,
                         k=p.shape.experts_per_token, max_new_tokens=3, general=p.general or ())
    assert_matches_reference(df.drop(columns="category"), {k: v for k, v in ref.items() if "general" not in k[1]})
    assert df.groupby("id").category.first().to_dict() == expected_categories(ref, "syn3")
    if general is not None:
        g = pd.read_parquet(general[0])
        assert len(g) == len(p.general) and (g.kind == "general").all()
        assert_matches_reference(g, {k: v for k, v in ref.items() if "general" in k[1]})
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["counts"] == {c: list(expected_categories(ref, "syn3").values()).count(c) for c in taxonomy.CATEGORIES}


# ------------------------------------------------------------------------------ padding invariance


@pytest.mark.parametrize("task", ["arith", "category"])
def test_batch_size_one_and_eight_give_the_same_results(task, tmp_path, small_world):
    frames = []
    for bs in (1, 8):
        cache = tmp_path / f"bs{bs}"
        cache.mkdir()
        (cache / "world").symlink_to(small_world.resolve(), target_is_directory=True)
        cfg = small_config(cache, task=task)
        path, hit = taxonomy.run_taxonomy(cfg, cfg.models[0], cfg.tasks[0], "syn3", "test", num_actors=0, batch_size=bs,
                                   max_new_tokens=3)
        frames.append(pd.read_parquet(path))
    a, b = frames
    assert a[["id", "language", "prediction", "correct", "category", "n_tokens"]].equals(
        b[["id", "language", "prediction", "correct", "category", "n_tokens"]])
    if task == "arith":
        assert a.output.tolist() == b.output.tolist()  # the generated texts, token for token
    np.testing.assert_allclose(taxonomy.routing_array(a), taxonomy.routing_array(b), atol=2e-6)
    np.testing.assert_array_equal(taxonomy.routing_array(a, "frequency"), taxonomy.routing_array(b, "frequency"))


# ------------------------------------------------------------------- a model's tasks in one pass


def _two_task_plans(cache, world):
    cache.mkdir()
    (cache / "world").symlink_to(world.resolve(), target_is_directory=True)
    cfg = small_config(cache, tasks=[dict(name=t, format=synthetic.TASKS[t], source=f"synthetic-small:{t}")
                                     for t in ("arith", "category")])
    return [taxonomy.plan(cfg, cfg.models[0], t, ["syn3"], "test", general=True, max_new_tokens=3) for t in cfg.tasks]


def test_a_models_tasks_in_one_pass_load_it_once_and_equal_each_task_alone(tmp_path, small_world, monkeypatch):
    """execute_many (the sweep's stage 1 per model): one model load for both tasks (a generative and a
    multiple-choice one, mixed in the batches), the same artefacts' contents as each task's own pass, the
    general text both tasks share predicted once, and a second call all cache hits with no model load."""
    alone = [taxonomy.execute(p, num_actors=0, batch_size=4) for p in _two_task_plans(tmp_path / "alone", small_world)]
    loads, real = [], inference.load_model_and_tokenizer
    monkeypatch.setattr(inference, "load_model_and_tokenizer", lambda *a, **k: loads.append(1) or real(*a, **k))
    forwards = count_prompt_forwards(monkeypatch)
    plans = _two_task_plans(tmp_path / "together", small_world)
    together = taxonomy.execute_many(plans, num_actors=0, batch_size=4)
    assert len(loads) == 1
    assert plans[0].general_key == plans[1].general_key
    # category's rows and the general text, once (not per task); arith's prompts run inside generate
    assert sum(forwards) == 2 * N_TEST + len(plans[0].general)
    cols = ["id", "language", "prediction", "correct", "category", "n_tokens"]
    for (cells_a, gen_a), (cells_t, gen_t) in zip(alone, together):
        a, t = pd.read_parquet(cells_a["syn3"][0]), pd.read_parquet(cells_t["syn3"][0])
        assert not cells_t["syn3"][1] and a[cols].equals(t[cols])
        if (a.output.str[0] != "[").all():  # generated texts, token for token (log-likelihoods: last digits vary)
            assert a.output.tolist() == t.output.tolist()
        np.testing.assert_allclose(taxonomy.routing_array(a), taxonomy.routing_array(t), atol=2e-6)
        ga, gt = pd.read_parquet(gen_a[0]), pd.read_parquet(gen_t[0])
        assert ga.id.tolist() == gt.id.tolist()
        np.testing.assert_allclose(taxonomy.routing_array(ga), taxonomy.routing_array(gt), atol=2e-6)
    again = taxonomy.execute_many(plans, num_actors=0, batch_size=4)
    assert len(loads) == 1
    assert all(all(hit for _, hit in cells.values()) and general_hit for cells, (_, general_hit) in again)


def test_the_sweeps_stages_run_one_predictor_pass_per_model(tmp_path, small_world, monkeypatch):
    """sweep.run_stages: stage 1 of a model's two tasks in one predictor pass (one model load) at the config's
    training.eval_batch_size, then stage 2 of each (model, task): every cell's facts, in the config's order."""
    plans = _two_task_plans(tmp_path / "c", small_world)
    cfg = plans[0].cfg.model_copy(update={"resources": plans[0].cfg.resources.model_copy(update={"inference_actors": 0})})
    plans = [taxonomy.plan(cfg, cfg.models[0], t, ["syn3"], "train", general=True) for t in cfg.tasks]
    passes, real = [], taxonomy._predict_missing
    monkeypatch.setattr(taxonomy, "_predict_missing",
                        lambda work, **kw: passes.append((len(work), kw["batch_size"])) or real(work, **kw))
    loads, real_load = [], inference.load_model_and_tokenizer
    monkeypatch.setattr(inference, "load_model_and_tokenizer", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    res = sweep.run_stages(cfg, plans, log=lambda *_: None)
    assert passes == [(2, cfg.training.eval_batch_size)] and len(loads) == 1  # the config's no-grad batch size
    assert [(c["task"], c["language"]) for c in res["cells"]] == [("arith", "syn3"), ("category", "syn3")]
    assert res["stage1_computed"] == 2 and res["stage2_computed"] == 2 * len(cfg.knobs.bands) * len(cfg.knobs.top_k)


# ------------------------------------------------------------------------------------------- cache


def _boom(*args, **kwargs):
    raise AssertionError("a model ran although the artefact was cached")


def count_prompt_forwards(monkeypatch) -> list[int]:
    """A spy on ``inference.routing_forward`` (in this process): the batch size of every prompt forward."""
    seen = []
    real = inference.routing_forward

    def spy(model, ids, mask, **kw):
        seen.append(ids.shape[0])
        return real(model, ids, mask, **kw)

    monkeypatch.setattr(inference, "routing_forward", spy)
    return seen


def test_second_run_loads_the_artefact_and_runs_no_model(make_config, monkeypatch):
    cfg = make_config(task="category", languages=("syn3", "syn5"))
    m, t = cfg.models[0], cfg.tasks[0]
    forwards = count_prompt_forwards(monkeypatch)
    path, hit = taxonomy.run_taxonomy(cfg, m, t, "syn3", "test", num_actors=0)
    assert not hit and sum(forwards) == 2 * N_TEST
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["computed"] == {"en": True, "syn3": True} and meta["n"] == N_TEST
    en_meta = json.loads((Path(cfg.cache_dir) / "taxonomy" / meta["inputs"]["en"] / "meta.json").read_text())
    assert en_meta["forwards"] == N_TEST and en_meta["inputs"]["split"] == "test"
    written = path.stat().st_mtime_ns

    with monkeypatch.context() as mp:  # the hit path must not build a dataset, load a model or run one
        mp.setattr(inference, "map_rows", _boom)
        mp.setattr(inference, "load_model_and_tokenizer", _boom)
        mp.setattr(inference, "predict_batch", _boom)
        again, hit = taxonomy.run_taxonomy(cfg, m, t, "syn3", "test", num_actors=2)
    assert hit and again == path and path.stat().st_mtime_ns == written and sum(forwards) == 2 * N_TEST

    # another language: English is reused, only the new language runs
    other, hit = taxonomy.run_taxonomy(cfg, m, t, "syn5", "test", num_actors=0)
    assert not hit and other != path and sum(forwards) == 3 * N_TEST
    assert json.loads((other.parent / "meta.json").read_text())["computed"] == {"en": False, "syn5": True}

    # another split: both languages run again
    val, hit = taxonomy.run_taxonomy(cfg, m, t, "syn3", "validation", num_actors=0)
    assert not hit and val != path and sum(forwards) == 5 * N_TEST


def test_scoring_is_in_the_key_on_every_task_row_and_reaches_predict_batch(make_config, monkeypatch):
    """TaskConfig.scoring: part of the taxonomy key (a numeric-scored cache is never read as exact),
    carried by every task row, and passed by ``inference.predict_rows`` to ``predict_batch``."""
    numeric_task = dict(name="arith", format="generative_numeric", source="synthetic-small:arith", scoring="numeric")
    plans = {}
    for scoring, cfg in (("exact", make_config(task="arith")), ("numeric", make_config(tasks=[numeric_task]))):
        plans[scoring] = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], ["syn3"], "test", general=True)
        assert plans[scoring].inputs["en"]["task"]["scoring"] == scoring
    assert plans["exact"].keys["en"] != plans["numeric"].keys["en"]
    category = make_config(task="category")
    assert taxonomy.plan(category, category.models[0], category.tasks[0], ["syn3"], "test").inputs["en"]["task"]["scoring"] is None

    rows = taxonomy.rows_frame(plans["numeric"], ["en"], True)
    assert set(rows[rows.kind == "task"].scoring) == {"numeric"}
    seen = []

    def fake_batch(model, tok, batch, **kw):
        seen.append((kw["fmt"], kw["scoring"], len(batch)))
        return [{} for _ in batch]

    monkeypatch.setattr(inference, "predict_batch", fake_batch)
    records = rows.to_dict("records") + [dict(id="x", language="en", kind="task", fmt="generative_numeric", prompt="p",
                                              answer="1")]  # no scoring field: the default
    inference.predict_rows(None, None, records, k=2)
    n_task, n_general = int((rows.kind == "task").sum()), int((rows.kind == "general").sum())
    assert n_task > 0 and n_general > 0
    assert sorted(seen, key=str) == sorted([("generative_numeric", "numeric", n_task), (None, "exact", n_general),
                                            ("generative_numeric", "exact", 1)], key=str)


def test_changed_model_file_misses_the_cache(make_config, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg0 = make_config(task="category")
    folder = tmp_path / "model"
    shutil.copytree(taxonomy.plan(cfg0, cfg0.models[0], cfg0.tasks[0], ["syn3"], "test").model_path, folder)
    cfg = make_config(task="category", models=[dict(name="m", family="olmoe", path=str(folder))])
    m, t = cfg.models[0], cfg.tasks[0]
    first, hit = taxonomy.run_taxonomy(cfg, m, t, "syn3", "test", num_actors=0)
    assert not hit
    assert taxonomy.run_taxonomy(cfg, m, t, "syn3", "test", num_actors=0) == (first, True)

    weights = load_file(folder / "model.safetensors")
    name = next(n for n in weights if n.endswith("mlp.gate.weight"))
    weights[name][0] += 1.0  # expert 0's router row (a shift of every row would cancel in the softmax)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    second, hit = taxonomy.run_taxonomy(cfg, m, t, "syn3", "test", num_actors=0)
    assert not hit and second != first
    a, b = pd.read_parquet(first), pd.read_parquet(second)
    assert not np.allclose(taxonomy.routing_array(a), taxonomy.routing_array(b))  # the new weights really ran


# ------------------------------------------------------------------------------------ bad inputs


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bad_inputs_are_refused_before_any_actor_starts(make_config, tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ramoe_ray.models import build_tiny

    monkeypatch.setattr(inference, "map_rows", _boom)  # reaching the actors would fail the test differently
    monkeypatch.setattr(inference, "load_model_and_tokenizer", _boom)

    dense = tmp_path / "dense"  # models are refused when the config is resolved (sources.resolve)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2)).save_pretrained(dense)
    with pytest.raises(ConfigError, match="not a supported MoE family"):
        make_config(models=[dict(name="d", family="olmoe", path=str(dense))])

    no_tok = tmp_path / "no-tokenizer"
    build_tiny("olmoe").save_pretrained(no_tok)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        make_config(models=[dict(name="n", family="olmoe", path=str(no_tok))])

    rows = [dict(id=f"q{i}", question=f"What is {i} plus 1?", answer=str(i + 1)) for i in range(2)]
    _jsonl(tmp_path / "task" / "en.jsonl", rows)
    _jsonl(tmp_path / "task" / "de.jsonl", rows)
    task = [dict(name="tiny", format="generative_numeric", source=str(tmp_path / "task"))]
    with pytest.raises(ConfigError, match="tasks.0.source = .*no file for language 'fr'"):
        make_config(tasks=task, languages=["fr"])  # sources.check reads a local task's data
    cfg = make_config(tasks=task, languages=["de"])
    with pytest.raises(ConfigError, match="split 'validation' is empty"):
        taxonomy.run_taxonomy(cfg, cfg.models[0], cfg.tasks[0], "de", "validation", num_actors=2)

    # the same through the CLI: exit code 2 and one "error:" line
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.model_dump(mode="json")))))
    assert main(["taxonomy", str(bad), "--split", "validation"]) == 2
    assert "error: task 'tiny': split 'validation' is empty" in capsys.readouterr().err
    assert main(["taxonomy", str(bad), f"models.0.path={dense}"]) == 2
    assert "not a supported MoE family" in capsys.readouterr().err


# ----------------------------------------------------------------------- real MGSM, tiny preset


def mgsm_preset_config(family: str, cache_dir):
    """The real MGSM (English, German) on the tiny preset of ``family``, resolved."""
    return sources.resolve(config_from_dict(dict(
        models=[dict(name="tiny", family=family, path=f"preset:{family}")],
        tasks=[dict(name="mgsm", format="generative_numeric", source=str(MGSM))],
        languages=["de"], cache_dir=str(cache_dir))))


def test_real_mgsm_on_a_tiny_preset_with_a_trained_tokenizer(tmp_path):
    cfg = mgsm_preset_config("olmoe", tmp_path / "cache")
    m, t = cfg.models[0], cfg.tasks[0]
    path, hit = taxonomy.run_taxonomy(cfg, m, t, "de", "test", num_actors=0, max_new_tokens=2)
    df = pd.read_parquet(path)
    assert not hit and len(df) == 2 * 50 and df.groupby("language").size().to_dict() == {"de": 50, "en": 50}
    assert set(df.category) <= set(taxonomy.CATEGORIES)
    assert all(p == "" or flexible_extract(p) == p for p in df.prediction)

    p = taxonomy.plan(cfg, m, t, ["de"], "test")
    folder = Path(p.model_path)
    assert folder.parent.name == "presets" and (folder / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) <= sources.PRESET_VOCAB and json.loads((folder / "config.json").read_text())["vocab_size"] == sources.PRESET_VOCAB
    question = p.examples["de"][0]["question"]
    ids = tok(question)["input_ids"]
    assert tok.decode(ids) == question and len(ids) < len(question.encode()) / 2  # a trained BPE, not bytes
    assert (df.n_tokens > 5).all()
    imp, freq = taxonomy.routing_array(df), taxonomy.routing_array(df, "frequency")
    assert imp.shape == (100, 4, 8)
    np.testing.assert_allclose(imp.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(freq.sum(-1), 2.0, rtol=1e-5)
    assert taxonomy.plan(cfg, m, t, ["de"], "test").model_path == p.model_path  # tokenizer and preset are cached


def greedy_alone(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The plainest greedy decoding of ONE prompt: no batch, no padding, no KV cache, no ``generate``
    (a full forward per new token); stops at eos or once the text holds a stop string."""
    ids = tok(prompt)["input_ids"]
    eos = set(inference.eos_ids(model, tok))
    new: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            t = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if t in eos:
            break
        new.append(t)
        text = tok.decode(new, skip_special_tokens=True)
        if any(stop in text for stop in inference.STOP_STRINGS):
            break
    return inference.cut_at_stop(tok.decode(new, skip_special_tokens=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_generation_equals_each_row_decoded_alone_for_every_family(family, tmp_path, monkeypatch):
    """``model.generate`` on the left-padded batch (``inference.generate_texts``): each row's text equals
    that row decoded alone by a plain greedy loop, and its routing (recorded from generation's prefill,
    ``inference.generate_with_routing``, with no prompt forward of its own) HF's forward of the row alone,
    for every family, with prompts longer than GPT-OSS's sliding window (64 in the preset) batched with
    short ones."""
    cfg = mgsm_preset_config(family, tmp_path)
    p = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], ["de"], "test")
    rows = taxonomy.rows_frame(p, ["en", "de"], False)
    rows = rows.iloc[[0, 1, 2, 3, len(rows) - 4, len(rows) - 3, len(rows) - 2, len(rows) - 1]]  # shortest, longest
    model, tok = inference.load_model_and_tokenizer(p.model_path, cfg.models[0])
    forwards = count_prompt_forwards(monkeypatch)
    out = pd.DataFrame(inference.predict_rows(model, tok, rows.to_dict("records"), k=p.shape.experts_per_token,
                                              max_new_tokens=inference.MAX_NEW_TOKENS))
    assert out.n_tokens.max() > 100 > out.n_tokens.min()
    texts = [greedy_alone(model, tok, prompt, inference.MAX_NEW_TOKENS) for prompt in rows.prompt]
    assert any(texts) and out.output.tolist() == texts  # the texts themselves, not only the numbers in them
    by_lang = {l: [ex for ex in p.examples[l] if ex["id"] in set(rows[rows.language == l].id)] for l in ("en", "de")}
    ref = reference_loop(p.model_path, by_lang, "generative_numeric", k=p.shape.experts_per_token, max_new_tokens=1)
    assert forwards == []  # the routing is generation's prefill's
    for r in out.itertuples():
        np.testing.assert_allclose(np.stack(r.importance), ref[(r.language, r.id)]["importance"], atol=2e-5)
        np.testing.assert_allclose(np.stack(r.frequency), ref[(r.language, r.id)]["frequency"], atol=1e-6)


def test_generation_stops_at_a_stop_string_and_at_eos(tmp_path):
    """A row's text ends at eos, and is cut at the first stop string: forcing either as the first new
    token of every row leaves every text empty."""
    cfg = mgsm_preset_config("olmoe", tmp_path)
    p = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], ["de"], "test")
    model, tok = inference.load_model_and_tokenizer(p.model_path, cfg.models[0])
    prompts = [build_prompt(ex, "generative_numeric") for ex in p.examples["en"][:6]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    free = inference.generate_texts(model, tok, enc["input_ids"], enc["attention_mask"], 12)
    assert all(free)
    # make the first new token of every row a stop string / eos: the rows end there, with empty texts
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for forced in (newline[-1], tok.eos_token_id):
        bias = torch.zeros(model.config.vocab_size)
        bias[forced] = 1e4
        handle = model.lm_head.register_forward_hook(lambda m, a, o, bias=bias: o + bias)
        try:
            texts = inference.generate_texts(model, tok, enc["input_ids"], enc["attention_mask"], 12)
        finally:
            handle.remove()
        assert texts == [""] * len(prompts), forced


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_taxonomy_and_experts_print_their_tables(cache_dir, tmp_path, capsys):
    cfg = dict(name="t", models=[dict(name="m", family="olmoe", path="synthetic-small:olmoe")],
               tasks=[dict(name="cat", format="multiple_choice", source="synthetic-small:category")],
               languages=["syn3", "syn5"], knobs=dict(bands=[[0.375, 0.625], "auto"], top_k=[2]),
               cache_dir=str(cache_dir))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["taxonomy", str(path), "--split", "test", "resources.inference_actors=0"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("m/cat/")]
    assert len(lines) == 2 and all(" computed " in l and f" {N_TEST} " in l for l in lines)
    assert "0.375-0.625:[1]" in out
    assert main(["taxonomy", str(path), "--split", "test", "resources.inference_actors=0"]) == 0
    assert len([l for l in capsys.readouterr().out.splitlines() if l.startswith("m/cat/") and " hit " in l]) == 2

    assert main(["experts", str(path), "--split", "test", "resources.inference_actors=0"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith("m/cat/")]
    assert len(rows) == 4  # 2 languages x 2 bands x 1 top_k
    assert {r[1] for r in rows} == {"0.375-0.625", "auto"} and all(r[6] == "computed" for r in rows)
    artefact = Path(cache_dir) / "experts" / rows[0][-1] / "experts.json"
    assert json.loads(artefact.read_text())["cell"]["language"] == "syn3"
