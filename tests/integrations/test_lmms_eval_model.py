"""The ``libra`` lmms-eval model in process: registration, arguments, generate_until, loglikelihood, loading.

Requests are built as lmms-eval builds them (``Instance`` with ``(context, gen_kwargs | continuation,
doc_to_visual, doc_id, task, split)`` and ``task_dict`` holding the docs), over a task written by
``libra_train.integrations.lmms_eval_tasks`` from the demo's held-out questions.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image

import libra_train.export as export
import libra_train.plugin as plugin
from libra_train import LibraConfig, remove_libra
from libra_train.data.records import Record
from libra_train.infer import Query, build_inputs, evaluate, generate, load, load_qa
from libra_train.inference.generation import ImageEncoder, find_runtime
from libra_train.integrations.lmms_eval_tasks import libra_qa
from libra_train.training.evaluate import MAX_NEW_TOKENS
from tests.export.export_helpers import TRAIN_CONFIG

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: bash scripts/install_lmms_eval.sh --light"
)
from lmms_eval.api.instance import Instance  # noqa: E402

from libra_train.integrations.lmms_eval import LibraLMM, load_for_eval, score_continuations  # noqa: E402

TASK = "libra_qa_val"
GEN = yaml.load(libra_qa.TEMPLATE.read_text(), Loader=yaml.BaseLoader)["generation_kwargs"]  # strings
GEN_KWARGS = {"max_new_tokens": int(GEN["max_new_tokens"]), "temperature": 0, "do_sample": False, "until": []}


@pytest.fixture(scope="module")
def docs(demo, tmp_path_factory):
    """The demo's held-out questions as the local task's rows (what lmms-eval's ``task_dict`` holds)."""
    task = libra_qa.write_task(
        demo / "val.json", tmp_path_factory.mktemp("task"), image_folder=demo / "images"
    )
    return [json.loads(line) for line in task.with_suffix(".jsonl").read_text().splitlines()]


def _instance(kind: str, context: str, second, doc_id: int, task: str = TASK) -> Instance:
    arguments = (context, second, libra_qa.doc_to_visual, doc_id, task, "test")
    return Instance(kind, arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def _fields(cfg) -> dict:
    """A merge config without ``unit``, which ``apply_libra`` resolves to the model family's default."""
    data = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return {key: value for key, value in data.items() if key != "unit"}


def _model(docs, **kwargs) -> LibraLMM:
    lm = LibraLMM(**kwargs)
    lm.task_dict = {TASK: {"test": docs}}
    return lm


def _generate(lm: LibraLMM, docs, gen_kwargs=None, context=libra_qa.doc_to_text) -> list[str]:
    gen_kwargs = gen_kwargs or GEN_KWARGS
    return lm.generate_until(
        [
            _instance("generate_until", context(doc), copy.deepcopy(gen_kwargs), i)
            for i, doc in enumerate(docs)
        ]
    )


def test_registered_with_lmms_eval_through_the_entry_point():
    from lmms_eval.models import get_model, list_available_models

    assert "libra" in list_available_models()
    assert get_model("libra") is LibraLMM


def test_generate_until_answers_as_evaluate_does(exported, demo, docs, tmp_path):
    """Same predictions as ``libra_train.infer.evaluate`` (scripts/evaluate.py), with the compression trained,
    and the visual tokens per stage logged to ``stats_path``."""
    stats = tmp_path / "stats.json"
    lm = _model(docs, pretrained=str(exported), batch_size=3, stats_path=str(stats))
    got = _generate(lm, docs)
    model, processor = load(exported)
    want = evaluate(
        model, processor, load_qa(demo / "val.json"), template="vicuna_v1", image_folder=demo / "images",
        batch_size=3, progress=False,
    )  # fmt: skip
    assert got == want.predictions
    written = json.loads(stats.read_text())
    assert written["merge_config"] == find_runtime(model).config.to_dict()  # what ran, unit resolved
    assert _fields(written["merge_config"]) == _fields(TRAIN_CONFIG) and written["template"] == "vicuna_v1"
    assert written["tasks"][TASK] == {"requests": len(docs), "visual_tokens": want.visual_tokens}
    assert want.visual_tokens[0] == 36 and want.visual_tokens[1] < 36
    assert written["llm"] == {"num_layers": 4, "hidden": 128, "intermediate": 256}
    # MME / GQA prompts carry no <image> placeholder: one is prepended, so the prompt is the same.
    plain = _generate(lm, docs[:3], context=lambda doc: doc["question"].replace("<image>\n", ""))
    assert plain == got[:3]


def test_model_args_reach_the_merge_config(exported, docs):
    from lmms_eval.models import get_model

    cls = get_model("libra")
    lm = cls.create_from_arg_string(f"pretrained={exported},layers=[0,2],ratio=0.8", {"batch_size": 2})
    assert _fields(lm.merge_config) == _fields(LibraConfig(layers=[0, 2], ratio=0.8)) and lm.batch_size == 2
    off = cls.create_from_arg_string(f"pretrained={exported},libra=off", {"device": "cpu"})
    assert off.merge_config is None
    lm.task_dict = off.task_dict = {TASK: {"test": docs}}
    full = generate(*load(exported, libra="off"), [_query(docs[0])], template="vicuna_v1", max_new_tokens=8)
    assert _generate(off, docs[:1]) == [full[0].text]
    assert off.visual_tokens.means(TASK) == [36]
    with pytest.raises(ValueError, match="contradict"):
        cls.create_from_arg_string(f"pretrained={exported},libra=off,ratio=0.8")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['ratoi'\]"):
        cls.create_from_arg_string(f"pretrained={exported},ratoi=0.8")
    with pytest.raises(ValueError, match="batch_size auto"):
        cls.create_from_arg_string(f"pretrained={exported}", {"batch_size": "auto"})
    with pytest.raises(FileNotFoundError, match="no such directory"):
        cls.create_from_arg_string("pretrained=/no/such/export")


def test_until_cuts_the_text_and_beam_search_is_refused(exported, docs):
    lm = _model(docs, pretrained=str(exported), batch_size=2)
    whole = _generate(lm, docs[:2])
    word = whole[0].split()[1]
    cut = _generate(lm, docs[:2], {**GEN_KWARGS, "until": [f" {word}"]})
    assert cut == [text.split(f" {word}")[0] for text in whole] and cut[0] != whole[0]
    with pytest.raises(ValueError, match="beam search"):
        _generate(lm, docs[:1], {**GEN_KWARGS, "num_beams": 3})
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])


def _query(doc) -> Query:
    return Query([("user", doc["question"])], libra_qa.doc_to_visual(doc), doc["id"])


def _forced_logprob(model, processor, query: Query, tokens: list[int]) -> tuple[float, bool]:
    """Log-probability of ``tokens`` after the prompt of ``query`` through ``generate``'s own path: prefill of
    the context alone (compressing), then the forced tokens decoded one by one against the KV cache."""
    inputs = build_inputs(processor, [query], "vicuna_v1")
    out = model.generate(
        **inputs,
        max_new_tokens=len(tokens),
        min_new_tokens=len(tokens),
        do_sample=False,
        prefix_allowed_tokens_fn=lambda _, ids: [tokens[len(ids) - inputs["input_ids"].shape[1]]],
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    logits = torch.cat(out.logits)  # [T, V] raw logits of each decoding step
    logprob = torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), tokens].sum()
    return float(logprob), bool((logits.argmax(-1) == torch.tensor(tokens)).all())


def _continuations(model, processor, docs) -> list[tuple[Query, str]]:
    """Each question with its gold answer and with the model's own greedy answer (two multi-token ones)."""
    queries = [_query(doc) for doc in docs]
    own = generate(model, processor, queries, template="vicuna_v1", max_new_tokens=3)
    return [(q, doc["answer"]) for q, doc in zip(queries, docs)] + [(q, o.text) for q, o in zip(queries, own)]


def _sample(encoder, query: Query, continuation: str) -> dict[str, torch.Tensor]:
    return encoder.encode(Record(query.id, query.images, [*query.turns, ("assistant", continuation)]))


@pytest.mark.parametrize("libra", [None, "off"])
def test_loglikelihood_is_the_cached_continuation_after_a_context_only_decision(
    exported, docs, libra, monkeypatch
):
    """One forward over context + continuation scores exactly what decoding the continuation after a prefill of
    the context alone scores (generate's own path): the compression is decided by the context, whose last
    token is the query, never by the continuation. Without the pinned query the same forward differs."""
    lm = _model(docs, pretrained=str(exported), batch_size=4, libra=libra)
    cases = _continuations(lm.model, lm.processor, docs[:4])
    requests = [_instance("loglikelihood", q.turns[0][1], f" {c}", i % 4) for i, (q, c) in enumerate(cases)]
    got = lm.loglikelihood(requests)
    encoder = ImageEncoder(lm.processor, "vicuna_v1", max_length=1 << 30)
    for (query, cont), (logprob, greedy) in zip(cases, got):
        sample = _sample(encoder, query, cont)
        scored = sample["labels"] != -100  # the answer and its </s>, as the training loss sees them
        start = int(scored.nonzero()[0])
        prompt = build_inputs(lm.processor, [query], "vicuna_v1")["input_ids"][0]
        assert torch.equal(sample["input_ids"][:start], prompt)  # the context is generate's prompt
        want = _forced_logprob(lm.model, lm.processor, query, sample["labels"][scored].tolist())
        assert logprob == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    monkeypatch.setattr(plugin, "visual_span", lambda **_: contextlib.nullcontext())  # the query unpinned
    unpinned = lm.loglikelihood(requests)
    if libra is None:
        assert lm.visual_tokens.means(TASK)[1] < 36
        assert max(abs(a - b) for (a, _), (b, _) in zip(got, unpinned)) > 1e-3
    else:
        assert lm.visual_tokens.means(TASK) == [36]
        assert [a for a, _ in got] == pytest.approx([b for b, _ in unpinned], abs=1e-5)


def test_loglikelihood_batched_equals_per_sample(exported, docs):
    lm = _model(docs, pretrained=str(exported), batch_size=8)
    cases = _continuations(lm.model, lm.processor, docs[:4])
    requests = [_instance("loglikelihood", q.turns[0][1], f" {c}", i % 4) for i, (q, c) in enumerate(cases)]
    batched = lm.loglikelihood(requests)
    lm.batch_size_per_gpu = 1
    single = lm.loglikelihood(requests)
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in single], abs=1e-4)
    assert all(s < 0 for s, _ in batched)


def test_greedy_flag_and_the_training_loss(trained, tiny, docs):
    """``score_continuations``: the summed log-prob is the training loss of the same sample times its supervised
    tokens (the training query, the token before the answer, is the last context token); *greedy* holds for
    the model's own greedy tokens and not once one of them is changed."""
    processor = tiny[1]
    pad = processor.tokenizer.pad_token_id
    encoder = ImageEncoder(processor, "vicuna_v1", max_length=1 << 30)
    query = _query(docs[0])
    sample = _sample(encoder, query, "red")
    [(logprob, _)], counts = score_continuations(trained, [sample], pad)
    with torch.no_grad():
        out = trained(**{k: v[None] if k != "pixel_values" else v for k, v in sample.items()})
    assert logprob == pytest.approx(-float(out.loss) * int((sample["labels"] != -100).sum()), abs=1e-4)
    assert counts[0][0] == 36 and counts[0][1] < 36
    own = generate(trained, processor, [query], template="vicuna_v1", max_new_tokens=4)[0].token_ids
    prompt = build_inputs(processor, [query], "vicuna_v1", None)
    ids = torch.cat([prompt["input_ids"][0], torch.tensor(own)])
    greedy = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.cat([torch.full_like(prompt["input_ids"][0], -100), torch.tensor(own)]),
        "pixel_values": prompt["pixel_values"],
    }
    changed = {**greedy, "labels": greedy["labels"].clone(), "input_ids": ids.clone()}
    changed["labels"][-1] = changed["input_ids"][-1] = own[-1] + 1
    (_, yes), (_, no) = score_continuations(trained, [greedy, changed], pad)[0]
    assert yes and not no


def test_samples_without_continuation_are_refused(exported, docs):
    lm = _model(docs, pretrained=str(exported))
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood([_instance("loglikelihood", docs[0]["question"], " ", 0)])


def test_checkpoint_directories_load_like_their_export(checkpoint, exported, lora, docs):
    """A training checkpoint (transformers directory with the merge config and recipe) answers as its export;
    a LoRA checkpoint (adapter beside the base weights) as the training-time LoRA model."""
    from_ckpt = _generate(_model(docs, pretrained=str(checkpoint), batch_size=4), docs)
    assert from_ckpt == _generate(_model(docs, pretrained=str(exported), batch_size=4), docs)
    peft_model, folder = lora
    lm = _model(docs, pretrained=str(folder), batch_size=4)
    want = generate(
        peft_model, lm.processor, [_query(d) for d in docs], template="vicuna_v1", max_new_tokens=8
    )
    assert _generate(lm, docs) == [w.text for w in want]


def test_deepspeed_checkpoint_is_merged_compressed_and_templated(lora, tiny, monkeypatch, tmp_path):
    """The DeepSpeed branch: ``load_checkpoint``'s peft model merged, its merge config applied, the recipe's
    template used (the loading itself is ``libra_train.export``'s, tested with real checkpoints there)."""
    (tmp_path / "latest").write_text("global_step7")
    (tmp_path / "recipe.yaml").write_text("recipe_name: demo\ndata:\n  template: chat_template\n")
    base = copy.deepcopy(lora[0])
    remove_libra(base.get_base_model())  # load_checkpoint returns the model without Libra
    monkeypatch.setattr(export, "load_checkpoint", lambda path, dtype=None: (base, tiny[1], TRAIN_CONFIG))
    model, _, template = load_for_eval(tmp_path, libra={"ratio": 0.8})
    assert not isinstance(model, PeftModel) and template == "chat_template"
    assert _fields(find_runtime(model).config) == _fields(LibraConfig(layers=[1], ratio=0.8))


def test_pil_images_are_prepared_like_files(tiny, tmp_path):
    """lmms-eval hands over decoded images: a non-square RGBA image in memory gives the inputs its file gives
    (RGB, padded to a square for vicuna_v1)."""
    image = Image.new("RGBA", (40, 24), (200, 30, 30, 255))
    image.paste((10, 200, 10, 255), (5, 5, 20, 20))
    image.save(tmp_path / "wide.png")
    question = "<image>\nwhat colour is the shape at row 1 column 1 ?"
    from_file = build_inputs(tiny[1], [Query([("user", question)], ["wide.png"])], "vicuna_v1", tmp_path)
    decoded = Image.open(tmp_path / "wide.png")
    in_memory = build_inputs(tiny[1], [Query([("user", question)], [decoded])], "vicuna_v1")
    assert torch.equal(from_file["pixel_values"], in_memory["pixel_values"])
    assert torch.equal(from_file["input_ids"], in_memory["input_ids"])


def test_task_yaml_matches_evaluate_and_refuses_what_it_cannot_hold(demo, tmp_path):
    assert GEN_KWARGS["max_new_tokens"] == MAX_NEW_TOKENS  # evaluate.py's default
    multi = tmp_path / "multi.json"
    record = {"id": "m", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    record["conversations"].insert(0, {"from": "system", "value": "be brief"})
    multi.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match="single-turn"):
        libra_qa.write_task(multi, tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="image file"):
        libra_qa.write_task(demo / "val.json", tmp_path / "t")  # images are in demo/images
    assert libra_qa.main(["--data", str(multi), "--out", str(tmp_path / "t")]) == 2
