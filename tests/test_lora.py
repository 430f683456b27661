"""Expert LoRA: the same function as peft's target_parameters LoRA, a peft-loadable adapter, the
per-expert mask, frozen base — and training under DeepSpeed ZeRO-3 on two Ray Train workers."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import fresh_ray_for_deepspeed_workers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from ramoe_ray import lora as LA
from ramoe_ray import models as M

FAMILIES = list(M.FAMILIES)


def ids_batch(seed=0, b=2, t=9):
    return torch.randint(3, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=0, std=0.2):
    """Nonzero A and B everywhere (B = 0 at init would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in LA.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_model(base, rank=2, alpha=4):
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=list(M.family_of(base).lora_targets))
    return get_peft_model(base, cfg)


def lora_grads_peft_layout(model):
    """Our factor grads in peft's key layout (the same mapping as lora_state_dict)."""
    saved = {}
    with torch.no_grad():
        for p in LA.lora_parameters(model):
            saved[p] = p.detach().clone()
            p.copy_(p.grad)
        for ex in M.experts_modules(model).values():  # the mask multiplies B: unmask for a grad readout
            ex._buffers[LA.MASK_BUFFER].fill_(1.0)
        grads = LA.lora_state_dict(model)
        for p, v in saved.items():
            p.copy_(v)
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_same_function_and_gradients_as_peft(family):
    base = M.build_tiny(family, seed=0)
    ours = LA.apply_expert_lora(copy.deepcopy(base), rank=2, alpha=4, seed=0)
    theirs = peft_model(copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft's own init for A, a nonzero B; copied into ours
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_state = get_peft_model_state_dict(theirs)
    LA.load_lora_state_dict(ours, peft_state)
    assert set(LA.lora_state_dict(ours)) == set(peft_state)
    for k, v in LA.lora_state_dict(ours).items():
        assert torch.equal(v, peft_state[k]), k

    ids = ids_batch()
    out_ours = ours(input_ids=ids, labels=ids)
    out_theirs = theirs(input_ids=ids, labels=ids)
    assert torch.allclose(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    assert not torch.allclose(out_ours.logits, base(input_ids=ids).logits, atol=1e-3)  # the adapter acts
    out_ours.loss.backward()
    out_theirs.loss.backward()
    ours_grads = lora_grads_peft_layout(ours)
    theirs_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads)
    for k, v in ours_grads.items():
        assert torch.count_nonzero(theirs_grads[k]) > 0, k
        assert torch.allclose(v, theirs_grads[k], atol=1e-7, rtol=1e-5), k


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_loads_in_peft_and_reproduces_logits(family, tmp_path):
    model = LA.apply_expert_lora(M.build_tiny(family, seed=0), rank=3, alpha=6, seed=0)
    randomize_lora(model)
    ids = ids_batch(seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = LA.save_adapter(model, tmp_path / "adapter", f"preset:{family}")
    cfg = json.loads((out / LA.ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_parameters"]) == sorted(M.FAMILIES[family].lora_targets)
    assert cfg["base_model_name_or_path"] == f"preset:{family}"
    weights = load_file(str(out / LA.ADAPTER_WEIGHTS))
    assert len(weights) == 4 * len(M.experts_modules(model)) and all(v.abs().sum() > 0 for v in weights.values())

    loaded = PeftModel.from_pretrained(M.build_tiny(family, seed=0), str(out))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        LA.save_adapter(model, out, f"preset:{family}")


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v2"])
def test_mask_trains_only_selected_experts(family, tmp_path):
    model = M.build_tiny(family, seed=0)
    layers = sorted(M.experts_modules(model))
    selection = {layers[0]: [1, 6], layers[-1]: [0, 2, 3]}  # other layers: nothing selected
    LA.apply_expert_lora(model, rank=2, alpha=4, seed=0, experts_mask=selection)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(LA.lora_parameters(model), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(4):
        ids = ids_batch(seed=10 + step, b=4, t=12)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        for layer, ex in M.experts_modules(model).items():
            chosen = torch.zeros(8, dtype=torch.bool)
            chosen[selection.get(layer, [])] = True
            for n, p in ex.named_parameters(recurse=False):
                if n.startswith("lora_"):
                    assert torch.count_nonzero(p.grad[~chosen]) == 0, (layer, n)
        opt.step()
    names = {id(m): n for n, m in model.named_modules()}
    for layer, ex in M.experts_modules(model).items():
        chosen = torch.zeros(8, dtype=torch.bool)
        chosen[selection.get(layer, [])] = True
        for name in ex.ramoe_lora_state.targets:
            a, b = ex._parameters[f"lora_A_{name}"], ex._parameters[f"lora_B_{name}"]
            delta = torch.bmm(b * ex.lora_mask[:, None, None], a)  # the effective delta per expert
            assert torch.count_nonzero(delta[~chosen]) == 0
            assert torch.count_nonzero(b[~chosen]) == 0  # B stays exactly 0, weight decay or not
            prefix = f"{names[id(ex)]}.lora_B_{name}"
            if chosen.any():
                assert not torch.equal(b[chosen], before[prefix][chosen])
                assert (delta[chosen].flatten(1).abs().sum(-1) > 0).all()
    # every base weight is untouched
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, before[n]), n
    # the saved adapter carries the masked factors: peft reproduces the trained model
    model.eval()
    ids = ids_batch(seed=99)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = LA.save_adapter(model, tmp_path / "rise", f"preset:{family}")
    assert json.loads((out / LA.RAMOE_LORA).read_text())["experts_mask"] == {
        str(l): sorted(selection.get(l, [])) for l in layers
    }
    loaded = PeftModel.from_pretrained(M.build_tiny(family, seed=0), str(out))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)


def test_only_lora_factors_require_grad():
    for family in FAMILIES:
        model = LA.apply_expert_lora(M.build_tiny(family, seed=0), rank=2, alpha=4, seed=0)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        n_moe = len(M.experts_modules(model))
        assert len(trainable) == 4 * n_moe
        assert all(n.rsplit(".", 1)[-1] in {"lora_A_gate_up_proj", "lora_B_gate_up_proj", "lora_A_down_proj", "lora_B_down_proj"} for n in trainable)
        assert {id(p) for p in LA.lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
        assert all(not r.weight.requires_grad for r in M.routers(model).values())
        # B = 0 at init: the adapted model is the base model
        ids = ids_batch()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, M.build_tiny(family, seed=0)(input_ids=ids).logits)
        # the mask buffer is not part of the model's checkpoint
        assert not any(k.endswith(LA.MASK_BUFFER) for k in model.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients():
    """Real models train with gradient checkpointing (it bounds the memory of the effective weights);
    the recomputed forward goes through the same patched experts forward."""
    ids = ids_batch(seed=3, b=2, t=10)
    grads = []
    for checkpointing in (False, True):
        model = LA.apply_expert_lora(M.build_tiny("qwen3_moe", seed=0), rank=2, alpha=4, seed=0)
        randomize_lora(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in LA.lora_parameters(model)])
    assert all(torch.count_nonzero(g) > 0 for g in grads[0])
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(*grads))


def test_misuse_is_refused():
    model = M.build_tiny("olmoe", seed=0)
    with pytest.raises(ValueError, match="not MoE layers"):
        LA.apply_expert_lora(copy.deepcopy(model), rank=2, alpha=4, seed=0, experts_mask={9: [0]})
    with pytest.raises(ValueError, match="outside"):
        LA.apply_expert_lora(copy.deepcopy(model), rank=2, alpha=4, seed=0, experts_mask={0: [8]})
    with pytest.raises(ValueError, match="no expert LoRA"):
        LA.lora_state_dict(model)
    LA.apply_expert_lora(model, rank=2, alpha=4, seed=0)
    with pytest.raises(ValueError, match="already applied"):
        LA.apply_expert_lora(model, rank=2, alpha=4, seed=0)


# ------------------------------------------------------------------------------ ZeRO-3 on Ray Train

Z3_FAMILY = "olmoe"
Z3_STEPS = 6
Z3_MASK = {0: [1, 2, 5], 2: [0, 7]}  # a RISE-like selection: layers 1 and 3 train nothing


def z3_config():
    cfg = json.loads(LA.DS_ZERO3_CONFIG.read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny factors
    cfg["optimizer"]["params"]["lr"] = 2e-2
    cfg["train_micro_batch_size_per_gpu"] = 2
    return cfg


def z3_batch(rank):
    return ids_batch(seed=100 + rank, b=2, t=12)


def z3_worker(config):
    """One Ray Train worker: ZeRO-3 (model built partitioned), expert LoRA, a few steps, save."""
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ramoe_ray import lora as LA
    from ramoe_ray import models as M
    from ramoe_ray import train_worker

    train_worker.build_comm_op()  # DeepSpeed's CPU comm op, loaded as train_worker.setup loads it
    torch.manual_seed(0)
    rank = ray.train.get_context().get_world_rank()
    cfg = config["ds_config"]
    dschf = HfDeepSpeedConfig(cfg)  # noqa: F841  (must stay alive while the model is built)
    model = AutoModelForCausalLM.from_pretrained(config["base"], dtype=torch.float32)
    assert all(p.numel() == 0 for p in model.parameters()), "the model should be built partitioned (ZeRO-3)"
    mask = {int(k): v for k, v in config["mask"].items()}
    LA.apply_expert_lora(model, rank=4, alpha=8, seed=0, experts_mask=mask)
    deepspeed.utils.set_z3_leaf_modules(model, M.zero3_leaf_classes(model))  # as train_worker.setup
    engine, *_ = deepspeed.initialize(model=model, model_parameters=LA.lora_parameters(model), config=cfg)
    assert all(p.numel() == 0 for p in LA.lora_parameters(engine.module)), "LoRA factors should be partitioned"
    engine.train()
    ids = torch.tensor(config["batches"][rank])
    losses = []
    for _ in range(config["steps"]):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.eval()
    with torch.no_grad():  # a collective under ZeRO-3: every rank runs it
        logits = engine(input_ids=torch.tensor(config["probe"])).logits
    LA.save_adapter(engine.module, config["out"] + "/adapter", config["base"])
    out = Path(config["out"])
    (out / f"losses_{rank}.json").write_text(json.dumps(losses))
    if rank == 0:
        torch.save(logits, out / "logits.pt")
    ray.train.report({"loss": losses[-1]})


def reference_adapter(base_dir, ds_config, batches, steps):
    """The same training without DeepSpeed (one process, both ranks' batches): the ZeRO-3 result must equal it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    LA.apply_expert_lora(model, rank=4, alpha=8, seed=0, experts_mask=Z3_MASK)
    o = ds_config["optimizer"]["params"]
    opt = torch.optim.AdamW(LA.lora_parameters(model), lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"])
    model.train()
    for _ in range(steps):
        loss = sum(model(input_ids=torch.tensor(b), labels=torch.tensor(b)).loss for b in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(LA.lora_parameters(model), ds_config["gradient_clipping"])
        opt.step()
    return LA.lora_state_dict(model)


@pytest.mark.slow
def test_zero3_training_on_ray_train(tmp_path):
    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    base = tmp_path / "base"
    M.build_tiny(Z3_FAMILY, seed=0).save_pretrained(base)
    cfg = z3_config()
    batches = [z3_batch(r).tolist() for r in range(2)]
    probe = ids_batch(seed=7, b=2, t=10)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    fresh_ray_for_deepspeed_workers()
    try:
        trainer = TorchTrainer(
            z3_worker,
            train_loop_config={
                "base": str(base), "ds_config": cfg, "mask": {str(k): v for k, v in Z3_MASK.items()},
                "batches": batches, "probe": probe.tolist(), "steps": Z3_STEPS, "out": str(tmp_path),
            },
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="zero3-lora", storage_path=str(tmp_path / "ray")),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None

    for rank in range(2):  # the loss falls on each rank's data
        losses = json.loads((tmp_path / f"losses_{rank}.json").read_text())
        assert losses[-1] < losses[0] - 0.05, losses

    adapter = tmp_path / "adapter"
    weights = load_file(str(adapter / LA.ADAPTER_WEIGHTS))
    assert len(weights) == 16 and sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k) > 0
    for key, v in weights.items():  # masked factors: unselected experts' B rows are exactly zero
        if "lora_B" in key:
            layer = int(key.split("layers.")[1].split(".")[0])
            experts = v.reshape(v.shape[0], -1, 8).abs().sum(dim=(0, 1)) > 0
            assert experts.nonzero().flatten().tolist() == Z3_MASK.get(layer, []), key

    # the saved adapter on a plain model reproduces the trained ZeRO-3 model
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        got = loaded(input_ids=probe).logits
    assert torch.allclose(got, torch.load(tmp_path / "logits.pt"), atol=1e-5, rtol=0)

    # and ZeRO-3 computed what plain data-parallel training computes (gathered grads, averaged over ranks)
    reference = reference_adapter(base, cfg, batches, Z3_STEPS)
    # (Adam turns float-summation-order noise in tiny grads into up to ~5e-5 here; a missing or stale
    # gradient in any step would show as a difference of the order of the step size, lr = 2e-2)
    step = cfg["optimizer"]["params"]["lr"]
    for key, v in reference.items():
        assert torch.allclose(weights[key], v, atol=step / 100, rtol=0), key
