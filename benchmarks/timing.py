"""Interleaved timing: the only way to compare clients on a noisy 2-core machine.

Timing blocks of calls one candidate after another drifts by 5-25% here; interleaving
single calls of all candidates in a shuffled order and comparing per-call medians keeps
identical clients within about 1% of each other.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Per-call wall times of one candidate, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index]


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    warmup: int = 20,
    seed: int = 1,
) -> dict[str, Timing]:
    """Time ``rounds`` single calls of every candidate, shuffling their order each round."""
    names = list(candidates)
    rng = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn = candidates[name]
            started = clock()
            fn()
            samples[name].append(clock() - started)
    return {name: Timing(tuple(values)) for name, values in samples.items()}
