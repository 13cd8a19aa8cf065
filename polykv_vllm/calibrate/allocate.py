"""Pick one setting per layer under a byte budget, from measured per-layer losses (pure Python).

The input is one :class:`Choice` list per layer: a setting, the bytes it takes per (token, kv
head) (measured from the codec's tensors) and its measured loss (the mean KL divergence added
when only that layer is quantized so). Losses are taken as additive across layers and between
keys and values; ``polykv-vllm calibrate`` checks that assumption by measuring the chosen
profile as a whole and records both figures.

- :func:`allocate_knapsack`: the exact minimum of the summed loss under the budget (a
  multiple-choice knapsack, dynamic programming over whole bytes; ~30 layers x 12 settings x a
  few thousand bytes runs in about a second).
- :func:`allocate_greedy`: start from the lowest-loss setting of every layer and repeatedly take
  the step down with the least loss added per byte saved. Kept as the comparison: it can stop
  at a worse point when a layer's loss curve is not convex in bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from polykv_vllm.core.profile import LayerSetting, ProfileError

__all__ = ["Choice", "allocate_greedy", "allocate_knapsack", "check_target", "reachable_ratios"]


@dataclass(frozen=True)
class Choice:
    """One setting of one layer with its measured bytes per (token, kv head) and loss."""

    setting: LayerSetting
    nbytes: int
    loss: float


def reachable_ratios(layers: Sequence[Sequence[Choice]], bf16_bytes: int) -> tuple[float, float]:
    """``(lowest, highest)`` compression vs ``bf16_bytes`` (per token-head, all layers) that
    these choices give: every layer at its largest / smallest setting."""
    most = sum(max(c.nbytes for c in cs) for cs in layers)
    least = sum(min(c.nbytes for c in cs) for cs in layers)
    return bf16_bytes / most, bf16_bytes / least


def check_target(ratio: object, layers: Sequence[Sequence[Choice]], bf16_bytes: int) -> int:
    """The byte budget (per token-head, all layers) of ``ratio``; raises :class:`ProfileError`
    naming the value and the allowed range when no setting reaches it."""
    _, highest = reachable_ratios(layers, bf16_bytes)
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, int | float)
        or not math.isfinite(ratio)
        or ratio <= 1.0
        or ratio > highest + 1e-9
    ):
        raise ProfileError(
            f"target ratio {ratio!r} cannot be reached: allowed are ratios in (1, {highest:.3f}]"
            f" for this model (the smallest setting, "
            f"{min(layers[0], key=lambda c: c.nbytes).setting.label} on every layer, gives "
            f"{highest:.3f}x of bf16, scales and norms included)."
        )
    return math.floor(bf16_bytes / ratio + 1e-9)


def _frontier(choices: Sequence[Choice]) -> list[Choice]:
    """The choices no other choice beats on both bytes and loss, by bytes descending."""
    best: dict[int, Choice] = {}
    for c in choices:
        if c.nbytes not in best or c.loss < best[c.nbytes].loss:
            best[c.nbytes] = c
    out: list[Choice] = []
    for c in sorted(best.values(), key=lambda c: c.nbytes):  # ascending bytes
        if not out or c.loss < out[-1].loss:
            out.append(c)
    return out[::-1]


def allocate_knapsack(layers: Sequence[Sequence[Choice]], budget: int) -> list[Choice]:
    """One choice per layer minimising the summed loss with summed bytes <= ``budget``.

    Exact for additive losses. Raises :class:`ProfileError` if even the smallest choices
    exceed ``budget``.
    """
    fronts = [_frontier(cs) for cs in layers]
    floor = sum(f[-1].nbytes for f in fronts)
    if floor > budget:
        raise ProfileError(f"byte budget {budget} is below the smallest profile ({floor} bytes).")
    slack = budget - floor  # bytes that may go above every layer's smallest choice
    inf = math.inf
    cost = [0.0] + [inf] * slack  # cost[s]: least loss so far using s bytes of slack
    picks: list[list[int]] = []
    for front in fronts:
        base = front[-1].nbytes
        new = [inf] * (slack + 1)
        pick = [-1] * (slack + 1)
        for j, c in enumerate(front):
            extra = c.nbytes - base
            for s in range(slack - extra + 1):
                if cost[s] == inf:
                    continue
                total = cost[s] + c.loss
                if total < new[s + extra]:
                    new[s + extra] = total
                    pick[s + extra] = j
        cost = new
        picks.append(pick)
    s = min(range(slack + 1), key=lambda i: cost[i])
    chosen: list[Choice] = []
    for front, pick in zip(reversed(fronts), reversed(picks), strict=True):
        c = front[pick[s]]
        chosen.append(c)
        s -= c.nbytes - front[-1].nbytes
    return chosen[::-1]


def allocate_greedy(layers: Sequence[Sequence[Choice]], budget: int) -> list[Choice]:
    """Greedy marginal gain: lowest-loss choice everywhere, then the cheapest steps down in
    loss added per byte saved until the bytes fit ``budget``."""
    fronts = [_frontier(cs) for cs in layers]
    if sum(f[-1].nbytes for f in fronts) > budget:
        raise ProfileError(f"byte budget {budget} is below the smallest profile.")
    at = [0] * len(fronts)
    total = sum(f[0].nbytes for f in fronts)
    while total > budget:
        best: tuple[float, int, int] | None = None
        for i, front in enumerate(fronts):
            cur = front[at[i]]
            for j in range(at[i] + 1, len(front)):
                saved = cur.nbytes - front[j].nbytes
                rate = (front[j].loss - cur.loss) / saved
                if best is None or rate < best[0]:
                    best = (rate, i, j)
        assert best is not None, "a step down exists while bytes exceed the floor"
        _, i, j = best
        total -= fronts[i][at[i]].nbytes - fronts[i][j].nbytes
        at[i] = j
    return [front[j] for front, j in zip(fronts, at, strict=True)]
