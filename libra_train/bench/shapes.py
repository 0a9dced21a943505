"""Benchmark model shapes and inputs: the LLM of a LLaVA-style model, fed ``inputs_embeds`` plus a visual span.

Only the language model is built (a ``LlamaForCausalLM`` from a config, random weights): the vision tower and
the projector run once per image whatever the method, so they are the same cost for every row of a
comparison and are left out. The LM head and its loss are in (a real training step has them); the FLOPs
model (`libra_train.flops`) counts the decoder layers only.

Sequence layout of one sample (LLaVA-1.5, vicuna_v1)::

    [system prompt + "USER:"] [576 image tokens] [question + " ASSISTANT:"] [answer]
     n_system                  n_visual           n_question                 n_answer

Training sees the whole sequence with the answer supervised; inference prefills everything but the answer
and then decodes ``decode_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from libra_train.flops import LLMShape

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BenchShape:
    """An LLM shape plus the token layout and batch of one benchmark.

    Attributes:
        name: the ``--model`` name.
        num_layers, hidden, intermediate, heads, kv_heads, vocab: the ``LlamaConfig``.
        n_system, n_visual, n_question, n_answer: tokens per sample of each part (see the module doc).
        batch: samples per training step and per generation batch.
        decode_tokens: tokens generated after the prefill.
        note: one line for the output header.
    """

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    n_system: int
    n_visual: int
    n_question: int
    n_answer: int
    batch: int
    decode_tokens: int
    note: str = ""

    @property
    def llm(self) -> LLMShape:
        """The dimensions that enter `libra_train.flops`."""
        return LLMShape(self.num_layers, self.hidden, self.intermediate)

    @property
    def prompt_length(self) -> int:
        """Tokens of an inference prompt (everything but the answer)."""
        return self.n_system + self.n_visual + self.n_question

    @property
    def train_length(self) -> int:
        """Tokens of a training sample (prompt + answer)."""
        return self.prompt_length + self.n_answer

    @property
    def n_text_train(self) -> int:
        return self.train_length - self.n_visual

    @property
    def n_text_prompt(self) -> int:
        return self.prompt_length - self.n_visual

    def with_overrides(self, *, layers: int | None = None, batch: int | None = None) -> BenchShape:
        """A copy with another depth or batch (``--layers``, ``--batch``)."""
        changes = {}
        if layers is not None:
            changes["num_layers"] = layers
        if batch is not None:
            changes["batch"] = batch
        return dataclasses.replace(self, **changes)


# LLaVA-1.5 text lengths: the vicuna_v1 system prompt + "USER:" is about 35 tokens; an instruction (question
# plus " ASSISTANT:") about 60 and a short answer about 30 (LLaVA-665K's median turn is of that order).
_LLAVA_TEXT = dict(n_system=35, n_visual=576, n_question=60, n_answer=30)

SHAPES: dict[str, BenchShape] = {
    "tiny": BenchShape(
        "tiny", 4, 64, 172, 4, 4, 128, n_system=5, n_visual=48, n_question=8, n_answer=4,
        batch=2, decode_tokens=4, note="CI smoke shape: seconds, numbers are overhead-dominated",
    ),
    "llava15-7b-cpu": BenchShape(
        "llava15-7b-cpu", 4, 4096, 11008, 32, 32, 32000, **_LLAVA_TEXT, batch=1, decode_tokens=16,
        note="LLaVA-1.5-7B (Vicuna-7B) layer shape with 4 of its 32 layers, for CPU",
    ),
    "llava15-7b": BenchShape(
        "llava15-7b", 32, 4096, 11008, 32, 32, 32000, **_LLAVA_TEXT, batch=2, decode_tokens=64,
        note="LLaVA-1.5-7B's LLM (Vicuna-7B), random weights",
    ),
    "llava15-13b": BenchShape(
        "llava15-13b", 40, 5120, 13824, 40, 40, 32000, **_LLAVA_TEXT, batch=1, decode_tokens=64,
        note="LLaVA-1.5-13B's LLM (Vicuna-13B), random weights",
    ),
}  # fmt: skip

# Shapes that only make sense on a GPU (tens of GB of weights + optimizer state).
GPU_ONLY = ("llava15-7b", "llava15-13b")


def build_llm(shape: BenchShape, dtype: torch.dtype, device: torch.device, attn: str) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` of ``shape``, built directly on ``device`` (seed 0).

    The token embedding is frozen: the benchmark feeds ``inputs_embeds`` (as LLaVA does), so it has no gradient
    and no optimizer state, as in LLaVA where it is only used for the text tokens' look-up.
    """
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


@dataclass
class BenchInputs:
    """One batch, for training (``embeds``/``visual``/``labels``) and inference (the ``prompt_*`` prefixes)."""

    embeds: torch.Tensor  # [B, L, d] the training sequence
    visual: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B, L] answer tokens supervised, IGNORE_INDEX elsewhere
    prompt_embeds: torch.Tensor  # [B, P, d] the sequence without its answer
    prompt_visual: torch.Tensor  # [B, P]


def make_inputs(shape: BenchShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> BenchInputs:
    """Random embeddings in the LLaVA layout (see the module doc); every sample has the same layout."""
    g = torch.Generator().manual_seed(seed)
    b, length, prompt = shape.batch, shape.train_length, shape.prompt_length
    embeds = torch.randn(b, length, shape.hidden, generator=g).to(device=device, dtype=dtype)
    visual = torch.zeros(b, length, dtype=torch.bool)
    visual[:, shape.n_system : shape.n_system + shape.n_visual] = True
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    labels[:, prompt:] = torch.randint(0, shape.vocab, (b, shape.n_answer), generator=g)
    visual, labels = visual.to(device), labels.to(device)
    return BenchInputs(
        embeds, visual, labels, embeds[:, :prompt].contiguous(), visual[:, :prompt].contiguous()
    )
