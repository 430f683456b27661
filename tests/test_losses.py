"""The alignment loss: its zero, its gradient, what it reads (ci rows, real tokens) and λ = 0."""

import numpy as np
import pytest
import torch

from ramoe_ray import losses as Lo
from ramoe_ray import models as M
from ramoe_ray.routing_stats import sequence_importance

LAYERS = [0, 1, 2, 3]
BAND = [1, 2]
TASK = {1: [3, 5], 2: [0, 6, 7]}
E = 8


def batch(seed=0, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(LAYERS), b, t, E, generator=g) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False  # right padding
    mask[3, :2] = False  # left padding
    return logits, mask


def kwargs(logits, mask, ci, target):
    return dict(router_logits=logits, mask=mask, ci=ci, layers=LAYERS, band_layers=BAND, task_experts=TASK, target_pattern=target)


def test_zero_when_target_language_routes_like_english():
    logits, mask = batch()
    ci = torch.tensor([True, True, False, True])
    target = Lo.soft_importance(logits, mask)  # English side == target side
    loss = Lo.alignment_loss(**kwargs(logits.clone().requires_grad_(), mask, ci, target))
    assert abs(loss.item()) < 1e-6
    # the task-mean source: every ci example routes like the mean
    same = logits[:, :1].expand(-1, 4, -1, -1).contiguous()
    full = torch.ones_like(mask)
    mean = Lo.task_mean_pattern(Lo.soft_importance(same, full), torch.ones(4, dtype=torch.bool))
    assert abs(Lo.alignment_loss(**kwargs(same, full, ci, mean)).item()) < 1e-6
    # and positive otherwise
    other, _ = batch(seed=1)
    assert Lo.alignment_loss(**kwargs(other, mask, ci, target)).item() > 1e-3


def test_topk_target_is_not_zero_at_perfect_alignment():
    """Why T uses the full softmax (RULES['alignment_distribution']): the top-k renormalised
    importance of identical routing is still far from the full-softmax token mean."""
    logits, mask = batch()
    ci = torch.ones(4, dtype=torch.bool)
    probs = torch.softmax(logits, -1) * mask[None, :, :, None]
    selected = torch.topk(probs, 2, dim=-1).indices.sort(-1).values.masked_fill(~mask[None, :, :, None], -1)
    topk_importance, _ = sequence_importance(probs, selected, mask, k=2)
    assert Lo.alignment_loss(**kwargs(logits, mask, ci, torch.from_numpy(topk_importance))).item() > 0.01


def test_gradient_raises_under_used_task_experts():
    logits, mask = batch(seed=2)
    ci = torch.ones(4, dtype=torch.bool)
    english = logits.clone()
    for l, experts in TASK.items():  # English routes clearly more to the task experts
        english[LAYERS.index(l), :, :, experts] += 3.0
    target = Lo.soft_importance(english, mask)
    x = logits.clone().requires_grad_()
    loss = Lo.alignment_loss(**kwargs(x, mask, ci, target))
    loss.backward()
    with torch.no_grad():
        stepped = x - 1.0 * x.grad  # one SGD step on the logits
    before, after = Lo.soft_importance(logits, mask), Lo.soft_importance(stepped, mask)
    for l, experts in TASK.items():
        j = LAYERS.index(l)
        t, b, a = target[:, j, experts], before[:, j, experts], after[:, j, experts]
        assert (t.sum(-1) > b.sum(-1)).all()  # the task experts are under-used as a group ...
        assert (a.sum(-1) > b.sum(-1)).all()  # ... and one step raises their share in every example
        most = (t / b).argmax(-1, keepdim=True)  # the most under-used task expert of each example
        assert (a.gather(-1, most) > b.gather(-1, most)).all()
    def per_pair(z):
        return Lo._kl(**kwargs(z, mask, ci, target))

    assert (per_pair(stepped) < per_pair(logits)).all()
    assert Lo.alignment_loss(**kwargs(stepped, mask, ci, target)) < loss
    # layers outside the band get no gradient
    for j, l in enumerate(LAYERS):
        if l not in BAND:
            assert torch.count_nonzero(x.grad[j]) == 0


def test_ci_mask_excludes_other_examples_exactly():
    logits, mask = batch(seed=3)
    ci = torch.tensor([True, False, True, False])
    target = Lo.soft_importance(batch(seed=4)[0], mask)
    a = logits.clone().requires_grad_()
    loss_a = Lo.alignment_loss(**kwargs(a, mask, ci, target))
    loss_a.backward()
    changed = logits.clone()
    changed[:, ~ci] = torch.randn_like(changed[:, ~ci]) * 5
    target_changed = target.clone()
    target_changed[~ci] = torch.softmax(torch.randn(2, 4, E), -1)
    loss_b = Lo.alignment_loss(**kwargs(changed, mask, ci, target_changed))
    assert torch.equal(loss_a.detach(), loss_b)
    assert torch.count_nonzero(a.grad[:, ~ci]) == 0
    assert torch.count_nonzero(a.grad[:, ci]) > 0
    # the mean over ci examples: equals the loss of each ci example alone, averaged
    single = [Lo.alignment_loss(**kwargs(logits, mask, torch.arange(4) == i, target)) for i in (0, 2)]
    assert torch.allclose(loss_a.detach(), torch.stack(single).mean(), atol=1e-6)


def test_no_ci_example_gives_a_free_zero():
    logits, mask = batch()
    x = logits.clone().requires_grad_()
    loss = Lo.alignment_loss(**kwargs(x, mask, torch.zeros(4, dtype=torch.bool), Lo.soft_importance(logits, mask)))
    assert loss.item() == 0.0 and loss.grad_fn is None and not loss.requires_grad
    assert np.isnan(Lo.routing_kl(**kwargs(x, mask, torch.zeros(4, dtype=torch.bool), Lo.soft_importance(logits, mask))))


def test_padding_tokens_do_not_count():
    logits, mask = batch(seed=5)
    ci = torch.ones(4, dtype=torch.bool)
    target = Lo.soft_importance(batch(seed=6)[0], mask)
    x = logits.clone().requires_grad_()
    loss = Lo.alignment_loss(**kwargs(x, mask, ci, target))
    loss.backward()
    assert torch.count_nonzero(x.grad[:, ~mask]) == 0
    noisy = logits.clone()
    noisy[:, ~mask] = 100.0 * torch.randn_like(noisy[:, ~mask])
    assert torch.equal(Lo.alignment_loss(**kwargs(noisy, mask, ci, target)), loss.detach())
    # example 1 with its padding cut off gives the same per-example value
    one = torch.arange(4) == 1
    cut = Lo.alignment_loss(
        router_logits=logits[:, 1:2, :4], mask=mask[1:2, :4], ci=torch.tensor([True]), layers=LAYERS,
        band_layers=BAND, task_experts=TASK, target_pattern=target[1:2],
    )
    assert torch.allclose(Lo.alignment_loss(**kwargs(logits, mask, one, target)), cut, atol=1e-6)


def test_lambda_zero_is_the_sft_loss_and_skips_alignment():
    model = M.build_tiny("olmoe", seed=0)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    sft = model(input_ids=ids, labels=ids).loss

    def never():
        raise AssertionError("alignment computed at λ = 0")

    total = Lo.total_loss(lm_loss=sft, lam=0.0, alignment=never)
    assert total is sft
    lm = model(input_ids=ids, labels=ids).loss
    assert torch.equal(Lo.total_loss(lm_loss=lm, lam=0.5, alignment=lambda: torch.zeros(())), lm)  # no ci: + 0
    assert torch.equal(Lo.total_loss(lm_loss=lm, lam=0.5, alignment=lambda: torch.tensor(2.0)), lm + 1.0)
    with pytest.raises(ValueError):
        Lo.total_loss(lm_loss=lm, lam=-1.0, alignment=never)


def test_routing_kl_is_the_loss_without_graph():
    logits, mask = batch(seed=7)
    ci = torch.tensor([True, False, True, True])
    target = Lo.soft_importance(batch(seed=8)[0], mask)
    x = logits.clone().requires_grad_()
    value = Lo.routing_kl(**kwargs(x, mask, ci, target))
    assert isinstance(value, float)
    assert value == pytest.approx(Lo.alignment_loss(**kwargs(x, mask, ci, target)).item(), rel=1e-6)


def test_bad_inputs_are_refused():
    logits, mask = batch()
    ci = torch.ones(4, dtype=torch.bool)
    target = Lo.soft_importance(logits, mask)
    with pytest.raises(ValueError, match="band layer 9"):
        Lo.alignment_loss(**{**kwargs(logits, mask, ci, target), "band_layers": [9]})
    with pytest.raises(ValueError, match="task experts"):
        Lo.alignment_loss(**{**kwargs(logits, mask, ci, target), "task_experts": {1: [3], 2: [8]}})
    with pytest.raises(ValueError, match="probability"):
        Lo.alignment_loss(**kwargs(logits, mask, ci, target * 2))
    with pytest.raises(ValueError, match="target_pattern has shape"):
        Lo.alignment_loss(**kwargs(logits, mask, ci, target[:, :2]))
    empty = mask.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="no counted"):
        Lo.alignment_loss(**kwargs(logits, empty, ci, target))


def test_alignment_gradient_reaches_expert_lora_below_the_band_only():
    """Through a real model: routers are frozen, so the loss moves the band's routing through the
    hidden states, i.e. through the expert LoRA of the layers *below* the band's last layer."""
    from ramoe_ray.lora import apply_expert_lora

    model = M.build_tiny("olmoe", seed=0)
    apply_expert_lora(model, rank=2, alpha=4, seed=0)
    with torch.no_grad():
        for ex in M.experts_modules(model).values():
            for n, p in ex.named_parameters(recurse=False):
                if n.startswith("lora_B"):
                    p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(3, 256, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)
    with M.capture(model, detach=False) as rec:
        model(input_ids=ids, attention_mask=mask)
    routing = rec.routing(mask)
    band, task = [2], {2: [1, 4]}
    english = torch.softmax(torch.randn(3, len(routing.layers), 8, generator=g), -1)
    loss = Lo.alignment_loss(
        router_logits=routing.logits, mask=routing.mask, ci=torch.tensor([True, False, True]), layers=routing.layers,
        band_layers=band, task_experts=task, target_pattern=english,
    )
    loss.backward()
    for layer, ex in M.experts_modules(model).items():
        grads = [p.grad for n, p in ex.named_parameters(recurse=False) if n.startswith("lora_")]
        nonzero = any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
        assert nonzero == (layer < 2), layer
    assert all(r.weight.grad is None for r in M.routers(model).values())
