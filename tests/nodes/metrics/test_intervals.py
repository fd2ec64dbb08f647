"""Paired-bootstrap intervals: they cover the mean difference, shrink with more pairs, exclude zero
for a clear effect and reject unpaired input."""

from __future__ import annotations

import random

import pytest
from dagfusion.nodes.metrics.intervals import paired_difference


def test_identical_scores_give_a_zero_width_interval() -> None:
    scores = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert paired_difference(scores, scores) == (0.0, 0.0, 0.0)


def test_a_clear_improvement_excludes_zero_and_the_interval_holds_the_mean() -> None:
    rng = random.Random(1)
    before = [float(rng.random() < 0.5) for _ in range(200)]
    after = [1.0 if b else float(rng.random() < 0.6) for b in before]  # fixes 60 % of the failures
    result = paired_difference(after, before)
    assert result.low <= result.mean <= result.high
    assert result.low > 0.15  # true effect ≈ 0.30


def test_noise_gives_an_interval_around_zero_that_narrows_with_more_pairs() -> None:
    def width(n: int) -> float:
        rng = random.Random(n)
        a = [float(rng.random() < 0.9) for _ in range(n)]
        b = [float(rng.random() < 0.9) for _ in range(n)]
        r = paired_difference(a, b)
        assert r.low <= 0.0 <= r.high or abs(r.mean) < 0.1
        return r.high - r.low

    assert width(1600) < 0.5 * width(100)


def test_the_same_seed_gives_the_same_interval() -> None:
    a, b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)


@pytest.mark.parametrize(("after", "before", "rounds", "message"), [
    ([1.0], [1.0, 0.0], 2000, "equal lengths"),
    ([], [], 2000, "empty"),
    ([1.0], [0.0], 10, "at least 40"),
])
def test_unpaired_or_empty_input_is_refused(after: list[float], before: list[float], rounds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_difference(after, before, rounds=rounds)
