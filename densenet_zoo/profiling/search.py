"""The largest batch within a memory budget, found with few probes.

A probe is a training step in a fresh process: seconds on a GPU, a minute on a CPU at 224x224.
Memory grows about linearly with the batch (the activations; the model, its gradients and the
optimizer state are a constant), so the line through two measured probes predicts where the budget
is reached, and a probe there and one ``resolution`` above it usually end the search (from 64 to a
batch near 573, to 8 images: four probes, where doubling and bisection take eleven). Where memory
does not follow a line (an allocator's or cuDNN's workspace jumps, a probe fails without a
reading), every guess stays inside the bracket known so far, and a guess that did not halve the
bracket is followed by a halving step, so the search never takes much more than twice the probes of
doubling and bisection.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from .._utils import UsageError

__all__ = ["largest_fitting"]


def largest_fitting(peak: Callable[[int], Optional[float]], budget: float, start: int = 1, limit: int = 4096,
                    resolution: int = 1) -> int:
    """Largest ``n`` in [start, limit] with ``peak(n) <= budget`` (0 if none), assuming the peak grows with ``n``.

    Args:
        peak: runs a probe of size ``n`` and returns its peak, or None where it failed (an out-of-memory
            error: it does not fit).
        budget: the most a probe may take, in the unit of ``peak``.
        start: the first size probed.
        limit: the largest size probed.
        resolution: the search ends when a size that fits and one that does not are at most this far apart.

    Returns:
        A size that fitted (0 when ``start`` did not), with the true largest below it plus ``resolution``.

    Example:
        largest_fitting(lambda n: 100 + 3 * n, budget=1000, start=64, resolution=8)  # 300, in 4 probes
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UsageError(f"resolution must be a positive number of images, got {resolution!r}")
    if start > limit:
        return 0
    low, high = 0, limit + 1  # low fitted (0: nothing yet); high did not, or lies beyond the search
    seen: Dict[int, float] = {}  # size -> peak of the probes that gave one
    n, guessed = start, False
    while True:
        before = (low, high)
        measured = peak(n)
        if measured is not None:
            seen[n] = measured
        if measured is not None and measured <= budget:
            low = n
        else:
            high = n
        if low == 0 or high - low <= resolution:
            return low
        # A guess inside a known bracket that did not halve it: the next probe halves the bracket instead.
        halve = guessed and before[1] <= limit and 2 * (high - low) > before[1] - before[0]
        n, guessed = _next_size(seen, budget, low, high, limit, resolution, halve)


def _next_size(seen: Dict[int, float], budget: float, low: int, high: int, limit: int, resolution: int,
               halve: bool) -> Tuple[int, bool]:
    """The next size to probe, and whether it came from the line (else: doubling, or the bracket's middle)."""
    unbounded = high > limit  # nothing has failed yet
    safe = min(2 * low, limit) if unbounded else (low + high) // 2
    guess = None if halve else _on_the_line(seen, budget, low, high)
    if guess is None or (guess >= high and not unbounded):  # the line does not explain the failure at ``high``
        return safe, False
    guess = max(guess, low + resolution)  # a guess at ``low`` itself proves nothing: probe one step above it
    return min(guess, high - 1, limit), True


def _on_the_line(seen: Dict[int, float], budget: float, low: int, high: int) -> Optional[int]:
    """Where the line through the two probes nearest the budget reaches it (rounded down), if it rises."""
    if high in seen:  # the failed size has a reading: the line through both ends of the bracket
        (n1, p1), (n2, p2) = (low, seen[low]), (high, seen[high])
    else:
        below = sorted(n for n in seen if n <= low)
        if len(below) < 2:
            return None
        (n1, p1), (n2, p2) = (below[-2], seen[below[-2]]), (below[-1], seen[below[-1]])
    if p2 <= p1:
        return None
    return int(n2 + (budget - p2) * (n2 - n1) // (p2 - p1))
