"""Glue to other people's harnesses and trainers, one module each, imported only when used.

``libra_train.integrations.lmms_eval``: the ``libra`` model of lmms-eval (``python -m lmms_eval --model libra``).
Nothing is imported here, so that ``import libra_train.integrations.X`` pulls in X's harness alone.
"""
