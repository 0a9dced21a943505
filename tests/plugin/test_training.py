"""Training with the plug-in: the loss through the position map, gradient checkpointing, gradient flow, LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers.loss.loss_utils import ForCausalLMLoss

import libra_train.plugin.state as state_module
from libra_train import LibraConfig, apply_libra, libra_causal_lm_loss, remove_libra
from libra_train.plugin import libra_runtime
from libra_train.plugin.loss import shift_labels_through_map
from tests.plugin.conftest import IGNORE, IMAGE_TOKEN, VOCAB, collate, llava_sample, tiny_llava

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def _batch() -> dict:
    return collate(
        [
            llava_sample(3, 7, answers=((2, 4), (5, 7)), seed=0),
            llava_sample(2, 5, image=False, answers=((1, 3),), seed=1),
            llava_sample(1, 4, answers=((2, 4),), seed=2),
        ]
    )


# -- the loss through the map ---------------------------------------------------------------------------------
def test_loss_with_identity_map_is_transformers_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (3, 9), generator=g)
    labels[:, :3] = IGNORE
    labels[1, 6:] = IGNORE
    identity = torch.arange(9).expand(3, 9)
    assert torch.equal(
        libra_causal_lm_loss(logits, labels, identity), ForCausalLMLoss(logits, labels, vocab_size=VOCAB)
    )
    items = torch.tensor(40)
    assert torch.equal(
        libra_causal_lm_loss(logits, labels, identity, num_items_in_batch=items),
        ForCausalLMLoss(logits, labels, vocab_size=VOCAB, num_items_in_batch=items),
    )


def test_loss_picks_targets_through_a_hand_made_map():
    labels = torch.tensor([[IGNORE, IGNORE, 11, 12, IGNORE, 13, 14, 15]])
    # kept: 0, a merged target from 2, a compensation token, 4, 5, 6, 7, then padding
    position_map = torch.tensor([[0, 2, -1, 4, 5, 6, 7, -1]])
    # position o predicts labels[o + 1]; -1 and the last position predict nothing
    expected_targets = torch.tensor([[IGNORE, 12, IGNORE, 13, 14, 15, IGNORE, IGNORE]])
    assert torch.equal(shift_labels_through_map(labels, position_map), expected_targets)

    logits = torch.randn(1, 8, VOCAB, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([1, 3, 4, 5])
    expected = F.cross_entropy(logits[0, rows], torch.tensor([12, 13, 14, 15]))
    torch.testing.assert_close(
        libra_causal_lm_loss(logits, labels, position_map), expected, rtol=0, atol=1e-6
    )
    summed = libra_causal_lm_loss(logits, labels, position_map, num_items_in_batch=10)
    torch.testing.assert_close(summed, expected * 4 / 10, rtol=0, atol=1e-6)


def test_model_loss_is_the_loss_through_its_map():
    model = apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5))
    batch = _batch()
    out = model(**batch)
    assert out.logits.shape[1] < batch["input_ids"].shape[1]
    # by hand: every supervised label must find the logit row of the token before it
    rows, targets = [], []
    for b in range(3):
        for i, o in enumerate(out.libra_position_map[b].tolist()):
            if o >= 0 and o + 1 < batch["labels"].shape[1] and batch["labels"][b, o + 1] != IGNORE:
                rows.append(out.logits[b, i])
                targets.append(int(batch["labels"][b, o + 1]))
    assert len(targets) == int((batch["labels"] != IGNORE).sum())  # no answer token lost its predictor
    expected = F.cross_entropy(torch.stack(rows), torch.tensor(targets))
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


# -- gradient checkpointing ---------------------------------------------------------------------------------
def _loss_and_grads(reentrant: bool | None, config: LibraConfig):
    """``reentrant=None``: no checkpointing."""
    model = apply_libra(tiny_llava(), config)
    model.train()
    if reentrant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in v5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    for layer in model.model.language_model.layers:
        layer.self_attn.register_forward_hook(lambda module, args, output: calls.append(module.layer_idx))
    out = model(**_batch(), use_cache=False)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, calls


@pytest.mark.parametrize(
    "config",
    [LibraConfig(layers=[1, 3], ratio=0.5, theta=0.9), LibraConfig(method="fastv", layers=[2], ratio=0.5)],
    ids=["libra", "fastv"],
)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_equals_plain_backward(config, reentrant):
    plain, plain_grads, plain_calls = _loss_and_grads(None, config)
    ckpt, ckpt_grads, ckpt_calls = _loss_and_grads(reentrant, config)
    assert plain_calls == list(range(6))
    assert sorted(ckpt_calls) == sorted(list(range(6)) * 2)  # every layer was recomputed in backward
    assert torch.equal(plain.libra_position_map, ckpt.libra_position_map)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("language_model.layers.5" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# -- gradient flow through the merge -----------------------------------------------------------------------
def _point_gradients(model, point: int, monkeypatch):
    """Gradients of the loss w.r.t. layer ``point``'s output and the compressed input of the next layer."""
    plans, seen = [], {}
    original = state_module.compress_sequence

    def capture(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(state_module, "compress_sequence", capture)
    layers = model.model.language_model.layers

    def keep_output(module, args, output):
        output.retain_grad()
        seen["out"] = output

    def keep_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        seen["in"] = hidden

    handles = [layers[point].register_forward_hook(keep_output)]
    handles.append(layers[point + 1].register_forward_pre_hook(keep_input, with_kwargs=True))  # after Libra's
    out = model(**_batch())
    out.loss.backward()
    for handle in handles:
        handle.remove()
    return plans[0], seen["out"].grad, seen["in"].grad, out


@pytest.mark.parametrize("merge", ["igm", "prune", "mean"])
def test_gradient_reaches_every_merged_token(merge, monkeypatch):
    """Layer l's output gets, per token, its merge weight times the gradient of the token it was merged into.

    The output of the compression layer feeds nothing but the compression, so this is the whole gradient there:
    a merged (or compensated) token gets a nonzero share, a pruned one exactly zero.
    """
    model = apply_libra(tiny_llava(), LibraConfig(layers=[1], ratio=0.75, merge=merge, theta=0.9))
    visual = _batch()["input_ids"] == IMAGE_TOKEN  # the first point sees the original (right-padded) layout
    plan, grad_out, grad_in, _ = _point_gradients(model, 1, monkeypatch)
    result = plan.result
    assert bool(result.has_compensation.any()) == (merge == "igm")
    for b in range(grad_out.shape[0]):
        vis_pos = visual[b].nonzero().squeeze(1).tolist()
        expected = torch.zeros_like(grad_out[b])
        for p in range(grad_out.shape[1]):  # text tokens are carried one to one
            if not visual[b, p] and plan.dest[b, p] >= 0:
                expected[p] = grad_in[b, plan.dest[b, p]]
        comp_slots = (plan.valid[b] & ~plan.kept[b]).nonzero().squeeze(1).tolist()
        for j, p in enumerate(vis_pos):
            group = int(result.assignment[b, j])
            if group < 0:
                continue  # dropped: no gradient
            if group < int(result.num_targets[b]):
                slot = plan.dest[b, vis_pos[int(result.target_index[b, group])]]
            else:
                (slot,) = comp_slots
            expected[p] = result.weights[b, j] * grad_in[b, slot]
        torch.testing.assert_close(grad_out[b], expected, rtol=1e-5, atol=1e-8)
        if not vis_pos:
            continue
        reached = grad_out[b, vis_pos].abs().sum(-1) > 0
        merged = result.assignment[b, : len(vis_pos)] >= 0
        assert torch.equal(reached, merged)
        assert int(merged.sum()) == (int(result.num_targets[b]) if merge == "prune" else len(vis_pos))


def test_projector_and_vision_tower_get_gradients():
    model = apply_libra(tiny_llava(), LibraConfig(layers=[0, 2], ratio=0.75))
    model(**_batch()).loss.backward()
    for module in (model.model.multi_modal_projector, model.model.vision_tower):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads)


# -- LoRA ------------------------------------------------------------------------------------------------------
def test_lora_after_apply_trains():
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    plain_keys = list(get_peft_model(tiny_llava(), lora).state_dict())
    model = get_peft_model(apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5)), lora)
    assert list(model.state_dict()) == plain_keys  # apply_libra changed no key, LoRA found the same targets
    assert not any("vision_tower" in k and "lora_" in k for k in plain_keys)
    assert libra_runtime(model.base_model.model) is not None

    batch = _batch()
    model.train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        out = model(**batch)
        assert out.logits.shape[1] < batch["input_ids"].shape[1]  # the peft wrapper goes through Libra
        out.loss.backward()
        if step == 1:  # lora_B starts at zero: from the second step on both A and B get gradients
            assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable.values())
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        losses.append(out.loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


def test_remove_libra_through_the_peft_wrapper():
    """``libra_runtime(peft_model)`` finds the runtime through peft; ``remove_libra(peft_model)`` must undo it all."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(apply_libra(tiny_llava(), LibraConfig(layers=[1, 3], ratio=0.5)), lora)
    batch = _batch()
    runtime = libra_runtime(model)
    assert runtime is not None
    runtime.config.enabled = False  # the plug-in off: the model's own output (test_equivalence)
    expected = model(**batch).logits
    runtime.config.enabled = True
    remove_libra(model)
    inner = model.get_base_model()
    assert libra_runtime(inner) is None and "forward" not in vars(inner)
    out = model(**batch)
    assert "libra_position_map" not in out
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
