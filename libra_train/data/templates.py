"""Chat templates: turns -> prompt text + the character spans that are trained on.

Rendering returns the text (with one image placeholder per image, not yet expanded) and the character spans of
the assistant answers; `encode.py` tokenises with offsets and labels exactly the tokens that start inside a
span, so the label boundaries do not depend on how a tokenizer merges characters across them.

* ``vicuna_v1``: LLaVA-1.5's ``conv_vicuna_v1`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
  ``system + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...``. As in LLaVA's
  `preprocess_multimodal`, a sample with one image has its placeholder moved to the start of its turn
  (``"<image>\\n" + text``, stripped). As in LLaVA's `preprocess_v1`, everything is masked except each answer
  and its ``</s>``: the span of turn k is ``" " + a_k + "</s>"`` (it starts at the space, so a SentencePiece
  token ``"▁word"`` is trained, and ``"ASSISTANT:"`` is not).
* ``chat_template``: the processor's (or tokenizer's) own Jinja template (Qwen2-VL, LLaVA-NeXT, llava-hf),
  given the turns as content-part lists (the single image moved first, as above). Assistant spans are found prefix by prefix: for each assistant turn k, the template renders turns[:k]
  with ``add_generation_prompt=True`` (ends where the answer starts) and turns[:k+1] (ends after the answer
  and its end-of-turn tokens); both must be string prefixes of the full rendering (true of the usual
  templates; templates that rewrite earlier turns, e.g. ones dropping past reasoning, are refused). The span
  between them is trained: the answer plus the template's end-of-turn text (``</s>``, ``<|im_end|>\\n``).

Tokenization at images (`splits_at_images`). LLaVA tokenizes a ``vicuna_v1`` prompt with
`tokenizer_image_token`: the text is cut at every ``<image>``, each piece is tokenized on its own (the first
with BOS, the later ones without) and the image goes in between. Every LLaVA-1.5 checkpoint was trained, and
is evaluated by LLaVA's scripts, on those ids, so ``vicuna_v1`` does the same, in training and in the
generation prompts (``libra_train.inference`` renders and encodes through `Encoder`), for every image of a
sample (multi-image records too). The rule is stated as "tokenize each piece between images separately", not as
"insert id 29871", so that it is exact for LLaVA's tokenizer and harmless for others:

* Llama-2 / Vicuna-v1.5 (SentencePiece, ``legacy: false``): a piece starts with SentencePiece's dummy prefix,
  so the text after each image begins with ``"▁"`` (id 29871) before ``"\\n"`` (``<0x0A>``), label -100.
  Whole-prompt tokenization (what the llava-hf processor does) adds no prefix after a special token and
  loses that token. (Checked token for token against an independent implementation of LLaVA's
  ``preprocess_v1`` on the real Llama-2 tokenizer: tests/data/test_llava_ids.py.)
* Tokenizers without a dummy prefix (byte-level BPE, the tiny word-level demo tokenizer): the pieces tokenize
  as they would inside the whole prompt, so the ids are the same either way.
* Known limit: a piece that *starts with a space* (only possible between two images of a multi-image record,
  ``"<image> <image>"``) gets the Metaspace pre-tokenizer's treatment of transformers 5 (no extra ``"▁"``),
  where LLaVA's slow SentencePiece tokenizer would give one more; LLaVA-1.5's data has one image per sample.

``chat_template`` stays exactly what the processor produces from its own template (one tokenizer call over the
whole prompt): that is the convention of the models that ship a template (llava-hf, LLaVA-NeXT, Qwen2-VL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from libra_train.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_ROLES = {"user": "USER", "assistant": "ASSISTANT"}
VICUNA_SEP, VICUNA_SEP2 = " ", "</s>"
TEMPLATES = ("vicuna_v1", "chat_template")
SPLIT_AT_IMAGES = {"vicuna_v1": True, "chat_template": False}  # see "Tokenization at images" above

# A Jinja template that renders exactly what `render_vicuna_v1` renders (used by the tiny test models, so the
# prefix-by-prefix `chat_template` path can be checked against the direct `vicuna_v1` path).
VICUNA_V1_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set chat = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- set chat = messages -%}"
    "{%- endif -%}{{- system + ' ' -}}"
    "{%- for m in chat -%}"
    "{{- 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for c in m['content'] -%}"
    "{{- '<image>\\n' if c['type'] == 'image' else c['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- ' ' if m['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation.

    Attributes:
        text: the prompt, with one `image_token` per image (not expanded).
        spans: ``[start, end)`` character spans of the trained text, in order.
    """

    text: str
    spans: list[tuple[int, int]]


def splits_at_images(template: str) -> bool:
    """Whether prompts of `template` are tokenized piece by piece between images (see the module doc)."""
    return SPLIT_AT_IMAGES.get(template, False)


def _move_single_image_to_front(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """LLaVA's `preprocess_multimodal`: the one ``<image>`` goes to the start of its turn, then a newline
    (``"<image>\\n" + rest.strip()``, stripped again: a turn that is only the image becomes ``"<image>"``)."""
    if sum(t.count(IMAGE_PLACEHOLDER) for _, t in turns) != 1:
        return turns
    return [
        (r, (IMAGE_PLACEHOLDER + "\n" + t.replace(IMAGE_PLACEHOLDER, "").strip()).strip())
        if IMAGE_PLACEHOLDER in t
        else (r, t)
        for r, t in turns
    ]


def render_vicuna_v1(
    turns: list[tuple[str, str]], image_token: str = IMAGE_PLACEHOLDER, add_generation_prompt: bool = False
) -> Rendered:
    """Render turns with LLaVA-1.5's vicuna_v1 conversation template.

    Args:
        turns: ``(role, text)`` pairs (optional leading system turn, then user/assistant alternating).
        image_token: the processor's image token, written in place of each ``<image>`` placeholder.
        add_generation_prompt: end with ``"ASSISTANT:"`` (for generation; the last turn must be a user turn).
    """
    turns = _move_single_image_to_front(turns)
    system = VICUNA_SYSTEM
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    text, spans = system + VICUNA_SEP, []
    for role, message in turns:
        message = message.replace(IMAGE_PLACEHOLDER, image_token)
        if role == "user":
            text += f"{VICUNA_ROLES['user']}: {message}{VICUNA_SEP}"
        else:
            text += f"{VICUNA_ROLES['assistant']}:"
            start = len(text)
            text += f" {message}{VICUNA_SEP2}"
            spans.append((start, len(text)))
    if add_generation_prompt:
        text += f"{VICUNA_ROLES['assistant']}:"
    return Rendered(text, spans)


PLACEHOLDER_PARTS = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
_PLACEHOLDERS = re.compile("(" + "|".join(map(re.escape, PLACEHOLDER_PARTS)) + ")")


def to_messages(turns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Turns -> HF chat messages whose content is a list of image / video / text parts (what processors'
    templates expect), in the order of the placeholders."""
    messages = []
    for role, text in turns:
        parts: list[dict[str, Any]] = []
        for piece in _PLACEHOLDERS.split(text):
            if piece in PLACEHOLDER_PARTS:
                parts.append({"type": PLACEHOLDER_PARTS[piece]})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": parts})
    return messages


def _apply(template_owner: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    text = template_owner.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text if isinstance(text, str) else text[0]


def render_chat_template(
    turns: list[tuple[str, str]], processor: Any, add_generation_prompt: bool = False
) -> Rendered:
    """Render turns with the processor's own chat template; find the assistant spans prefix by prefix.

    Args:
        turns: ``(role, text)`` pairs.
        processor: a processor (or tokenizer) with a ``chat_template``.
        add_generation_prompt: append the template's generation prompt (for generation).

    Raises:
        ValueError: no chat template, or a template whose renderings of prefixes are not prefixes.
    """
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", None)
    if owner is None or not getattr(owner, "chat_template", None):
        raise ValueError(
            "template='chat_template' needs a processor or tokenizer with a chat_template; use 'vicuna_v1'"
        )
    messages = to_messages(_move_single_image_to_front(turns))
    text = _apply(owner, messages, add_generation_prompt)
    spans = []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _apply(owner, messages[:k], True)
        upto = _apply(owner, messages[: k + 1], False)
        if not (text.startswith(before) and text.startswith(upto) and len(before) < len(upto)):
            raise ValueError(
                "the chat template does not render conversation prefixes as string prefixes, so assistant spans "
                f"cannot be located (turn {k}); use template='vicuna_v1' or a prefix-stable template"
            )
        spans.append((len(before), len(upto)))
    return Rendered(text, spans)


def render(
    template: str, turns: list[tuple[str, str]], processor: Any, add_generation_prompt: bool = False
) -> Rendered:
    """Render turns with the named template (``vicuna_v1`` or ``chat_template``)."""
    if template == "vicuna_v1":
        image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        return render_vicuna_v1(turns, image_token, add_generation_prompt)
    if template == "chat_template":
        return render_chat_template(turns, processor, add_generation_prompt)
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
