"""Short-answer matching: the training loop's rule, so that an export scores what its run logged.

``normalize_answer`` is ``libra_train.training.evaluate.normalize_answer`` itself (the first word of the
first line, lower-cased, without surrounding punctuation); ``is_correct`` applies it to a prediction and one
or several accepted references.
"""

from __future__ import annotations

from collections.abc import Iterable

from libra_train.training.evaluate import normalize_answer

__all__ = ["is_correct", "normalize_answer"]


def is_correct(prediction: str, answers: str | Iterable[str]) -> bool:
    """Whether ``prediction`` matches one of the reference ``answers`` under :func:`normalize_answer`.

    Args:
        prediction: the generated text (special tokens already removed).
        answers: one reference answer or several accepted ones.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(ref) for ref in refs)
