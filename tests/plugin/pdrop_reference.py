"""PyramidDrop, re-implemented independently on a transformers-5 ``LlamaForCausalLM`` with a manual decoder loop.

The reference the plug-in's ``method="pdrop"`` preset is checked against. It follows the public implementation,
Cooperx521/PyramidDrop at commit 6444f30 (``llava/model/modeling_llama_pdrop.py``, ``LlamaModel.pdrop_forward``
and ``LlamaModel.pdrop_rank_drop``; line numbers below are that file's unless another file is named). It was
checked against that code run beside it (transformers 4.37.2) on the same tiny random weights (logits within
2.1e-7, kept indices, labels and losses equal; see ``docs/design-notes/issue-14.md``), and the failure modes
named below were seen there.

What the public code does (facts, in our words):

1. **Where.** After decoder layer ``i`` has run, if ``i + 1`` is in ``layer_list`` the visual tokens are ranked
   and dropped before layer ``i + 1`` (1222-1238). With ``layer_list=[8, 16, 24]`` layers 0-7 see all ``N0``
   visual tokens, 8-15 the first stage's, and so on: PyramidDrop layer ``L`` is Libra compression point ``L - 1``.
   The stage index is ``layer_list.index(i + 1)`` (1225), so the list must be sorted; a 0 in it never fires, and
   an entry equal to the number of layers fails (``self.layers[rank_layer]``, 1322).
2. **Only in prefill / training**: a drop happens when the hidden states hold more than one token (1224);
   a one-token decode step only shifts its position ids (fact 13).
3. **Ranking with the next layer's own projections** (1321-1342): a detached clone of layer ``i``'s output goes
   through layer ``i + 1``'s ``input_layernorm``, ``q_proj`` and ``k_proj`` (``v_proj`` is computed and unused),
   and that layer's rotary embedding at the *current* position ids (renumbered after earlier drops).
4. **Scores**: ``q . k / sqrt(head_dim)`` (1395) plus the additive 4-D causal + padding mask of the current
   sequence (1346-1348, 1387, 1392, 1396), softmax over *all* keys the query may see, in float32, cast back to
   the query's dtype (1397). Nothing is renormalised over the image.
5. **Heads**: the keys are not repeated for grouped-query attention (1366, 1395): ``[H, Q, d] @ [H_kv, d, L]``
   only broadcasts when ``H_kv == H`` or ``H_kv == 1``, so GQA models with other head counts raise. This
   reference repeats the key heads (head ``h`` reads key head ``h // (H / H_kv)``, as the attention does), which
   is the same thing wherever the public code runs. The probabilities are averaged over heads first (1399),
   the visual keys ``[image_index, image_index + cur)`` are selected (1400), then averaged over the query rows
   (1401).
6. **Query.** Chosen by the model's mode, not by the presence of labels (``self.training``, 1371):
   training: every position right before a supervised run, i.e. ``j - 1`` for each ``j`` with
   ``labels[j] != -100`` and ``labels[j - 1] == -100`` (1372-1376), recomputed on the current (already dropped)
   labels at each stage; a sample without such a position is left whole (with a print, 1377-1383), at every
   stage since dropping never adds an answer. Inference (``model.eval()``): one row, ``prompt_len[i] + cur - 1`` (1390-1392), where
   ``prompt_len`` is the sample's unpadded text token count (``llava/model/llava_arch.py`` 425-429): the last real
   token of the sample's input.
7. **How many.** At stage ``k`` (0-based) the span holds ``cur = int(N0 * r[k])`` tokens and keeps
   ``keep = int(N0 * r[k + 1])`` (1306-1307), ``r = [1.0] + image_token_ratio_list`` (``llava/train/
   pdrop_train.py`` 846-848 and every eval script), always of the ORIGINAL count ``N0``, floored. The scripts use
   ``layer_list=[8, 16, 24]`` and ``image_token_ratio_list=[0.5, 0.25, 0.125]`` (lambda = 0.5, README 75-76).
8. **Which.** ``topk(keep).indices`` of the averaged scores, sorted ascending (1405-1407): kept visual tokens
   stay in their original order. Ties: whatever ``torch.topk`` returns (its order for equal values is
   unspecified); this reference calls ``torch.topk`` the same way.
9. **New sequence**: text before the image, kept visual tokens, text after (1409-1412); the labels and the
   padding mask are gathered the same way, so the labels of dropped tokens are removed with them (visual
   tokens' labels are IGNORE anyway, ``llava_arch.py`` 462). Each sample is then right-padded again with zero
   vectors, IGNORE labels and False mask entries (1425-1443).
10. **Positions renumbered**: each sample's position ids become ``0 .. L' - 1``, padding 0 (1431, 1445-1446).
11. **Visual span**: ``image_token_posi[i]``, the index of the sample's first image placeholder in its unpadded
    ids (``llava_arch.py`` 416-421), and ``N0 = image_tokens[i]``, the feature count of image ``i``
    (``llava_arch.py`` 474): one image per sample; a text-only sample (``-1``) is never dropped (1358-1363).
12. **Padding and masks.** Right padding only (1303, 1468). The mask after a drop: flash-attention keeps the
    2-D mask (None without padding, 1241-1243); sdpa/eager rebuild a 4-D mask with the ORIGINAL
    ``(batch, seq_length)`` (1247-1257), which only works when the mask is None (sdpa, nothing padded). With
    padding, sdpa and eager fail inside ``pdrop_rank_drop``: their 4-D mask reaches
    ``_prepare_4d_causal_attention_mask`` (1316, 1346) and raises; eager fails even unpadded (its mask is always
    4-D). So padded batches run with ``flash_attention_2`` only, the backend of the training entry point
    (``llava/train/train_mem_pdrop.py``); the eval scripts run batch 1 with sdpa and no mask.
13. **KV-cache decoding.** Each layer's cache holds what that layer saw, so layers after a drop hold the shorter
    prefill. In a decode step the position id is lowered by ``cur - keep`` at each rank layer (1259-1268): a layer
    of stage ``k`` sees position ``L_k + t`` for the ``t``-th decoded token, ``L_k`` being the stage's prefill
    length, i.e. the renumbered positions continue. (``position_ids`` becomes a Python list of per-sample tensors there,
    which the rotary indexing reads correctly for batch 1 only: a batch of 2 raises an IndexError; the eval
    scripts decode one sample at a time.)
14. **Loss**: ``CrossEntropyLoss`` (mean) over the shifted compressed labels of the whole padded batch
    (``llava/model/language_model/llava_llama_pdrop.py`` 218-229).
15. **Gradient**: ranking runs on a detached clone (1321); the kept tokens are gathered by index, so the gradient
    reaches kept tokens only.
16. A truncation to ``tokenizer_model_max_length`` after the drop (1419-1423) only shortens, so it never acts on a
    sequence that was already within that length before the drop.

This reference runs each sample unpadded (right padding is removed, then the outputs are right-padded again), so
a batch is, by construction, the samples run alone: exactly what the public code gives every real position
under right padding and a causal mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

IGNORE_INDEX = -100


def lambda_ratios(lam: float, stages: int) -> list[float]:
    """PyramidDrop's ``image_token_ratio_list`` for a constant lambda: ``[lam, lam**2, ..., lam**stages]``."""
    return [lam**k for k in range(1, stages + 1)]


def stage_counts(n0: int, ratios: Sequence[float]) -> list[int]:
    """Visual tokens seen by each stage: ``[N0, int(N0 * r_1), int(N0 * r_2), ...]`` (fact 7: floor, of N0)."""
    return [n0] + [int(n0 * r) for r in ratios]


@dataclass
class PDropOutput:
    """What :func:`pdrop_forward` returns.

    Attributes:
        logits: ``[B, L', V]`` float32 logits of the compressed, right-padded sequence (zeros at padding).
        attention_mask: ``[B, L']`` bool, True at real positions.
        labels: ``[B, L']`` labels carried with their tokens (IGNORE at padding), or None without labels.
        loss: mean cross-entropy of the shifted compressed labels over the batch (fact 14), or None.
        positions: ``positions[k][b]``: original indices of the tokens that stage ``k``'s layers see (stage 0:
            all of them), a ``[L_k]`` long tensor.
        lengths: ``lengths[k][b]``: real length of sample ``b`` at stage ``k``.
        caches: one ``DynamicCache`` per sample (``use_cache=True``), for :func:`pdrop_decode_step`.
        spans: the ``(start, N0)`` of each sample (None for text-only), needed by the decode steps.
    """

    logits: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    loss: torch.Tensor | None
    positions: list[list[torch.Tensor]]
    lengths: list[list[int]]
    caches: list[DynamicCache] | None
    spans: list[tuple[int, int] | None]


def _causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive ``[1, 1, q_len, kv_len]`` causal mask, queries aligned with the last ``q_len`` keys."""
    query = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    blocked = torch.arange(kv_len, device=device)[None, :] > query
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min
    )[None, None]


def _run_layer(model, idx: int, hidden: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Decoder layer ``idx`` on one unpadded sample ``hidden [1, n, D]`` at position ids ``positions [n]``."""
    lm = model.model
    past = cache.get_seq_length(idx) if cache is not None else 0
    mask = _causal_mask(hidden.shape[1], past + hidden.shape[1], hidden.dtype, hidden.device)
    rotary = lm.rotary_emb(hidden, positions[None])
    return lm.layers[idx](
        hidden,
        attention_mask=mask,
        position_ids=positions[None],
        cache=cache,
        use_cache=cache is not None,
        position_embeddings=rotary,
    )


def query_rows(labels: torch.Tensor | None, last_prompt: int, training: bool) -> list[int]:
    """Query positions in the current sequence (fact 6): before each answer run (training), else ``last_prompt``."""
    if not training:
        return [last_prompt]
    if labels is None:
        return []
    supervised = (labels != IGNORE_INDEX).tolist()
    length = len(supervised)
    # j - 1 for each supervised j whose predecessor is not supervised (j = 0 wraps to the last label, as in
    # the public code's labels[index - 1]; position 0 is a BOS token in practice, never supervised)
    return [(j - 1) % length for j in range(length) if supervised[j] and not supervised[j - 1]]


@torch.no_grad()
def visual_scores(
    layer, rotary, hidden: torch.Tensor, positions: torch.Tensor, rows: list[int], start: int, count: int
) -> torch.Tensor:
    """PyramidDrop's importance of the ``count`` visual tokens from ``start``: ``[count]`` (facts 3-5).

    Args:
        layer: the decoder layer that runs next (its ``input_layernorm``, ``q_proj``, ``k_proj``).
        rotary: the model's rotary embedding module.
        hidden: ``[n, D]`` output of the previous layer (one unpadded sample).
        positions: ``[n]`` current position ids.
        rows: query positions.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden.detach().clone())[None]  # [1, n, D]
    n, head_dim = x.shape[1], attn.head_dim
    query = attn.q_proj(x).view(1, n, -1, head_dim).transpose(1, 2)  # [1, H, n, d]
    key = attn.k_proj(x).view(1, n, -1, head_dim).transpose(1, 2)  # [1, H_kv, n, d]
    cos, sin = rotary(x, positions[None])
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    key = repeat_kv(key, query.shape[1] // key.shape[1])[0]  # [H, n, d]
    rows_t = torch.tensor(rows, device=x.device)
    scores = query[0][:, rows_t] @ key.transpose(1, 2) / math.sqrt(head_dim)  # [H, Q, n]
    scores = scores + _causal_mask(n, n, scores.dtype, x.device)[0, :, rows_t]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # over all keys
    return probs.mean(0)[:, start : start + count].mean(0)  # heads, then the visual keys, then the rows


def _drop(hidden, labels, original, keep_index, start: int, count: int):
    """Sequence with visual tokens ``[start, start + count)`` reduced to ``keep_index`` (fact 9)."""
    order = torch.cat(
        [
            torch.arange(start, device=hidden.device),
            keep_index,
            torch.arange(start + count, hidden.shape[0], device=hidden.device),
        ]
    )
    return hidden[order], None if labels is None else labels[order], original[order]


def _sample_forward(model, embeds, span, labels, layers, ratios, training, cache, prompt_len):
    """One unpadded sample: ``(logits [n', V], labels [n'] | None, positions per stage)``.

    ``prompt_len`` is the public code's ``prompt_len[i]``: the sample's text tokens in the prompt.
    """
    lm = model.model
    hidden = embeds[None]  # [1, n, D]
    original = torch.arange(embeds.shape[0], device=embeds.device)
    stages = [original]
    counts = stage_counts(span[1], ratios) if span is not None else None
    for idx in range(len(lm.layers)):
        current = torch.arange(hidden.shape[1], device=hidden.device)  # renumbered (fact 10)
        hidden = _run_layer(model, idx, hidden, current, cache)
        if idx + 1 not in layers:
            continue
        stage = layers.index(idx + 1)
        cur = counts[stage] if counts is not None else 0
        rows = query_rows(labels, prompt_len + cur - 1, training)  # 1390: prompt_len[i] + image_tokens[i] - 1
        if span is not None and rows:
            start, keep = span[0], counts[stage + 1]
            alpha = visual_scores(lm.layers[idx + 1], lm.rotary_emb, hidden[0], current, rows, start, cur)
            keep_index = alpha.topk(keep).indices.sort().values + start  # fact 8
            new, labels, original = _drop(hidden[0], labels, original, keep_index, start, cur)
            hidden = new[None]
        stages.append(original)
    logits = model.lm_head(lm.norm(hidden))[0].float()
    return logits, labels, stages


def pdrop_forward(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    spans: Sequence[tuple[int, int] | None],
    labels: torch.Tensor | None = None,
    *,
    layers: Sequence[int],
    ratios: Sequence[float],
    training: bool | None = None,
    use_cache: bool = False,
    prompt_lengths: Sequence[int] | None = None,
) -> PDropOutput:
    """PyramidDrop's forward of a right-padded batch.

    Args:
        model: a transformers ``LlamaForCausalLM`` (any attention backend; each sample runs unpadded).
        inputs_embeds: ``[B, L, D]`` input embeddings (visual features already in place).
        attention_mask: ``[B, L]`` right-padding mask, or None.
        spans: per sample ``(start, N0)`` of its visual span in the unpadded sequence, None for text-only.
        labels: ``[B, L]`` labels aligned with the inputs (-100 = not trained on), or None.
        layers: PyramidDrop's ``layer_list`` (drop before these layers, ranked with their projections).
        ratios: ``image_token_ratio_list``: fraction of ``N0`` kept by each stage (without the leading 1.0).
        training: the query rule (fact 6); default ``model.training``, as the public code decides.
        use_cache: keep one ``DynamicCache`` per sample for :func:`pdrop_decode_step`.
        prompt_lengths: the public code's ``prompt_len``: per sample, the text tokens of its prompt, so that the
            inference query is the prompt's last token. Default: all non-visual tokens of the sample (its last
            token is the query), which is what the public code records for a prompt-only input.
    """
    layers, ratios = list(layers), list(ratios)
    if len(layers) != len(ratios) or layers != sorted(layers):
        raise ValueError(f"layers={layers} must be sorted with one ratio each (ratios={ratios})")
    training = model.training if training is None else training
    bsz, length = inputs_embeds.shape[:2]
    valid = torch.ones(bsz, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("PyramidDrop's public code supports right padding only (fact 12)")
    results, caches = [], []
    for b in range(bsz):
        n = int(valid[b].sum())
        cache = DynamicCache(config=model.config) if use_cache else None
        sample_labels = None if labels is None else labels[b, :n]
        n_text = n - (spans[b][1] if spans[b] is not None else 0)
        prompt_len = n_text if prompt_lengths is None else prompt_lengths[b]
        results.append(
            _sample_forward(
                model,
                inputs_embeds[b, :n],
                spans[b],
                sample_labels,
                layers,
                ratios,
                training,
                cache,
                prompt_len,
            )
        )
        caches.append(cache)
    new_len = max(logits.shape[0] for logits, _, _ in results)
    vocab = results[0][0].shape[-1]
    logits = inputs_embeds.new_zeros(bsz, new_len, vocab, dtype=torch.float32)
    mask = torch.zeros(bsz, new_len, dtype=torch.bool)
    new_labels = torch.full((bsz, new_len), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for b, (sample_logits, sample_labels, _) in enumerate(results):
        n = sample_logits.shape[0]
        logits[b, :n], mask[b, :n] = sample_logits, True
        if new_labels is not None:
            new_labels[b, :n] = sample_labels
    loss = None
    if new_labels is not None:
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), new_labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
    positions = [[stages[k] for _, _, stages in results] for k in range(len(layers) + 1)]
    return PDropOutput(
        logits=logits,
        attention_mask=mask,
        labels=new_labels,
        loss=loss,
        positions=positions,
        lengths=[[int(p.numel()) for p in stage] for stage in positions],
        caches=caches if use_cache else None,
        spans=list(spans),
    )


@torch.no_grad()
def pdrop_decode_step(
    model,
    out: PDropOutput,
    token_embeds: torch.Tensor,
    step: int,
    *,
    layers: Sequence[int],
    ratios: Sequence[float],
) -> torch.Tensor:
    """One decode step after a cached :func:`pdrop_forward` prefill: next-token logits ``[B, V]`` (fact 13).

    Args:
        token_embeds: ``[B, D]`` embeddings of the tokens fed at this step.
        step: how many tokens were decoded before this one (0 for the first token after the prompt).
    """
    lm = model.model
    rows = []
    for b, cache in enumerate(out.caches):
        position = out.lengths[0][b] + step  # what generate gives: the unpadded full-length count
        counts = stage_counts(out.spans[b][1], ratios) if out.spans[b] is not None else None
        hidden = token_embeds[b][None, None]  # [1, 1, D]
        for idx in range(len(lm.layers)):
            hidden = _run_layer(model, idx, hidden, torch.tensor([position]), cache)
            if idx + 1 in layers and counts is not None:
                stage = layers.index(idx + 1)
                position -= counts[stage] - counts[stage + 1]
        rows.append(model.lm_head(lm.norm(hidden))[0, -1].float())
    return torch.stack(rows)


@torch.no_grad()
def pdrop_generate(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    spans: Sequence[tuple[int, int] | None],
    *,
    layers: Sequence[int],
    ratios: Sequence[float],
    max_new_tokens: int,
) -> tuple[torch.Tensor, list[torch.Tensor], PDropOutput]:
    """Greedy decoding with the KV cache: ``(new tokens [B, T], step logits T x [B, V], prefill output)``."""
    out = pdrop_forward(
        model,
        inputs_embeds,
        attention_mask,
        spans,
        layers=layers,
        ratios=ratios,
        training=False,
        use_cache=True,
    )
    last = torch.tensor(out.lengths[-1]) - 1
    step_logits = [out.logits[torch.arange(len(last)), last]]
    tokens = [step_logits[-1].argmax(-1)]
    for step in range(max_new_tokens - 1):
        embeds = model.get_input_embeddings()(tokens[-1])
        step_logits.append(pdrop_decode_step(model, out, embeds, step, layers=layers, ratios=ratios))
        tokens.append(step_logits[-1].argmax(-1))
    return torch.stack(tokens, 1), step_logits, out
