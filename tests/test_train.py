"""Stage 3 (train.py): RA-MoE aligns ci routing better than SFT; RISE touches only its experts; ZeRO-3 on
two Ray Train workers survives a worker failure and matches an uninterrupted run; bad inputs are refused."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config
from ramoe_ray import lora as LA
from ramoe_ray import models as M
from ramoe_ray import train as TR
from ramoe_ray.config import Band, ConfigError

LANG = "syn3"
TASK = "category"  # multiple choice: no generation, so stages 1-2 take seconds; the small world has ci pairs
# A band over layers 1-3 of the 4-layer world model and one task expert per layer: the LoRA of the layers
# below each band layer can move its routing.
BAND = Band(start=0.25, end=1.0)
TOP_K = 1
TRAIN = dict(lr=5e-3, batch_size=12, epochs=2, lora_rank=4, lora_alpha=8, checkpoint_every=100, log_every=1)


def cfg_for(cache, **training):
    return small_config(cache, task=TASK, languages=(LANG,), resources=dict(inference_actors=0, cpus_per_worker=0.5),
                        training={**TRAIN, **training})


def train(cfg, method, run_dir, **kw):
    kw.setdefault("band", BAND)
    kw.setdefault("top_k", TOP_K)
    kw.setdefault("num_workers", 0)  # Ray Train local mode: same loop, one process
    return TR.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method=method, run_dir=run_dir, **kw)


def test_ramoe_aligns_ci_routing_better_than_sft(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    sft = train(cfg, "sft", tmp_path / "sft")
    ramoe = train(cfg, "ramoe", tmp_path / "ramoe", lam=100.0)
    assert sft["n_ci"] == ramoe["n_ci"] > 0 and sft["lam_used"] == 0.0 and ramoe["lam_used"] == 100.0
    assert sft["steps"] == ramoe["steps"] == 6
    # same seed, same schedule: the first step (LoRA B = 0, so the same model) has the same LM loss
    assert sft["history"][0]["ce"] == pytest.approx(ramoe["history"][0]["ce"], abs=1e-6)
    assert math.isnan(sft["history"][0]["align"] or math.nan)  # λ = 0: no alignment computed
    base = sft["final"]["routing_kl_ci_base"]
    assert base == pytest.approx(ramoe["final"]["routing_kl_ci_base"], rel=1e-6)
    kl_sft, kl_ramoe = sft["final"]["routing_kl_ci"], ramoe["final"]["routing_kl_ci"]
    # RA-MoE pulls the ci examples' band routing towards English; SFT does not (here it drifts away)
    assert kl_ramoe < 0.5 * kl_sft, (kl_ramoe, kl_sft, base)
    assert kl_ramoe < base
    # and both still learn the task
    for r in (sft, ramoe):
        assert r["final"]["ce_train"] < r["final"]["ce_train_base"] - 0.01


def test_rise_trains_only_selected_experts(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache, epochs=1)
    res = train(cfg, "rise", tmp_path / "rise")
    selection = {int(l): v for l, v in res["experts_mask"].items()}
    assert 0 < sum(map(len, selection.values())) <= cfg.rise.budget
    adapter = res["adapter"]
    meta = json.loads((tmp_path / "rise" / "adapter" / LA.RAMOE_LORA).read_text())
    assert {int(k): v for k, v in meta["experts_mask"].items() if v} == {l: v for l, v in selection.items() if v}

    from transformers import AutoModelForCausalLM

    path = res["identity"]["model_path"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = LA.apply_expert_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), rank=meta["rank"],
                                 alpha=meta["alpha"], seed=0)
    LA.load_lora_state_dict(model, load_file(f"{adapter}/{LA.ADAPTER_WEIGHTS}"))
    base_ex = M.experts_modules(base)
    changed = 0
    for layer, ex in M.experts_modules(model).items():
        st = ex._ramoe_lora
        chosen = torch.zeros(ex.lora_mask.shape[0], dtype=torch.bool)
        chosen[selection.get(layer, [])] = True
        for name in st.targets:
            w = ex._parameters[name]
            eff = torch.baddbmm(w, ex._parameters[f"lora_B_{name}"], ex._parameters[f"lora_A_{name}"], alpha=st.scale)
            ref = base_ex[layer]._parameters[name]
            assert torch.equal(eff[~chosen], ref[~chosen]), (layer, name)  # bit-identical
            changed += int((eff[chosen] != ref[chosen]).flatten(1).any(-1).sum())
    assert changed > 0  # the selected experts did train


def test_bad_inputs_are_refused(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    with pytest.raises(ConfigError, match="holds no MoE layer"):
        train(cfg, "ramoe", tmp_path / "a", band=Band(start=0.95, end=1.0), lam=1.0)
    with pytest.raises(ConfigError, match="top_k = 5"):
        train(cfg, "ramoe", tmp_path / "b", top_k=5, lam=1.0)
    with pytest.raises(ConfigError, match="method"):
        train(cfg, "dpo", tmp_path / "c")
    with pytest.raises(ConfigError, match="lambda"):
        train(cfg, "ramoe", tmp_path / "d", lam=-1.0)
    # a checkpoint of another model: refused before anything runs
    ck = tmp_path / "foreign"
    ck.mkdir()
    (ck / TR.META).write_text(json.dumps({"identity": {"model": "other", "num_experts": 64}, "step": 3}))
    with pytest.raises(ConfigError, match="another model"):
        train(cfg, "ramoe", tmp_path / "e", lam=1.0, resume_from=ck)
    with pytest.raises(ConfigError, match="not a ramoe training checkpoint"):
        train(cfg, "ramoe", tmp_path / "f", lam=1.0, resume_from=tmp_path)
    # a run folder of another configuration
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / TR.SPEC).write_text(json.dumps({"identity": {"model": "other"}}))
    with pytest.raises(ConfigError, match="another model"):
        train(cfg, "ramoe", tmp_path / "g", lam=1.0)


def test_steering_trains_nothing_and_returns_the_band_spec(shared_cache, tmp_path):
    cfg = cfg_for(shared_cache)
    res = train(cfg, "steering", tmp_path / "s")
    assert res["adapter"] is None and not (tmp_path / "s").exists()
    assert res["steering"]["strength"] == cfg.steering.strengths[0]
    assert {int(l) for l in res["steering"]["experts"]} == set(res["band_layers"]) == {1, 2, 3}
    assert all(len(v) == TOP_K for v in res["steering"]["experts"].values())


def test_empty_ci_trains_as_sft_with_a_warning(shared_cache, tmp_path, monkeypatch):
    import pandas as pd

    real = pd.read_parquet

    def no_ci(*a, **kw):  # the taxonomy as if no pair were ci
        df = real(*a, **kw)
        if "category" in df:
            df["category"] = df["category"].replace("ci", "ii")
        return df

    monkeypatch.setattr(pd, "read_parquet", no_ci)
    cfg = cfg_for(shared_cache, max_steps=1)
    with pytest.warns(UserWarning, match="no ci example"):
        plan = TR.prepare(cfg, cfg.models[0], cfg.tasks[0], LANG, method="ramoe", lam=5.0, band=BAND, top_k=TOP_K,
                          num_workers=0)
    assert plan["n_ci"] == 0 and plan["lam"] == 5.0 and plan["lam_used"] == 0.0
    assert any("training as SFT" in n for n in plan["notes"])


# ------------------------------------------------------------------ ZeRO-3 on two Ray Train workers


@pytest.mark.integration
def test_zero3_two_workers_restart_after_failure_matches_uninterrupted(shared_cache, tmp_path):
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg_for(shared_cache, batch_size=6, epochs=2, max_steps=4, checkpoint_every=2, max_failures=1, lr=1e-2)
    from ramoe_ray.tasks import build_prompt, load_parallel

    data = load_parallel(cfg.tasks[0], [LANG], cache_dir=cfg.cache_dir)
    fmt = cfg.tasks[0].format
    probe = [build_prompt(data[LANG][0], fmt), build_prompt(data["en"][1], fmt)]
    try:
        clean = train(cfg, "ramoe", tmp_path / "clean", lam=10.0, num_workers=2, probe=probe)
        faulty = train(cfg, "ramoe", tmp_path / "faulty", lam=10.0, num_workers=2, probe=probe, _fail_at_step=3)
    finally:
        ray.shutdown()
    assert clean["world_size"] == faulty["world_size"] == 2
    assert clean["restarts"] == 0 and faulty["restarts"] == 1
    assert (tmp_path / "faulty" / ".fault_injected").read_text() == "3"
    # the loss falls (mean continuation CE over the whole train split, before vs after)
    assert clean["final"]["ce_train"] < clean["final"]["ce_train_base"] - 0.01, clean["final"]
    # restarted from the step-2 checkpoint, the run ends where the uninterrupted one does
    tol = 1e-5
    assert [h["step"] for h in faulty["history"]] == [1, 2, 3, 4]
    for a, b in zip(clean["history"], faulty["history"]):
        assert a["ce"] == pytest.approx(b["ce"], abs=tol)
    for k in ("loss", "ce", "ce_train", "routing_kl_ci"):
        assert clean["final"][k] == pytest.approx(faulty["final"][k], abs=tol), k
    wa = load_file(f"{clean['adapter']}/{LA.ADAPTER_WEIGHTS}")
    wb = load_file(f"{faulty['adapter']}/{LA.ADAPTER_WEIGHTS}")
    assert all(torch.allclose(wa[k], wb[k], atol=tol, rtol=0) for k in wa)
    # the adapter loads with peft onto the plain model and reproduces the trained (ZeRO-3) model
    path = clean["identity"]["model_path"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    enc = tok(probe, return_tensors="pt", padding=True)
    for res, run in ((clean, "clean"), (faulty, "faulty")):
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        peft = PeftModel.from_pretrained(plain, res["adapter"]).eval()
        with torch.no_grad():
            got = peft(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        want = torch.load(tmp_path / run / "probe_logits.pt")
        assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
        assert sum(float(v.abs().sum()) for k, v in load_file(f"{res['adapter']}/{LA.ADAPTER_WEIGHTS}").items()
                   if "lora_B" in k) > 0
