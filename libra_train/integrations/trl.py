"""Libra in TRL's ``SFTTrainer``: ``LibraSFTTrainer``, the same trainer with a fused LM head that knows the map.

Why plain ``SFTTrainer`` cannot train a Libra model correctly (trl 1.16): it patches ``model.forward`` with a
*fused LM head* (``trl.trainer.utils.add_fused_lm_head``) that pops ``labels``, calls the inner multimodal model
(``self.base_model(...)``, e.g. ``LlavaModel``) and pairs ``last_hidden_state[:, :-1]`` with ``labels[:, 1:]``.
With Libra the hidden states are compressed (``[B, L']``) while the labels are not (``[B, L]``), and the inner
model never sees the labels, so its importance would follow the inference query rule.

``LibraSFTTrainer`` replaces that head by :class:`LibraFusedLMHead`, which keeps TRL's contract
(``model(..., labels=..., fused_lm_head=True)`` returns a ``trl.trainer.utils.FusedCausalLMOutput`` whose
per-token fields are zero where there is no target) on the compressed sequence:

1. the inner model runs under ``libra_labels(labels)`` (training query rule: the token before each answer);
2. the next-token targets come through the output's ``libra_position_map`` (``shift_labels_through_map``), so
   ``log_probs``, ``entropy``, ``is_top1`` and ``label_mask`` are ``[B, L']`` over the compressed sequence;
3. TRL's own kernel (``trl.kernels.ChunkedLogProbFunction``) scores only the positions that have a target, as
   TRL's compact path does: the ``[N, V]`` logits are never materialised.

``SFTTrainer.compute_loss`` then computes exactly what it does for a plain model: the loss
``-sum(log_probs) / num_items_in_batch`` (equal to the model's own ``labels=`` loss through the map) and the
logged ``entropy`` / ``mean_token_accuracy``, which are sums and so do not care about the length.

Order: apply Libra before building the trainer, or pass ``libra_config=`` and the trainer applies it (to the
model, before TRL wraps it with ``peft_config``). A model without Libra raises at construction; a head replaced
after construction (e.g. ``apply_libra`` on a model already given to a trainer) raises at the first step.

Not supported, each refused with a clear error: ``compute_loss_func`` and ``label_smoothing_factor`` (TRL feeds
both the logits of a second forward without labels), ``compute_metrics`` (the same logits; TRL logs entropy and
token accuracy itself), pre-shifted ``shift_labels`` (context / sequence parallelism), and models whose logits
are scaled or soft-capped (``final_logit_softcapping``, ``logit_scale``: none of the supported VLM families).
``loss_type="dft"`` works (TRL computes it from ``log_probs``). For custom losses and metrics use
``libra_train.integrations.hf_trainer.LibraTrainer``.

Example::

    from libra_train.integrations.trl import LibraSFTTrainer
    trainer = LibraSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=processor,
                              libra_config=LibraConfig(layers=[7, 15, 23], ratio=0.5))
    trainer.train()   # layers after each point see the compressed sequence; libra_config.json in every save
"""

from __future__ import annotations

import functools

import torch
from peft import PeftModel
from torch import nn
from trl import SFTTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from libra_train.inference.generation import find_runtime
from libra_train.integrations.hf_trainer import LibraTrainerMixin
from libra_train.plugin import LibraConfig, apply_libra, libra_labels
from libra_train.plugin.loss import IGNORE_INDEX, shift_labels_through_map

__all__ = ["LibraFusedLMHead", "LibraSFTTrainer"]

FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks add_fused_lm_head for
VOCAB_CHUNK = 32768  # vocabulary tile of TRL's fused head
_LOGIT_SCALING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (where TRL puts its fused head), else ``model``."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class LibraFusedLMHead:
    """``model.forward`` of a Libra model trained by ``LibraSFTTrainer``: TRL's fused call on the compressed
    sequence (see the module doc). Other calls (``fused_lm_head=False``: generation, evaluation logits) go to
    the forward it replaced, which is TRL's pass-through to the model's own (Libra) forward.

    A callable object bound to its model through ``trl_forward.__self__`` (like the plug-in's own entries), so
    that ``copy.deepcopy`` rebinds it to the copy.
    """

    def __init__(self, trl_forward) -> None:
        self.trl_forward = trl_forward
        functools.update_wrapper(self, trl_forward, updated=())  # generate validates kwargs on this signature

    @property
    def model(self) -> nn.Module:
        return self.trl_forward.__self__

    def __call__(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            return self.trl_forward(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        if shift_labels is not None:
            raise ValueError(
                "LibraSFTTrainer: pre-shifted `shift_labels` (context / sequence parallelism) cannot be mapped "
                "through Libra's compression; train without context or sequence parallelism"
            )
        if labels is None:
            raise ValueError(
                "LibraSFTTrainer: the fused LM head got no labels. Was apply_libra called after the trainer was "
                "built? Apply Libra first, or pass libra_config= to LibraSFTTrainer"
            )
        model = self.model
        kwargs["use_cache"] = False
        with libra_labels(labels):
            out = model.base_model(*args, **kwargs)
        hidden = out.last_hidden_state  # [B, L', D]
        position_map = out.get("libra_position_map")
        if position_map is None:  # nothing compressed (e.g. a text-only batch): the identity map
            position_map = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        targets = shift_labels_through_map(labels.to(hidden.device), position_map)  # [B, L']
        mask = targets != IGNORE_INDEX
        lm_head = model.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        # TRL's own kernel on the positions that have a target (its compact path): the logits are never
        # materialised, the statistics accumulate in float32; under ZeRO-3 the head is gathered for it.
        with maybe_gather_lm_head_ctx(weight, bias):
            log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
                hidden[mask], weight, bias, targets[mask], 1.0, VOCAB_CHUNK, None, 1.0, FUSED_OUTPUTS
            )

        def spread(values: torch.Tensor) -> torch.Tensor:  # [N] -> [B, L'], zero where there is no target
            # masked_scatter keeps the output connected to the graph even when no label is valid
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = spread(log_probs)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        result = FusedCausalLMOutput(
            loss=-log_probs.sum() / denominator,
            log_probs=log_probs,
            entropy=spread(entropy),
            is_top1=spread(is_top1),
            label_mask=mask,
        )
        result["libra_position_map"] = position_map
        return result


def _check_supported(model: nn.Module, args, kwargs: dict) -> None:
    """Refuse, before anything is patched, what the fused head cannot do on a compressed sequence."""
    refused = {
        "compute_loss_func": kwargs.get("compute_loss_func") is not None,
        "label_smoothing_factor": bool(getattr(args, "label_smoothing_factor", 0)),
        "compute_metrics": kwargs.get("compute_metrics") is not None,
    }
    for name, given in refused.items():
        if given:
            raise ValueError(
                f"LibraSFTTrainer does not support {name}: TRL computes it from the logits of a second forward "
                "without labels, which Libra compresses by the inference rule. It logs entropy and "
                "mean_token_accuracy itself; for custom losses or metrics use "
                "libra_train.integrations.hf_trainer.LibraTrainer (preprocess_logits_for_metrics=libra_predictions)"
            )
    text_config = model.config.get_text_config()
    scaled = [name for name in _LOGIT_SCALING if getattr(text_config, name, None) not in (None, 1.0)]
    if scaled:
        raise ValueError(
            f"LibraSFTTrainer: {type(model).__name__} scales its logits ({scaled}); not supported"
        )


class LibraSFTTrainer(LibraTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` for a model with Libra applied (see the module doc).

    Args:
        libra_config: apply this merge config to ``model`` first (before TRL wraps it with ``peft_config``);
            None when Libra is already applied.
        *args, **kwargs: as for ``trl.SFTTrainer``.
    """

    def __init__(self, model, *args, libra_config: LibraConfig | None = None, **kwargs) -> None:
        if isinstance(model, str):
            raise TypeError(
                "LibraSFTTrainer needs a model object (load it, then pass it with libra_config=...), not a name"
            )
        if libra_config is not None:
            apply_libra(_unwrapped(model), libra_config)
        if find_runtime(model) is None:
            raise ValueError(
                "LibraSFTTrainer: the model has no Libra applied; call apply_libra(model, cfg) before building "
                "the trainer, or pass libra_config=LibraConfig(...)"
            )
        _check_supported(model, kwargs.get("args", args[0] if args else None), kwargs)
        super().__init__(model, *args, **kwargs)
        head_owner = _unwrapped(self.model)
        self._libra_head = LibraFusedLMHead(head_owner.forward)  # what add_fused_lm_head installed
        head_owner.forward = self._libra_head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        owner = _unwrapped(self.model)
        if vars(owner).get("forward") is not self._libra_head:
            raise ValueError(
                "LibraSFTTrainer: the model's forward was replaced after the trainer was built (apply_libra or "
                "another patch after construction?); apply Libra first, then build the trainer"
            )
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
