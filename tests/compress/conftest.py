"""Fixtures shared by the compression tests."""

import pytest

from libra_train.compress.similarity import use_precision


@pytest.fixture(params=["float64", "refine"])
def precision(request):
    """Run the test once per similarity precision, ``refine`` forced on CPU too (``auto`` would pick float64).

    The batched path then makes its target matching and Turbo's redundancy decisions both ways, and every
    batched-vs-single equality checks the refine path end to end.
    """
    with use_precision(request.param):
        yield request.param
