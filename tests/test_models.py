"""The family table: capture, steer, presets, refusal of non-MoE models — for every family."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from ramoe_ray import models as M
from ramoe_ray.config import ModelConfig

FAMILIES = list(M.FAMILIES)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return M.build_tiny(request.param, seed=1)


def padded_batch(seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def record_router_inputs_and_expert_indices(model):
    """Independent recorders: hidden states entering each router, top-k indices entering the experts."""
    seen_h, seen_idx, handles = {}, {}, []

    def keep(store, i, pos):
        def pre_hook(module, args):
            store.setdefault(i, args[pos].detach().clone())  # returns None: inputs unchanged

        return pre_hook

    for i, r in M.routers(model).items():
        handles.append(r.register_forward_pre_hook(keep(seen_h, i, 0)))
    for i, e in M.experts_modules(model).items():
        handles.append(e.register_forward_pre_hook(keep(seen_idx, i, 1)))
    return seen_h, seen_idx, handles


def test_capture_equals_probabilities_recomputed_from_router_weights(model):
    ids, mask = padded_batch()
    seen_h, seen_idx, handles = record_router_inputs_and_expert_indices(model)
    with torch.no_grad(), M.capture(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    routing = rec.routing(mask)
    probs, real = routing.probs(), mask.bool()
    assert routing.layers == sorted(M.moe_blocks(model))
    for j, layer in enumerate(routing.layers):
        router = M.routers(model)[layer]
        h = seen_h[layer].reshape(-1, router.weight.shape[1]).float()
        bias = getattr(router, "bias", None)
        by_hand = F.softmax(F.linear(h, router.weight.float(), None if bias is None else bias.float()), dim=-1)
        by_hand = by_hand.reshape(*ids.shape, -1)
        torch.testing.assert_close(probs[j][real], by_hand[real], rtol=1e-5, atol=1e-6)
        # padding contributes nothing
        assert torch.all(probs[j][~real] == 0) and torch.all(routing.selected[j][~real] == -1)
        # the selected experts are those the model's own experts module received
        own = seen_idx[layer].reshape(*ids.shape, -1).sort(dim=-1).values
        assert torch.equal(routing.selected[j][real], own[real])
        assert routing.selected.shape[-1] == model.config.num_experts_per_tok


def test_padding_does_not_change_a_sequence_routing(model):
    ids, mask = padded_batch()
    n = int(mask[2].sum())
    with torch.no_grad(), M.capture(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    batch = rec.routing(mask)
    with torch.no_grad(), M.capture(model) as rec:
        model(input_ids=ids[2:, :n], attention_mask=mask[2:, :n])
    alone = rec.routing(mask[2:, :n])
    torch.testing.assert_close(batch.probs()[:, 2, :n], alone.probs()[:, 0], rtol=1e-4, atol=1e-5)
    assert torch.equal(batch.selected[:, 2, :n], alone.selected[:, 0])


def test_route_rule_reproduces_each_router_exactly(model):
    fam = M.family_of(model)
    h = torch.randn(17, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for router in M.routers(model).values():
        logits, weights, indices = router(h)
        w2, i2 = fam.route(router, logits)
        assert torch.equal(indices, i2) and torch.equal(weights, w2)


def _own_topk(fam, router, logits):
    return fam.route(router, logits)[1].sort(dim=-1).values


def test_steer_forces_expert_into_topk_only_in_chosen_layers_and_restores_exactly(model):
    fam = M.family_of(model)
    ids, mask = padded_batch(seed=5)
    real = mask.bool()
    moe = sorted(M.moe_blocks(model))
    band = moe[1:2]  # one middle MoE layer
    rts = M.routers(model)
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
        with M.capture(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        base = rec.routing(mask)
        # pick, per band layer, the expert the unsteered model selects least
        counts = torch.stack([torch.bincount(base.selected[moe.index(l)][real].flatten(), minlength=8) for l in band])
        chosen = {l: [int(counts[j].argmin())] for j, l in enumerate(band)}
        with M.steer(model, chosen, strength=100.0), M.capture(model) as rec:
            steered_logits = model(input_ids=ids, attention_mask=mask).logits
        steered = rec.routing(mask)
        after_logits = model(input_ids=ids, attention_mask=mask).logits

    for l, experts in chosen.items():
        j = moe.index(l)
        assert counts[band.index(l)][experts[0]] < real.sum(), "test needs an expert not already always chosen"
        assert torch.all((steered.selected[j][real] == experts[0]).any(dim=-1))
    for j, l in enumerate(moe):
        if l < band[0]:  # before the steered layer: bit-identical routing
            assert torch.equal(steered.logits[j], base.logits[j])
            assert torch.equal(steered.selected[j], base.selected[j])
        elif l not in chosen:  # after it: inputs differ, but the router's own top-k is untouched
            lg = steered.logits[j][real]
            assert torch.equal(steered.selected[j][real], _own_topk(fam, rts[l], lg))
    assert not torch.equal(steered_logits, base_logits)
    assert torch.equal(after_logits, base_logits)
    assert all(not r._forward_hooks for r in rts.values())


def test_steer_rejects_non_moe_layers_and_bad_experts(model):
    moe = sorted(M.moe_blocks(model))
    with pytest.raises(ValueError, match="no MoE router"):
        with M.steer(model, {99: [0]}, 1.0):
            pass
    with pytest.raises(ValueError, match="outside 0..7"):
        with M.steer(model, {moe[0]: [8]}, 1.0):
            pass


def test_moe_layers_from_config_match_the_built_model():
    for fam in FAMILIES:
        model = M.build_tiny(fam)
        assert M.shape_of_config(model.config).moe_layers == tuple(M.moe_blocks(model))
    qwen = M.build_tiny("qwen3_moe", mlp_only_layers=[0, 2])
    assert tuple(M.moe_blocks(qwen)) == M.shape_of_config(qwen.config).moe_layers == (1, 3)
    ds = M.build_tiny("deepseek_v2", first_k_dense_replace=2)
    assert tuple(M.moe_blocks(ds)) == (2, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_is_tiny_and_round_trips(family, tmp_path):
    model = M.build_tiny(family, seed=2)
    shape = M.shape_of_config(model.config)
    assert shape.num_layers <= 4 and shape.num_experts <= 8 and model.config.hidden_size <= 64
    model.save_pretrained(tmp_path)
    cfg = ModelConfig(name="t", path=str(tmp_path), family=family)
    assert M.moe_shape(cfg) == shape
    loaded = M.load_model(cfg)
    ids, mask = padded_batch(seed=7)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits)


def test_dense_and_mismatched_models_are_refused(tmp_path):
    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"'llama'.*not a supported MoE family; supported families: olmoe, qwen3_moe"):
        M.load_model(ModelConfig(name="d", path=str(tmp_path / "dense"), family="olmoe"))
    M.build_tiny("mixtral").save_pretrained(tmp_path / "mix")
    with pytest.raises(ValueError, match="is a mixtral model .* config says family 'olmoe'"):
        M.load_model(ModelConfig(name="m", path=str(tmp_path / "mix"), family="olmoe"))
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        M.tiny_config("llama")
