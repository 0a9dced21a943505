"""The reference for compression units: each unit compressed alone by the single-sample algorithm."""

from __future__ import annotations

import torch

from libra_train.compress import compress_visual_tokens


def expected_row(
    h: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    u: torch.Tensor,
    ratio: float,
    merge: str = "igm",
    theta: float = 0.7,
    select: str = "interval",
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """The compressed sequence of one unpadded sample, unit by unit with :func:`compress_visual_tokens`.

    Args:
        h: ``[L, D]`` hidden states; v: ``[L]`` bool visual positions; a: ``[L]`` importance; u: ``[L]`` unit of
            each visual position (units may be non-contiguous: text in between stays where it is).

    Returns:
        ``(tokens [L', D], source, compensation)``: each new token, the old position whose RoPE phase it takes
        (a compensation token: its unit's last visual position) and whether it is a compensation token (it goes
        right after its unit's last visual token).
    """
    out, source, compensation = [], [], []
    last = {int(u[i]): i for i in range(len(u)) if v[i]}
    results = {}
    for unit in last:
        idx = [j for j in range(len(v)) if v[j] and u[j] == unit]
        res = compress_visual_tokens(h[idx], a[idx], ratio, select=select, merge=merge, theta=theta)
        results[unit] = ([idx[t] for t in res.target_index.tolist()], res)
    for i in range(len(v)):
        if not v[i]:
            out.append(h[i])
            source.append(i)
            compensation.append(False)
            continue
        targets, res = results[int(u[i])]
        if i in targets:
            out.append(res.tokens[targets.index(i)])
            source.append(i)
            compensation.append(False)
        if i == last[int(u[i])] and res.has_compensation:
            out.append(res.tokens[-1])
            source.append(i)
            compensation.append(True)
    return torch.stack(out), source, compensation
