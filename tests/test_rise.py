"""The RISE baseline against its published code (github.com/init-neok/rise): the selection equals a plain
re-implementation of Algorithm 1 written here with loops; the pooled activation frequency; the default
budget; full-weight training touches exactly the selected experts (plain torch here, DeepSpeed ZeRO-3 in
process and on two Ray Train workers in the slow tests) and is RISE's training of those weights."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import fresh_ray_for_deepspeed_workers, small_config

from ramoe_ray import expert_delta, lora, models, train
from ramoe_ray.config import RiseConfig, config_from_dict, method_label
from ramoe_ray.routing_stats import (
    budget_split,
    depth_zones,
    pooled_frequency,
    rise_scores,
    rise_select,
    sequence_importance,
)

# ------------------------------------------------------------------- a reference written with loops


def ref_scores(freqs: dict, target: str, alpha: float) -> tuple[list, list]:
    """Spec and Ovlp (rise/expert_selector.py) per (layer, expert), element by element."""
    langs = sorted(freqs)
    n_layers, n_exp = freqs[target].shape
    spec = [[0.0] * n_exp for _ in range(n_layers)]
    ovlp = [[0.0] * n_exp for _ in range(n_layers)]
    for l in range(n_layers):
        for i in range(n_exp):
            vals = [float(freqs[x][l, i]) for x in langs]
            mean = 0.0
            for v in vals:
                mean += v
            mean /= len(vals)
            var = 0.0
            for v in vals:
                var += (v - mean) * (v - mean)
            std = math.sqrt(var / len(vals))
            den = mean if mean > 0 else 1e-8
            a = float(freqs[target][l, i])
            spec[l][i] = a / den * (1 + alpha * a)
            ovlp[l][i] = 1 / (1 + std / den) * (1 + alpha * mean)
    return spec, ovlp


def ref_zones(n_layers: int) -> list[str]:
    """The zone of each MoE layer, by position."""
    l1, l2 = round(0.375 * n_layers), round(0.625 * n_layers)
    return ["shallow" if j < l1 else "middle" if j < l2 else "deep" for j in range(n_layers)]


def ref_budgets(k: int, capacity: dict) -> dict:
    """RISESelector.select + _redistribute_budgets."""
    budgets = {"shallow": math.floor(k * 35 / 100), "middle": math.floor(k * 25 / 100)}
    budgets["deep"] = k - budgets["shallow"] - budgets["middle"]
    overflow = 0
    for z in budgets:
        if budgets[z] > capacity[z]:
            overflow += budgets[z] - capacity[z]
            budgets[z] = capacity[z]
    while overflow > 0:
        room = {z: capacity[z] - budgets[z] for z in budgets}
        best = max([z for z in room if room[z] > 0], key=lambda z: room[z])
        take = min(room[best], overflow)
        budgets[best] += take
        overflow -= take
    return budgets


def ref_select(spec: list, ovlp: list, moe_layers: list, k: int) -> dict:
    """Algorithm 1 on the scores of ``ref_scores``."""
    n_exp = len(spec[0])
    zone_of = ref_zones(len(moe_layers))
    capacity = {z: zone_of.count(z) * n_exp for z in ("shallow", "middle", "deep")}
    budgets = ref_budgets(k, capacity)
    chosen = []
    for zone in ("shallow", "middle", "deep"):
        score = ovlp if zone == "middle" else spec
        cands = [(score[j][i], moe_layers[j], i) for j in range(len(moe_layers)) if zone_of[j] == zone
                 for i in range(n_exp)]
        cands.sort(key=lambda c: c[0], reverse=True)  # Python's sort is stable with reverse=True too
        chosen += [(l, i) for _, l, i in cands[: budgets[zone]]]
    out = {}
    for l, i in sorted(chosen):
        out.setdefault(l, []).append(i)
    return out


def random_frequencies(rng: np.random.Generator, langs: list, n_layers: int, n_exp: int) -> dict:
    """Pooled frequencies as counts / tokens with few tokens: many exact zeros and exact ties; one expert
    is never used in any language (ā = 0: the 1e-8 denominator)."""
    out = {}
    for lang in langs:
        tokens = int(rng.integers(4, 12))
        f = rng.integers(0, 4, size=(n_layers, n_exp)) * (rng.random((n_layers, n_exp)) < 0.6) / tokens
        f[:, -1] = 0.0
        out[lang] = f
    return out


# --------------------------------------------------------------------------------------- selection


def test_zones_and_budget_splits_by_hand():
    assert ref_zones(4) == ["shallow", "shallow", "deep", "deep"]  # round(1.5) = 2 = round(2.5): no middle
    assert depth_zones([10, 11, 12, 13]) == {"shallow": [10, 11], "middle": [], "deep": [12, 13]}
    z12, z28 = depth_zones(range(12)), depth_zones(range(28))  # round(4.5) = 4, round(7.5) = 8; 10.5 -> 10, 17.5 -> 18
    assert (len(z12["shallow"]), len(z12["middle"]), len(z12["deep"])) == (4, 4, 4)
    assert (len(z28["shallow"]), len(z28["middle"]), len(z28["deep"])) == (10, 8, 10)
    roomy = {"shallow": 1000, "middle": 1000, "deep": 1000}
    for k, want in {10: (3, 2, 5), 30: (10, 7, 13), 50: (17, 12, 21), 70: (24, 17, 29)}.items():
        assert budget_split(k, roomy) == dict(zip(("shallow", "middle", "deep"), want))
    # L = 4, E = 64: no middle zone; its share goes to the zone with the most room (shallow: its floor is smaller)
    cap4 = {"shallow": 128, "middle": 0, "deep": 128}
    for k, want in {10: (5, 0, 5), 30: (17, 0, 13), 50: (29, 0, 21), 70: (41, 0, 29)}.items():
        assert budget_split(k, cap4) == dict(zip(("shallow", "middle", "deep"), want))
    # L = 4, E = 8: shallow fills up (16), the rest of the overflow goes deep
    assert budget_split(30, {"shallow": 16, "middle": 0, "deep": 16}) == {"shallow": 16, "middle": 0, "deep": 14}
    # the excess goes whole to the zone with the most room (not one expert at a time); equal room: the shallower
    assert budget_split(12, {"shallow": 9, "middle": 0, "deep": 9}) == {"shallow": 7, "middle": 0, "deep": 5}
    assert budget_split(10, {"shallow": 5, "middle": 0, "deep": 7}) == {"shallow": 5, "middle": 0, "deep": 5}
    with pytest.raises(ValueError, match="allowed 1..32"):
        budget_split(33, {"shallow": 16, "middle": 0, "deep": 16})


def test_scores_by_hand():
    # one layer, two experts, en and sw; expert 1 unused everywhere
    freqs = {"en": np.array([[0.25, 0.0]]), "sw": np.array([[0.75, 0.0]])}
    spec, ovlp = rise_scores(freqs, "sw", alpha=10.0)
    # ā = 0.5, S = 1.5, Spec = 1.5 · 8.5; σ = 0.25, CV = 0.5, O = 2/3, Ovlp = 2/3 · 6
    np.testing.assert_allclose(spec, [[1.5 * 8.5, 0.0]], rtol=1e-15)
    np.testing.assert_allclose(ovlp, [[4.0, 1.0]], rtol=1e-15)


@pytest.mark.parametrize("n_layers", [4, 12, 16, 24, 28, 48])
@pytest.mark.parametrize("n_exp", [8, 64, 128])
def test_selection_equals_the_loop_reference(n_layers, n_exp):
    cap = n_layers * n_exp
    for seed in range(5):
        rng = np.random.default_rng(1000 * n_layers + n_exp + seed)
        langs = ["en", "sw", "te", "bn"][: 2 + seed % 3]
        target = langs[1 + seed % (len(langs) - 1)]
        alpha = [10.0, 0.0, 2.5, 10.0, 10.0][seed]
        freqs = random_frequencies(rng, langs, n_layers, n_exp)
        layers = list(range(1, n_layers + 1)) if seed % 2 else list(range(n_layers))  # with a dense layer 0
        spec, ovlp = rise_scores(freqs, target, alpha=alpha)
        want_spec, want_ovlp = ref_scores(freqs, target, alpha)
        assert np.array_equal(spec, np.array(want_spec)) and np.array_equal(ovlp, np.array(want_ovlp))
        ks = set(range(1, 13)) | {10, 30, 50, 70, cap // 3, cap // 2, cap - 1, cap}
        ks |= {int(x) for x in rng.integers(1, cap + 1, size=6)}
        for k in sorted(x for x in ks if x <= cap):
            got = rise_select(freqs, target=target, moe_layers=layers, num_layers=n_layers + 1, budget=k, alpha=alpha)
            assert got == ref_select(want_spec, want_ovlp, layers, k), (seed, k)
            assert sum(map(len, got.values())) == k
        with pytest.raises(ValueError, match=f"allowed 1..{cap}"):
            rise_select(freqs, target=target, moe_layers=layers, num_layers=n_layers + 1, budget=cap + 1)


def test_selection_needs_two_languages_and_one_shape():
    f = np.zeros((4, 8))
    with pytest.raises(ValueError, match="at least one other language"):
        rise_select({"sw": f}, target="sw", moe_layers=range(4), num_layers=4, budget=2)
    with pytest.raises(ValueError, match="one shape"):
        rise_select({"sw": f, "en": np.zeros((4, 7))}, target="sw", moe_layers=range(4), num_layers=4, budget=2)
    with pytest.raises(ValueError, match="no frequencies for target"):
        rise_select({"de": f, "en": f}, target="sw", moe_layers=range(4), num_layers=4, budget=2)


# --------------------------------------------------------------------------------------- frequency


def test_pooled_frequency_counts_tokens_over_all_examples():
    """The taxonomy's per-example shares, pooled, are RISE's a: selected-token counts over all real tokens."""
    rng = np.random.default_rng(0)
    n_layers, b, t, n_exp, k = 3, 5, 9, 8, 2
    selected = np.stack([rng.permutation(n_exp)[:k] for _ in range(n_layers * b * t)]).reshape(n_layers, b, t, k)
    lengths = np.array([9, 1, 4, 7, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    selected[:, ~mask] = -1
    probs = rng.random((n_layers, b, t, n_exp))
    _, freq = sequence_importance(probs, selected, mask, k=k)
    got = pooled_frequency(freq, mask.sum(1))
    counts = np.zeros((n_layers, n_exp))
    for l in range(n_layers):
        for s in range(b):
            for pos in range(lengths[s]):
                for e in selected[l, s, pos]:
                    counts[l, e] += 1
    assert np.array_equal(got, counts / lengths.sum())
    assert np.allclose(got.sum(-1), k)
    assert not np.allclose(got, freq.mean(0))  # a mean of per-example shares would weight short examples up


# ------------------------------------------------------------------------------------------ config


def test_default_budget_is_two_percent_of_routed_experts():
    rise = RiseConfig()
    assert rise.budget is None and rise.alpha == 10.0 and rise.languages == "all" and rise.train == "full"
    assert rise.budget_for(48 * 128) == 123  # Qwen3-30B-A3B: ceil(122.88); RISE used 128
    assert rise.budget_for(16 * 64) == 21  # OLMoE-1B-7B: ceil(20.48)
    assert rise.budget_for(4 * 8) == 1 and rise.budget_for(50) == 1 and rise.budget_for(51) == 2
    assert RiseConfig(budget=7).budget_for(32) == 7
    cfg = config_from_dict({"models": [{"name": "m", "family": "olmoe", "path": "x"}],
                            "tasks": [{"name": "t", "format": "multiple_choice", "source": "x"}], "languages": ["sw"],
                            "rise": {"train": "lora"}})
    assert method_label("rise", cfg) == "RISE-LoRA" and method_label("sft", cfg) == "SFT"
    assert method_label("rise", cfg.model_copy(update={"rise": RiseConfig()})) == "RISE"


# ------------------------------------------------------------------ full-weight training (plain torch)

SELECTION = {0: [1, 6], 2: [3]}  # layers 1 and 3 train nothing


def _deepseek_selection(model) -> dict:
    first = min(models.experts_modules(model))
    return {first: [1, 6], first + 2: [3]}


@pytest.mark.parametrize("family", list(models.FAMILIES))
def test_full_weight_training_moves_only_the_selected_experts(family, tmp_path):
    """AdamW on the deltas changes exactly the chosen experts' rows (every parameter of the expert); every
    other weight stays bit-identical; the saved expert weights reproduce the trained model; and it is
    RISE's training: AdamW on the fused weights with the unchosen rows' gradients dropped ends the same."""
    torch.manual_seed(0)
    base = models.build_tiny(family, seed=0)
    sel = _deepseek_selection(base) if family == "deepseek_v2" else SELECTION
    model = expert_delta.apply_expert_delta(copy.deepcopy(base), experts=sel)
    params = expert_delta.delta_parameters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".delta_" in n}
    per_expert = sum(p[0].numel() for p in next(iter(models.experts_modules(base).values())).parameters())
    assert sum(p.numel() for p in params) == 3 * per_expert  # proportional to K = 3, not to every expert

    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref_params = {l: list(models.experts_modules(ref)[l].parameters(recurse=False)) for l in sel}
    for ps in ref_params.values():
        for p in ps:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([p for ps in ref_params.values() for p in ps], lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (4, 24), generator=gen)  # enough tokens: every expert routed
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
        for l, ps in ref_params.items():  # RISE trains only the chosen experts: the others' grads are dropped
            keep = torch.zeros(ps[0].shape[0], dtype=torch.bool)
            keep[sel[l]] = True
            for p in ps:
                p.grad[~keep] = 0.0
        opt.step()
        ref_opt.step()
    assert len(opt.state) == len(params)
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values()) == 2 * 3 * per_expert

    out = tmp_path / "experts"
    expert_delta.save_experts(model, out, "base")
    merged = expert_delta.load_experts(copy.deepcopy(base), out)
    changed = 0
    for (name, p), (_, b0), (_, r) in zip(merged.named_parameters(), base.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, r, atol=1e-4, rtol=0), name  # RISE's weights (Adam moves each by ~1e-2 a step)
        layer = int(name.split("layers.")[1].split(".")[0]) if ".experts." in name else None
        rows = torch.zeros(p.shape[0], dtype=torch.bool)
        if layer in sel:
            rows[sel[layer]] = True
        assert torch.equal(p[~rows], b0[~rows]), name  # bit-identical
        changed += sum(not torch.equal(p[j], b0[j]) for j in torch.nonzero(rows).flatten())
    assert changed == 3 * len(list(next(iter(models.experts_modules(base).values())).parameters()))
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)


def test_delta_misuse_is_refused():
    model = models.build_tiny("olmoe", seed=0)
    with pytest.raises(ValueError, match="not a MoE layer"):
        expert_delta.apply_expert_delta(copy.deepcopy(model), experts={9: [0]})
    with pytest.raises(ValueError, match="outside"):
        expert_delta.apply_expert_delta(copy.deepcopy(model), experts={0: [8]})
    with pytest.raises(ValueError, match="nothing to train"):
        expert_delta.apply_expert_delta(copy.deepcopy(model), experts={0: []})
    expert_delta.apply_expert_delta(model, experts={0: [1]})
    with pytest.raises(ValueError, match="already applied"):
        expert_delta.apply_expert_delta(model, experts={0: [2]})


# ----------------------------------------------------------------- training through train.train_cell

LANG, TASK = "syn3", "category"
TRAIN = dict(lr=5e-3, batch_size=12, epochs=1, lora_rank=4, lora_alpha=8, checkpoint_every=100, log_every=1)


def _fit(cache, mode: str, run_dir, **kw):
    cfg = small_config(cache, task=TASK, languages=(LANG,), rise=dict(budget=5, train=mode),
                       resources=dict(inference_actors=0, cpus_per_worker=0.5),
                       training={**TRAIN, **kw.pop("training", {})})
    kw.setdefault("num_workers", 0)
    return cfg, train.train_cell(cfg, cfg.models[0], cfg.tasks[0], LANG, method="rise", run_dir=run_dir, **kw)


def _effective_experts(res: dict) -> tuple[dict, dict]:
    """(trained, base) experts modules' weights per layer: the saved adapter applied to the base model."""
    from transformers import AutoModelForCausalLM

    from ramoe_ray.evaluate import load_adapter

    path = res["identity"]["model_path"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trained = load_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), res["adapter"])
    out = {}
    for layer, ex in models.experts_modules(trained).items():
        if hasattr(ex, "ramoe_lora_state"):  # fold the LoRA factors in
            st = ex.ramoe_lora_state
            out[layer] = {n: torch.baddbmm(getattr(ex, n), getattr(ex, f"lora_B_{n}"), getattr(ex, f"lora_A_{n}"),
                                           alpha=st.scale) for n in st.targets}
        else:
            out[layer] = dict(ex.named_parameters(recurse=False))
    ref = {l: dict(ex.named_parameters(recurse=False)) for l, ex in models.experts_modules(base).items()}
    return out, ref


def _assert_only_selected_changed(res: dict) -> None:
    selection = {int(l): v for l, v in res["experts_mask"].items()}
    trained, base = _effective_experts(res)
    changed = 0
    for layer, weights in trained.items():
        for name, w in weights.items():
            chosen = torch.zeros(w.shape[0], dtype=torch.bool)
            chosen[selection.get(layer, [])] = True
            ref = base[layer][name]
            assert torch.equal(w[~chosen], ref[~chosen]), (layer, name)  # bit-identical
            changed += int((w[chosen] != ref[chosen]).flatten(1).any(-1).sum())
    assert changed == 2 * sum(map(len, selection.values()))  # both projections of every selected expert


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_rise_trains_only_selected_experts(shared_cache, tmp_path, mode):
    cfg, res = _fit(shared_cache, mode, tmp_path / mode)
    assert res["adapter"] and res["adapter_kind"] == res["identity"]["rise.train"] == mode
    art = json.loads(open(res["experts_json"]).read())
    assert art["rise"]["budget"] == 5 and art["rise"]["languages"] == ["en", LANG]
    assert sum(map(len, res["experts_mask"].values())) == 5
    saved = (tmp_path / mode / "adapter" / (expert_delta.EXPERTS_META if mode == "full" else lora.RAMOE_LORA))
    assert saved.is_file()
    _assert_only_selected_changed(res)
    assert res["final"]["ce_train"] < res["final"]["ce_train_base"]


@pytest.mark.slow
def test_full_weight_rise_under_zero3_on_two_ray_train_workers(shared_cache, tmp_path):
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ramoe_ray.evaluate import load_adapter
    from ramoe_ray.tasks import build_prompt, load_parallel

    probe_cfg = small_config(shared_cache, task=TASK, languages=(LANG,))
    data = load_parallel(probe_cfg.tasks[0], [LANG])
    fmt = probe_cfg.tasks[0].format
    probe = [build_prompt(data[LANG][0], fmt), build_prompt(data["en"][1], fmt)]
    try:
        _, res = _fit(shared_cache, "full", tmp_path / "z3", num_workers=2, probe=probe,
                      training=dict(batch_size=6, epochs=2, max_steps=4, lr=1e-2))
    finally:
        ray.shutdown()
    assert res["world_size"] == 2 and res["steps"] == 4
    _assert_only_selected_changed(res)
    assert res["final"]["ce_train"] < res["final"]["ce_train_base"], res["final"]
    # the saved experts, copied into the plain model, reproduce the trained ZeRO-3 model
    path = res["identity"]["model_path"]
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    enc = tok(probe, return_tensors="pt", padding=True)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), res["adapter"])
    with torch.no_grad():
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    want = torch.load(tmp_path / "z3" / "probe_logits.pt")
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


# ------------------------------------------------- ZeRO-3 with partitioned deltas (Ray Train, two workers)

Z3_SELECTION = {0: [1, 2, 5], 2: [0, 7]}


def _z3_config() -> dict:
    cfg = json.loads(lora.DS_ZERO3_CONFIG.read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny deltas
    cfg["optimizer"]["params"]["lr"] = 2e-2
    cfg["train_micro_batch_size_per_gpu"] = 2
    return cfg


def _z3_worker(config: dict) -> None:
    """One Ray Train worker: the model built partitioned, the deltas partitioned, a few steps, save."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ramoe_ray import expert_delta, models, train_worker

    train_worker.build_comm_op()  # DeepSpeed's CPU comm op, loaded as train_worker.setup loads it
    rank = ray.train.get_context().get_world_rank()
    dschf = HfDeepSpeedConfig(config["ds_config"])  # noqa: F841  (must stay alive while the model is built)
    model = AutoModelForCausalLM.from_pretrained(config["base"], dtype=torch.float32)
    expert_delta.apply_expert_delta(model, experts={int(k): v for k, v in config["experts"].items()})
    deepspeed.utils.set_z3_leaf_modules(model, models.zero3_leaf_classes(model))  # as train_worker.setup
    engine, *_ = deepspeed.initialize(model=model, model_parameters=expert_delta.delta_parameters(model),
                                      config=config["ds_config"])
    assert all(p.numel() == 0 for p in expert_delta.delta_parameters(engine.module)), "deltas should be partitioned"
    ids = torch.tensor(config["batches"][rank])
    for _ in range(config["steps"]):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    expert_delta.save_experts(engine.module, config["out"], config["base"])
    ray.train.report({"rank": rank})


def _z3_reference(base, ds_config: dict, batches: list, steps: int) -> dict:
    """The same training without DeepSpeed: one process, the ranks' losses averaged, clipped, AdamW."""
    from transformers import AutoModelForCausalLM

    model = expert_delta.apply_expert_delta(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                            experts=Z3_SELECTION)
    params = expert_delta.delta_parameters(model)
    o = ds_config["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"])
    for _ in range(steps):
        loss = sum(model(input_ids=torch.tensor(b), labels=torch.tensor(b)).loss for b in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ds_config["gradient_clipping"])
        opt.step()
    return expert_delta.expert_state_dict(model)


@pytest.mark.slow
def test_zero3_partitioned_deltas_train_as_plain_data_parallel(tmp_path):
    import sys

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    base = tmp_path / "base"
    models.build_tiny("olmoe", seed=0).save_pretrained(base)
    cfg = _z3_config()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(3, 256, (2, 12), generator=gen).tolist() for _ in range(2)]
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    fresh_ray_for_deepspeed_workers()
    try:
        result = TorchTrainer(
            _z3_worker,
            train_loop_config={"base": str(base), "ds_config": cfg, "batches": batches, "steps": 4,
                               "experts": {str(k): v for k, v in Z3_SELECTION.items()}, "out": str(tmp_path / "out")},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="zero3-delta", storage_path=str(tmp_path / "ray")),
        ).fit()
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None
    got = load_file(str(tmp_path / "out" / expert_delta.EXPERT_WEIGHTS))
    want = _z3_reference(base, cfg, batches, 4)
    assert got.keys() == want.keys() and len(got) == 4  # 2 layers x (gate_up_proj, down_proj)
    step = cfg["optimizer"]["params"]["lr"]  # a missing or stale gradient would differ by ~ a step
    for key, v in want.items():
        assert torch.allclose(got[key], v, atol=step / 100, rtol=0), (key, float((got[key] - v).abs().max()))
    plain = models.build_tiny("olmoe", seed=0)
    for key, v in got.items():
        layer = int(key.split("layers.")[1].split(".")[0])
        weight = dict(models.experts_modules(plain)[layer].named_parameters())[key.rsplit(".", 1)[1]]
        ref_rows = weight[Z3_SELECTION[layer]]
        assert (v != ref_rows).flatten(1).any(-1).all(), key  # every selected expert trained


def test_rise_settings_resolve_k_and_name_the_languages():
    from types import SimpleNamespace

    from ramoe_ray.experts import rise_settings

    shape = SimpleNamespace(moe_layers=tuple(range(48)), num_experts=128)  # Qwen3-30B-A3B
    for languages, want in (("all", ["en", "bn", "sw", "te"]), ("pair", ["en", "sw"])):
        plan = SimpleNamespace(cfg=SimpleNamespace(rise=RiseConfig(languages=languages)), shape=shape,
                               languages=["sw", "te", "bn"])
        assert rise_settings(plan, "sw") == {"budget": 123, "alpha": 10.0, "languages": want}


def test_validation_refuses_a_budget_above_the_routed_experts(tmp_path):
    from ramoe_ray import sources
    from ramoe_ray.config import ConfigError

    d = {"models": [{"name": "m", "family": "olmoe", "path": "preset:olmoe"}],  # 4 layers x 8 experts
         "tasks": [{"name": "t", "format": "multiple_choice", "source": "synthetic:category"}],
         "languages": ["syn3"], "cache_dir": str(tmp_path)}
    for budget in (None, 32):  # the default (2 %: K = 1) and the largest K fit
        sources.check(config_from_dict({**d, "rise": {"budget": budget}}))
    with pytest.raises(ConfigError, match=r"rise.budget = 33: larger than the 32 .* allowed: 1..32"):
        sources.check(config_from_dict({**d, "rise": {"budget": 33}}))
