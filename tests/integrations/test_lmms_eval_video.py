"""Video requests through the ``libra`` lmms-eval model: lmms-eval's video tasks hand over video files (and some
tasks decoded frames) from ``doc_to_visual``; they become the query's videos, with ``<video>`` placeholders.

The model is a tiny saved Qwen2.5-VL checkpoint; on CPU its processor loads without the video part (torchvision),
so the hand-built stand-in of that part is attached (``tests/fixtures/family_checkpoints.py``; checked against the
real one in ``tests/data/test_real_video_processors.py``). Files are decoded by the real video part only.
"""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from libra_train.inference.generation import Query, generate
from tests.fixtures.family_checkpoints import save_family_checkpoint, with_video_standin, write_image

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
)
from lmms_eval.api.instance import Instance  # noqa: E402

from libra_train.integrations.lmms_eval import LibraLMM  # noqa: E402

TASK = "video_qa"
QUESTION = "what colour is the shape ?"
GEN_KWARGS = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": []}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-video")
    for i in range(4):
        write_image(root / f"f{i}.png", (16, 16), seed=i)
    write_image(root / "a.png", (16, 16), seed=10)
    return root


@pytest.fixture(scope="module")
def lm(folder, tmp_path_factory) -> LibraLMM:
    path = save_family_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_5_vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "loaded without its video part" (no torchvision here)
        model = LibraLMM(pretrained=str(path), method="libra", layers=[1, 3], ratio=0.5, batch_size=2)
    model.processor = with_video_standin(model.processor)
    frames = [Image.open(folder / f"f{i}.png").convert("RGB") for i in range(4)]
    model.task_dict = {
        TASK: {
            "test": [{"frames": frames}, {"image": Image.open(folder / "a.png").convert("RGB")}, {"file": ""}]
        }
    }
    return model


def _visual(doc) -> list:
    return [doc["frames"]] if "frames" in doc else [doc["image"]] if "image" in doc else [doc["file"]]


def _instance(kind: str, second, doc_id: int, context: str = QUESTION, doc_to_visual=_visual) -> Instance:
    args = (context, second, doc_to_visual, doc_id, TASK, "test")
    return Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_a_video_request_is_generated_as_its_query(lm):
    """Decoded frames from ``doc_to_visual`` are one video: the answer and the visual tokens are those of the
    query with that video, batched next to an image request; the video's 32 tokens were compressed."""
    got = lm.generate_until([_instance("generate_until", dict(GEN_KWARGS), i) for i in (0, 1)])
    frames = lm.task_dict[TASK]["test"][0]["frames"]
    (alone,) = generate(
        lm.model, lm.processor, [Query.single(QUESTION, video=frames)], template=lm.template, max_new_tokens=4
    )
    assert got[0] == alone.text
    tokens = lm.visual_tokens.rows[TASK][0]
    assert tokens == alone.visual_tokens and tokens[0] == 32 and tokens[-1] < 32


def test_video_files_become_videos_and_placeholders_are_counted(lm, tmp_path):
    clip = str(tmp_path / "clip.mp4")
    query = lm._query(_instance("generate_until", {}, 2, doc_to_visual=lambda doc: [clip]))
    assert query.videos == [[clip]] and query.images == []
    assert query.turns == [("user", f"<video>\n{QUESTION}")]
    written = lm._query(_instance("generate_until", {}, 2, f"<video>\n{QUESTION}", lambda doc: [clip]))
    assert written.turns == query.turns  # a prompt that writes its placeholder keeps it
    with pytest.raises(ValueError, match=r"video_qa.*doc 2.*2 <video> placeholders for 1 video"):
        lm._query(_instance("generate_until", {}, 2, f"<video><video>{QUESTION}", lambda doc: [clip]))
    with pytest.raises(ValueError, match=r"doc 2: a dict visual.*PIL images, video files"):
        lm._query(_instance("generate_until", {}, 2, doc_to_visual=lambda doc: [{"array": [0.0]}]))


def test_loglikelihood_of_a_video_request_batched_equals_alone(lm):
    requests = [_instance("loglikelihood", " red circle", i) for i in (0, 1)]
    together = lm.loglikelihood(requests)
    alone = [lm.loglikelihood([request])[0] for request in requests]
    assert [score for score, _ in together] == pytest.approx([score for score, _ in alone], abs=1e-4)
    without_video = lm.loglikelihood([_instance("loglikelihood", " red circle", 0, doc_to_visual=None)])
    assert without_video[0][0] != pytest.approx(together[0][0], abs=1e-3)  # the video was seen
