"""Stage 4 (evaluate.py): one evaluator for base, adapter and steering; accuracy per language, divergence
per layer; steering raises the band's task experts' share and leaves the layers below the band alone; a
saved adapter is evaluated as the model it was saved from."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_config

from ramoe_ray import evaluate, expert_delta, inference, lora, taxonomy, train
from ramoe_ray.config import ConfigError

LANG = "syn3"
TASK = "category"


def cfg_for(cache, tmp_path, **training):
    return small_config(cache, task=TASK, languages=(LANG,), resources=dict(inference_actors=0),
                        training=dict(lr=1e-2, batch_size=12, lora_rank=4, lora_alpha=8, **training),
                        steering=dict(strengths=[3.0]), output_dir=str(tmp_path / "runs"))


def evaluate_cell(cfg, **kw):
    return evaluate.evaluate_cell(cfg, cfg.models[0], cfg.tasks[0], [LANG], **kw)


def test_steering_raises_band_task_experts_share_only_there(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache, tmp_path)
    spec = train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="steering", top_k=1, num_workers=0)["steering"]
    band = sorted(int(l) for l in spec["experts"])
    assert band == [1]  # default band 0.375-0.625 of the 4-layer world model
    base = evaluate_cell(cfg)
    steered = evaluate_cell(cfg, steering=spec)
    layers = base["moe_layers"]
    for lang in ("en", LANG):
        b, s = np.array(base["importance_mean"][lang]), np.array(steered["importance_mean"][lang])
        for l in band:
            j = layers.index(l)
            ex = spec["experts"][str(l)]
            assert s[j, ex].sum() > b[j, ex].sum() + 0.05, (lang, l, b[j], s[j])
        for l in layers:
            if l < min(band):  # below the band nothing changes (above it, the steered states flow on)
                j = layers.index(l)
                assert np.array_equal(s[j], b[j]), (lang, l)
    assert set(steered["accuracy"]) == {"en", LANG} and steered["n"] == base["n"]
    assert json.loads(open(steered["path"]).read())["steering"]["strength"] == 3.0
    # strength 0: the steered model is the base model
    zero = evaluate_cell(cfg, steering={**spec, "strength": 0.0})
    assert zero["accuracy"] == base["accuracy"]
    for lang in ("en", LANG):
        assert np.allclose(zero["importance_mean"][lang], base["importance_mean"][lang], atol=1e-6)
    with pytest.raises(ConfigError, match="not MoE layers"):
        evaluate_cell(cfg, steering={"experts": {"9": [0]}, "strength": 1.0})


def test_every_steering_setting_of_a_cell_in_one_model_load_equals_each_alone(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache, tmp_path)
    spec = train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="steering", top_k=1, num_workers=0)["steering"]
    settings = [{**spec, "strength": s} for s in (0.0, 3.0, 8.0)]
    before = evaluate.EvalPredictor.loads
    together = evaluate.evaluate_steering(cfg, cfg.models[0], cfg.tasks[0], [LANG], settings,
                                          [tmp_path / f"s{i}" for i in range(3)], split="validation", batch_size=5)
    assert evaluate.EvalPredictor.loads - before == 1  # one model for the three settings
    alone = [evaluate_cell(cfg, steering=x, split="validation", out_dir=tmp_path / f"a{i}")
             for i, x in enumerate(settings)]
    assert evaluate.EvalPredictor.loads - before == 4
    for t, a in zip(together, alone):
        assert t["accuracy"] == a["accuracy"] and t["n"] == a["n"] and t["steering"] == a["steering"]
        for lang in ("en", LANG):
            assert np.allclose(t["importance_mean"][lang], a["importance_mean"][lang], atol=1e-6)
        rows_t, rows_a = (pd.read_parquet(Path(d).parent / "rows.parquet") for d in (t["path"], a["path"]))
        assert list(rows_t.prediction) == list(rows_a.prediction)
    assert together[0]["accuracy"] != together[2]["accuracy"] or \
        not np.allclose(together[0]["importance_mean"][LANG], together[2]["importance_mean"][LANG])


def test_a_saved_adapter_is_evaluated_as_the_model_it_was_saved_from(shared_cache, tmp_path):
    """An adapter written by ``lora.save_adapter`` (random LoRA factors, no training), loaded by the
    evaluator's predictor: its predictions and routing equal the in-memory model's."""
    cfg = cfg_for(shared_cache, tmp_path)
    plan = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], [LANG], "test")
    model, tok = inference.load_model_and_tokenizer(plan.model_path, cfg.models[0])
    lora.apply_expert_lora(model, rank=4, alpha=8, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.normal_(0.0, 0.5)
    adapter = lora.save_adapter(model, tmp_path / "adapter", plan.model_path)
    rows = taxonomy.rows_frame(plan, ["en", LANG], False)
    want = pd.DataFrame(inference.predict_rows(model.eval(), tok, rows.to_dict("records"), k=plan.shape.experts_per_token,
                                               max_new_tokens=plan.max_new_tokens))
    res = evaluate_cell(cfg, adapter=adapter)
    got = pd.read_parquet(res["path"].replace(evaluate.EVAL, "rows.parquet")).sort_values(["language", "id"])
    want = want.sort_values(["language", "id"])
    assert got[["language", "id", "prediction", "correct"]].values.tolist() == \
        want[["language", "id", "prediction", "correct"]].values.tolist()
    np.testing.assert_allclose(taxonomy.routing_array(got), taxonomy.routing_array(want), atol=1e-6)
    base = evaluate_cell(cfg)
    assert not np.allclose(res["importance_mean"][LANG], base["importance_mean"][LANG], atol=1e-4)  # the adapter acts


@pytest.mark.slow  # trains with DeepSpeed (in process)
@pytest.mark.parametrize("method", ["ramoe", "rise"])  # expert LoRA; RISE's full-weight experts (rise.train: full)
def test_the_trained_model_in_its_process_evaluates_as_its_saved_adapter(shared_cache, tmp_path, method):
    """A sweep trial validates the model it trained, before the training releases it (train_cell's on_trained):
    no model is loaded, and the numbers are those of the saved adapter loaded into a fresh model: the same
    predictions and correctness per row, routing within 2e-6."""
    cfg = cfg_for(shared_cache, tmp_path, max_steps=2)
    seen = {}

    def on_trained(model, tok, adapter):
        loads = evaluate.EvalPredictor.loads
        seen["ev"] = evaluate_cell(cfg, adapter=adapter, split="validation", out_dir=tmp_path / "in", loaded=(model, tok))
        seen["loads"] = evaluate.EvalPredictor.loads - loads

    res = train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method=method, lam=10.0 if method == "ramoe" else None,
                           top_k=1, num_workers=0, run_dir=tmp_path / method, on_trained=on_trained)
    assert seen["loads"] == 0 and seen["ev"]["adapter"] == res["adapter"]
    assert (Path(res["adapter"]) / expert_delta.EXPERTS_META).is_file() == (method == "rise")  # RISE: full weights
    again = evaluate_cell(cfg, adapter=res["adapter"], split="validation", out_dir=tmp_path / "re")
    assert again["accuracy"] == seen["ev"]["accuracy"] and again["n"] == seen["ev"]["n"]
    np.testing.assert_allclose(again["divergence"][LANG], seen["ev"]["divergence"][LANG], atol=1e-6)
    got, want = (pd.read_parquet(tmp_path / d / "rows.parquet").sort_values(["language", "id"]) for d in ("in", "re"))
    cols = ["language", "id", "prediction", "output", "correct"]
    assert got[cols].values.tolist() == want[cols].values.tolist()
    np.testing.assert_allclose(taxonomy.routing_array(got), taxonomy.routing_array(want), atol=2e-6)
    base = evaluate_cell(cfg, split="validation")  # it trained: some row's choice log-likelihoods moved
    base_rows = pd.read_parquet(Path(base["path"]).parent / "rows.parquet").sort_values(["language", "id"])
    assert (got["output"].to_numpy() != base_rows["output"].to_numpy()).any()
    with pytest.raises(ValueError, match="a loaded model is evaluated as its adapter"):
        evaluate_cell(cfg, split="validation", loaded=(None, None))
    # a training reused from its folder is not called back: its trial validates the saved adapter
    seen.clear()
    train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method=method, lam=10.0 if method == "ramoe" else None,
                     top_k=1, num_workers=0, run_dir=tmp_path / method, on_trained=on_trained)
    assert seen == {}


@pytest.mark.slow  # trains with DeepSpeed (in process)
def test_adapter_evaluation_with_divergence_and_mlflow(shared_cache, tmp_path):
    import mlflow

    cfg = cfg_for(shared_cache, tmp_path, max_steps=2)
    res = train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="sft", top_k=1, num_workers=0,
                        run_dir=tmp_path / "sft")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("eval-test")
    with mlflow.start_run() as run:
        trained = evaluate_cell(cfg, adapter=res["adapter"])
    base = evaluate_cell(cfg)
    n_layers = len(base["moe_layers"])
    for r in (base, trained):
        assert set(r["accuracy"]) == {"en", LANG} and all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        curve = r["divergence"][LANG]
        assert len(curve) == n_layers and all(0.0 <= d <= 1.0 for d in curve)
    assert r["n"]["en"] == r["n"][LANG] > 0
    # the adapter acts: routing after training differs from the base model's
    assert not np.allclose(trained["importance_mean"][LANG], base["importance_mean"][LANG], atol=1e-7)
    assert trained["mlflow"] and not base["mlflow"]
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics[f"acc_{LANG}"] == pytest.approx(trained["accuracy"][LANG])
    assert metrics[f"div_{LANG}_L0"] == pytest.approx(trained["divergence"][LANG][0])
    with pytest.raises(ConfigError, match="not a folder"):
        evaluate_cell(cfg, adapter=tmp_path / "missing")


@pytest.mark.slow  # trains with DeepSpeed (in process)
def test_cli_train_and_evaluate(shared_cache, tmp_path, capsys):
    import yaml

    from ramoe_ray.cli import main

    cfg = cfg_for(shared_cache, tmp_path, max_steps=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path), "--method", "ramoe", "--lam", "1", "--band", "0.95-1.0"]) == 2
    assert "holds no MoE layer" in capsys.readouterr().err
    run_dir = tmp_path / "cli-train"
    assert main(["train", str(path), "--method", "sft", "--top-k", "1", "--workers", "0", "--run-dir", str(run_dir),
                 "training.max_steps=1"]) == 0
    text = capsys.readouterr().out  # DeepSpeed may log to stdout before the JSON
    out = json.loads(text[text.index("\n{\n") + 1 if not text.startswith("{") else 0:])
    assert out["method"] == "sft" and out["steps"] == 1 and out["adapter"] == str(run_dir / "adapter")
    assert main(["evaluate", str(path), "--method", "steering", "--top-k", "1", "--out-dir", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "steering" in text and LANG in text and (tmp_path / "ev" / evaluate.EVAL).is_file()


@pytest.mark.parametrize("task", ["category", "arith"])  # choice scoring; generation
def test_answers_without_the_routing_are_the_same_answers(shared_cache, tmp_path, task):
    """``routing=False`` (ASHA's rungs): the same predictions, outputs and correctness as the full predictor,
    with no routing recorded."""
    cfg = small_config(shared_cache, task=task, languages=(LANG,), resources=dict(inference_actors=0),
                       output_dir=str(tmp_path / "runs"))
    plan = taxonomy.plan(cfg, cfg.models[0], cfg.tasks[0], [LANG], "validation")
    model, tok = inference.load_model_and_tokenizer(plan.model_path, cfg.models[0])
    rows = taxonomy.rows_frame(plan, ["en", LANG], False).to_dict("records")
    k, n = plan.shape.experts_per_token, plan.max_new_tokens
    full = inference.predict_rows(model.eval(), tok, rows, k=k, max_new_tokens=n)
    bare = inference.predict_rows(model, tok, rows, k=k, max_new_tokens=n, routing=False)
    assert [(r["prediction"], r["output"], r["correct"]) for r in bare] == \
        [(r["prediction"], r["output"], r["correct"]) for r in full]
    assert len({r["output"] for r in full}) > 1  # the comparison can fail: the rows' outputs differ
    assert all(r["importance"] is None and r["frequency"] is None for r in bare)
    assert all(r["importance"] is not None for r in full)
