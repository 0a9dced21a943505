"""Inference on exports: load with the trained merge config, generate in batches, evaluate short answers.

``libra_train.infer`` is the public entry point (``from libra_train.infer import load``); the modules here:
``loading`` (export directory -> model + processor with Libra), ``generation`` (batched, chat-templated
``generate``), ``evaluation`` (QA files -> accuracy, latency, peak memory) and ``answers`` (the answer
matching that training's evaluation uses too).
"""

from libra_train.inference.answers import is_correct, normalize_answer
from libra_train.inference.evaluation import EvalResult, QAExample, evaluate, format_table, load_qa
from libra_train.inference.generation import Generation, Query, build_inputs, generate
from libra_train.inference.loading import load, prompt_template, read_merge_config, resolve_libra

__all__ = [
    "EvalResult",
    "Generation",
    "QAExample",
    "Query",
    "build_inputs",
    "evaluate",
    "format_table",
    "generate",
    "is_correct",
    "load",
    "load_qa",
    "normalize_answer",
    "prompt_template",
    "read_merge_config",
    "resolve_libra",
]
