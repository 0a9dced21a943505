"""Token counts of a compression schedule: how many tokens each LLM layer sees.

Pure Python (no torch), shared by the compression code, the FLOPs model and the benchmarks.

Conventions (DESIGN.md section 1, "Where" and "Hierarchical merging"):

- A compression point ``l`` means layers ``0..l`` see the full sequence and the output of layer
  ``l`` is compressed before layer ``l + 1``. Points ``{7, 15, 23}`` on a 32-layer LLM give four
  stages of 8 layers each; FastV "K=3" in the paper's tables is the single point ``{3}``.
- Point ``k`` keeps ``num_targets(N_{k-1}, R_k)`` of the ``N_{k-1}`` visual tokens it receives.
- With compensation, a point that removed at least one token adds one information compensation
  token, carried unchanged by later stages and never compressed again. This is the upper bound:
  the real token exists only when some merged-away token is a *negative* (below theta).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["kept_of_original", "num_targets", "token_schedule", "visual_schedule"]


def num_targets(n: int, ratio: float) -> int:
    """Number of target tokens kept out of ``n`` when a fraction ``ratio`` is removed.

    ``N_t = max(1, round(n * (1 - ratio)))`` with Python's ``round`` (half to even: n=33,
    ratio=0.5 gives 16), and 0 when there is nothing to compress.

    Args:
        n: Visual tokens entering the compression point.
        ratio: Fraction of them removed, in ``[0, 1)``.

    Returns:
        The number of targets, in ``[min(n, 1), n]``.
    """
    return 0 if n == 0 else max(1, round(n * (1 - ratio)))


def kept_of_original(n0: int, fraction: float) -> int:
    """Visual tokens kept out of a span whose ORIGINAL count is ``n0``, at a point that keeps ``fraction`` of it.

    PyramidDrop's rule (``int(N0 * r_k)``: floor, of the original count, not of the previous stage's), kept at
    one token at least as :func:`num_targets` is (PyramidDrop would keep none once ``N0 * r_k < 1``), and 0 when
    there is nothing to compress. The device computes the same in float64
    (``libra_train.compress.stage.kept_of_original_device``).
    """
    return 0 if n0 == 0 else max(1, int(n0 * fraction))


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    for r in out:
        if not 0.0 <= r < 1.0:  # also rejects NaN
            raise ValueError(f"compression ratio must be in [0, 1), got {r}")
    return out


def visual_schedule(
    n_visual: int,
    ratios: Sequence[float],
    *,
    compensation: bool = False,
    keep_fractions: Sequence[float] | None = None,
) -> list[int]:
    """Visual-span tokens of each stage: the stage before the first point, then one per point.

    Example: ``visual_schedule(576, [0.5] * 3)`` is ``[576, 288, 144, 72]``; with
    ``compensation=True`` it is ``[576, 289, 146, 75]`` (merged visual + carried compensation).
    ``keep_fractions`` replaces the chained ratios by fractions of the original count
    (:func:`kept_of_original`; PyramidDrop's ``[0.5, 0.25, 0.125]`` also gives ``[576, 288, 144, 72]``).

    Args:
        n_visual: Visual tokens entering the LLM.
        ratios: The ratio ``R_k`` of each compression point, in order (ignored with ``keep_fractions``).
        compensation: Count one compensation token per point that removed tokens.
        keep_fractions: The kept fraction ``f_k`` of ``n_visual`` at each point, or None.

    Returns:
        ``len(ratios) + 1`` counts (``len(keep_fractions) + 1`` with fractions).

    Raises:
        ValueError: On a negative ``n_visual`` or a ratio outside ``[0, 1)``.
    """
    if n_visual < 0:
        raise ValueError(f"n_visual must be >= 0, got {n_visual}")
    visual, carried = n_visual, 0
    counts = [n_visual]
    steps = [None] * len(keep_fractions) if keep_fractions is not None else _check_ratios(ratios)
    for k, r in enumerate(steps):
        kept = num_targets(visual, r) if r is not None else kept_of_original(n_visual, keep_fractions[k])
        if compensation and kept < visual:
            carried += 1
        visual = kept
        counts.append(visual + carried)
    return counts


def token_schedule(
    num_layers: int,
    n_visual: int,
    points: Sequence[int],
    ratios: float | Sequence[float],
    *,
    n_text: int = 0,
    compensation: bool = False,
    keep_fractions: Sequence[float] | None = None,
) -> list[int]:
    """Tokens seen by each of the ``num_layers`` layers of the LLM.

    Args:
        num_layers: Decoder layers of the LLM.
        n_visual: Visual tokens entering the LLM.
        points: Compression points, sorted and unique, each in ``[0, num_layers - 2]`` (a point
            at the last layer would compress nothing the LM uses). Empty: no compression.
        ratios: One ratio per point, or a single float used at every point; each in ``[0, 1)``.
        n_text: Non-visual tokens, seen by every layer.
        compensation: Count one compensation token per point that removed tokens.
        keep_fractions: One kept fraction of ``n_visual`` per point instead of ``ratios`` (PyramidDrop's rule,
            :func:`kept_of_original`), or None.

    Returns:
        ``num_layers`` token counts; e.g. points ``[7, 15, 23]``, R=0.5, 32 layers, N=576:
        8 x 576, 8 x 288, 8 x 144, 8 x 72.

    Raises:
        ValueError: On invalid layers, points, ratios or counts.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if n_text < 0:
        raise ValueError(f"n_text must be >= 0, got {n_text}")
    points = list(points)
    if points != sorted(set(points)):
        raise ValueError(f"compression points must be sorted and unique, got {points}")
    for p in points:
        if not 0 <= p <= num_layers - 2:
            raise ValueError(
                f"compression point {p} out of range [0, {num_layers - 2}] for {num_layers} layers "
                "(a point at the last layer would compress nothing the LM uses)"
            )
    if isinstance(ratios, (int, float)):
        ratios = [ratios] * len(points)
    elif len(ratios) != len(points):
        raise ValueError(f"got {len(ratios)} ratios for {len(points)} compression points")
    if keep_fractions is not None and len(keep_fractions) != len(points):
        raise ValueError(f"got {len(keep_fractions)} keep fractions for {len(points)} compression points")
    counts = visual_schedule(n_visual, ratios, compensation=compensation, keep_fractions=keep_fractions)
    # Stage k covers layers (points[k-1], points[k]]; the last stage runs to the last layer.
    ends = [*points, num_layers - 1]
    schedule: list[int] = []
    for count, end in zip(counts, ends):
        schedule += [count + n_text] * (end + 1 - len(schedule))
    return schedule
