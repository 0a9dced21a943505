"""Libra in transformers' ``Trainer``: the three things the plain Trainer cannot know about a compressed sequence.

Plain ``Trainer.train`` needs nothing from here: the model's forward gets ``labels`` (and, because it accepts
``**kwargs``, ``num_items_in_batch``), so its loss is the loss through the position map, exact under gradient
accumulation. Full-model saves carry the merge config in ``config.json`` by themselves (``plugin/persist.py``).
What does need help:

- **Label smoothing.** With ``label_smoothing_factor > 0`` the Trainer pops ``labels`` before the forward and
  smooths ``logits`` against them itself; the logits are compressed (``[B, L']``), the labels are not (``[B, L]``),
  and without labels the forward falls back to the inference query rule. :class:`LibraTrainerMixin` keeps the
  labels visible to the plug-in (``libra_labels``) and replaces the smoother by :class:`LibraLabelSmoother`, which
  maps the labels through ``libra_position_map`` first. Libra models are causal LMs, so it always shifts
  (transformers shifts only for classes in its causal-LM mapping, which the VLM classes are not).
- **Metrics.** ``compute_metrics`` gets the predictions next to the dataset's full-length labels; pass
  ``preprocess_logits_for_metrics=libra_predictions`` to get the argmax predictions placed back at their original
  positions (``-100`` where a token was merged away), so a metric written for the plain model works unchanged.
- **peft adapters.** ``PeftModel.save_pretrained`` writes no ``config.json``; :class:`LibraTrainerMixin`'s
  ``save_model`` (which the Trainer's checkpoints call too) adds ``libra_config.json`` beside the adapter.

Example::

    trainer = LibraTrainer(model=apply_libra(model, cfg), args=args, train_dataset=ds, data_collator=collate,
                           compute_metrics=token_accuracy, preprocess_logits_for_metrics=libra_predictions)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother

from libra_train.plugin import libra_labels
from libra_train.plugin.loss import IGNORE_INDEX, shift_labels_through_map
from libra_train.plugin.persist import save_merge_config

__all__ = ["LibraLabelSmoother", "LibraTrainer", "LibraTrainerMixin", "libra_predictions"]

POSITION_MAP = "libra_position_map"


@dataclass
class LibraLabelSmoother(LabelSmoother):
    """transformers' ``LabelSmoother`` on a compressed sequence: the labels go through the position map.

    ``model_output`` must be a dict-like output (the Trainer's); without ``libra_position_map`` (a forward that
    compressed nothing) the labels are simply shifted.
    """

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        logits = model_output["logits"]
        position_map = model_output.get(POSITION_MAP)
        if position_map is None:  # the identity map: plain next-token targets
            position_map = torch.arange(logits.shape[1], device=labels.device).expand(labels.shape[0], -1)
        targets = shift_labels_through_map(labels, position_map)  # [B, L']: what each kept position predicts
        return super().__call__(
            {"logits": logits}, targets, shift_labels=False, num_items_in_batch=num_items_in_batch
        )


class LibraTrainerMixin:
    """Put before any ``transformers.Trainer`` subclass: ``class MyTrainer(LibraTrainerMixin, MyBaseTrainer)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None:
            self.label_smoother = LibraLabelSmoother(epsilon=self.label_smoother.epsilon)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kwargs = {"return_outputs": return_outputs, "num_items_in_batch": num_items_in_batch}
        if self.label_smoother is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, **kwargs)
        # The Trainer pops the labels before the forward when it smooths them itself: keep them visible to the
        # plug-in's training query rule (the token before each answer), as when the forward gets labels.
        with libra_labels(inputs["labels"]):
            return super().compute_loss(model, inputs, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus ``libra_config.json`` (the only merge-config record a peft adapter gets)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            save_merge_config(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)


class LibraTrainer(LibraTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`LibraTrainerMixin`."""


def _scores_and_map(logits) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits ``[B, L', V]`` and the position map ``[B, L']`` (or None) among the Trainer's output tensors.

    The Trainer passes the model output's values minus the loss, in order, with their names dropped: the logits
    come first, the map is the integer ``[B, L']`` tensor (the attention mask beside it is bool).
    """
    if isinstance(logits, torch.Tensor):
        return logits, None
    scores = logits[0]
    for value in logits[1:]:
        if isinstance(value, torch.Tensor) and value.dtype == torch.long and value.shape == scores.shape[:2]:
            return scores, value
    return scores, None


def libra_predictions(logits, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` for a Libra model: argmax predictions in the labels' layout.

    Position ``o`` of the result holds the prediction of the token at original position ``o`` (what it predicts
    for ``o + 1``, as a plain model's ``logits.argmax(-1)`` would), ``-100`` where that token was merged away or
    is padding. So ``compute_metrics`` can compare ``predictions[:, :-1]`` with ``label_ids[:, 1:]`` as for the
    uncompressed model; every supervised label keeps its predictor (answers are text, never compressed).

    Args:
        logits: what the Trainer passes: the logits ``[B, L', V]``, or a tuple of the output's tensors.
        labels: ``[B, L]`` the batch's labels.

    Returns:
        ``[B, L]`` long predictions.
    """
    scores, position_map = _scores_and_map(logits)
    preds = scores.argmax(-1)  # [B, L']
    if position_map is None:
        return preds
    bsz, length = labels.shape
    out = torch.full((bsz, length + 1), IGNORE_INDEX, dtype=preds.dtype, device=preds.device)
    where = torch.where(position_map >= 0, position_map, length)  # dropped slots land in the spare column
    return out.scatter_(1, where, preds)[:, :length]
