"""An error on any rank ends every rank within seconds, printed once by the rank that had it, exit status non-zero.

On main a bad sample on rank 0 printed its error and then both ranks hung; on rank 1 nothing was printed and
both hung (until the 30-minute process-group timeout): ``main()`` printed on rank 0 only and then waited in the
final barrier while the other rank sat in a collective. Two processes through the DeepSpeed launcher, each run
bounded by a timeout (a hang fails the test instead of stalling CI). The ranks are started directly, as ``srun``
or a Kubernetes job would (no DeepSpeed launcher that kills the other ranks once one exits): ending them is the
job of train.py itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from libra_train.data import LengthGroupedSampler, build_dataset
from libra_train.models import build_tiny_llava
from tests.reliability.runs import BASE, TWO_PROCESSES, run

pytestmark = pytest.mark.slow
EXIT_WITHIN_S = (
    20  # from the error's line to the end of every process (a loaded 2-core machine; ~1 s when quiet)
)


def _first_image_of(rank: int, root: Path) -> Path:
    """The image of the first sample rank ``rank`` loads in step 1 (the sampler the run uses, rebuilt here)."""
    _, processor = build_tiny_llava()
    dataset = build_dataset(root / "train.json", processor, image_folder=root / "images", max_length=256)
    sampler = LengthGroupedSampler(dataset.modality_lengths, 2, world_size=2, rank=rank, seed=42)
    sampler.set_epoch(0)
    index = next(i for i in sampler if dataset.record(i).images)
    return root / "images" / dataset.record(index).images[0]


def _assert_ended_once(result, message: str, rank: int) -> None:
    assert result.rc is not None, f"hung: {result.describe()}"
    assert result.rc != 0, result.describe()
    assert result.count(message) == 1, result.describe()
    assert result.at(f"error (rank {rank} of 2)") is not None, result.describe()
    assert result.seconds - result.at(message) < EXIT_WITHIN_S, result.describe()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_bad_sample_on_one_rank_ends_both(tmp_path: Path, private_data, rank: int):
    root, data = private_data
    image = _first_image_of(rank, root)
    image.write_bytes(image.read_bytes()[:120])  # the header reads (the pre-check passes), the pixels do not
    result = run(tmp_path / "run", [*data, *BASE, *TWO_PROCESSES], ranks=2)
    _assert_ended_once(result, f"cannot decode image {image}", rank)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_an_exception_in_the_forward_of_one_rank_ends_both(tmp_path: Path, data):
    """Rank 1 fails inside its second forward while rank 0 waits in DeepSpeed's gradient reduction."""
    result = run(
        tmp_path / "run", [*data, *BASE, *TWO_PROCESSES], ranks=2, fault="forward raise rank=1 hit=2"
    )
    _assert_ended_once(result, "RuntimeError: fault injected at forward", rank=1)
