"""Libra in other people's trainers and harnesses, one module each; each module imports its own heavy dependency
(transformers' Trainer, trl, lmms-eval) only when it is imported itself, so importing this package costs nothing.

- ``libra_train.integrations.hf_trainer``: ``LibraTrainer`` / ``LibraTrainerMixin`` (label smoothing through
  the position map, the merge config beside peft adapters) and ``libra_predictions`` for ``compute_metrics``.
- ``libra_train.integrations.trl``: ``LibraSFTTrainer``, TRL's ``SFTTrainer`` with a Libra-aware fused LM head.
- ``libra_train.integrations.lmms_eval``: the ``libra`` model of lmms-eval (``python -m lmms_eval --model libra``).
"""
