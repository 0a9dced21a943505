"""Run an exported model: ``load`` it with the compression it was trained with, ``generate``, ``evaluate``.

    from libra_train.infer import Query, generate, load, prompt_template

    model, processor = load("exports/demo")                    # Libra-Merging as trained
    model, processor = load("exports/demo", libra={"ratio": 0.8})  # another ratio
    model, processor = load("exports/demo", libra="off")       # full tokens, for comparison
    answers = generate(model, processor, [Query.single("what colour ...?", "cell.png")],
                       template=prompt_template("exports/demo"))

The implementation lives in ``libra_train.inference``; answer matching (``normalize_answer``, ``is_correct``)
is the one the training loop's evaluation uses.
"""

from libra_train.inference import *  # noqa: F403 (re-exported: the names of libra_train.inference.__all__)
from libra_train.inference import __all__  # noqa: F401
