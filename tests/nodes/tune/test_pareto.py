"""The floor, the Pareto set and the chosen point."""

from __future__ import annotations

import math

import pytest

from dagfusion.nodes.tune.pareto import choose, pareto_front, parse_floor
from dagfusion.nodes.tune.space import SettingError


def result(setting: str, speed: float, bits: float, psnr: float, drop: float | None = None) -> dict:
    return {"setting": setting, "label": setting, "mac_speedup": speed, "weight_bits": bits, "psnr": psnr,
            "shapeeval_drop": drop}


POINTS = [
    result("full", 1.0, 32, math.inf, 0.0),
    result("fast", 2.4, 32, 38.2, 0.0),
    result("faster", 3.0, 32, 31.0, 4.0),
    result("fast-int8", 2.4, 8.4, 37.9, 1.0),
    result("slow-and-worse", 1.5, 32, 36.0, 2.0),   # beaten by "fast" in speed and quality
]


def test_the_front_keeps_what_nothing_beats() -> None:
    front = {r["setting"] for r in pareto_front(POINTS, parse_floor("psnr=35"))}
    assert front == {"full", "fast", "faster", "fast-int8"}


def test_the_choice_is_the_fastest_above_the_floor_then_the_smallest() -> None:
    assert choose(POINTS, parse_floor("psnr=35"))["setting"] == "fast-int8"
    assert choose(POINTS, parse_floor("psnr=30"))["setting"] == "faster"
    assert choose(POINTS, parse_floor("shapeeval=0.5"))["setting"] == "fast"
    assert choose(POINTS, parse_floor("psnr=1000"))["setting"] == "full"  # the full run itself always qualifies
    assert choose([result("blurry", 2.0, 32, 20.0)], parse_floor("psnr=30")) is None


def test_a_shapeeval_floor_never_picks_an_unscored_point() -> None:
    unscored = [result("unscored", 5.0, 32, 40.0, None), result("full", 1.0, 32, math.inf, 0.0)]
    assert choose(unscored, parse_floor("shapeeval=2"))["setting"] == "full"


@pytest.mark.parametrize("text", ["psnr", "psnr=abc", "fid=3", "psnr=-1", "psnr=nan"])
def test_a_bad_floor_says_what_is_expected(text: str) -> None:
    with pytest.raises(SettingError, match="floor|psnr|number"):
        parse_floor(text)
