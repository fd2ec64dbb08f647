"""The tuner's search space and setting texts."""

from __future__ import annotations

import pytest

from dagfusion.nodes.tune.space import MAX_POINTS, Point, SettingError, parse_ints, parse_setting, search_space


def test_a_setting_reads_back_as_the_same_point() -> None:
    for point in (Point(25), Point(20, "deepcache", 5, "int8"), Point(8, "cachequant", 3), Point(4, "blockcache", 2, "int4")):
        assert parse_setting(point.setting) == point


@pytest.mark.parametrize(("text", "says"), [
    ("cache=deepcache:5", "steps=N"),
    ("steps=x", "integer"),
    ("steps=25 cache=deepcache", "interval"),
    ("steps=25 cache=deepcache:1", "at least 2"),
    ("steps=25 cache=magic:3", "unknown cache"),
    ("steps=25 quant=int3", "unknown quant"),
    ("steps=25 steps=20", "twice"),
    ("steps=25 colour=red", "got the part"),
])
def test_a_bad_setting_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(SettingError, match=says):
        parse_setting(text)


def test_the_space_offers_what_suits_the_denoiser() -> None:
    unet = search_space("unet", [25], quants=["none"])
    assert {p.cache for p in unet} == {"none", "deepcache", "cachequant"}
    transformer = search_space("transformer", [25], quants=["none", "int8"])
    assert {p.cache for p in transformer} == {"none", "blockcache", "cachequant"}
    assert {p.quant for p in transformer} == {"none", "int8"}
    with pytest.raises(SettingError, match="does not suit"):
        search_space("transformer", [25], caches=["deepcache"])


def test_the_space_drops_points_that_repeat_or_cannot_cache() -> None:
    points = search_space("unet", [4], caches=["cachequant", "deepcache"], quants=["none"])
    # at 4 steps, intervals 3, 4 and 5 give CacheQuant 2, 1 and 1 full steps: one point survives
    assert [p.interval for p in points if p.cache == "cachequant"] == [3]
    # DeepCache with a single full step is no schedule at all
    assert all(-(-4 // p.interval) >= 2 for p in points if p.cache == "deepcache")


def test_step_lists_are_checked() -> None:
    assert parse_ints("25, 20 15", "step_counts") == [25, 20, 15]
    with pytest.raises(SettingError, match="≥ 1"):
        parse_ints("25, 0", "step_counts")
    with pytest.raises(SettingError, match="at least one"):
        parse_ints("", "step_counts")
    assert MAX_POINTS >= len(search_space("unet", [25, 20, 15], quants=["none", "int8", "int4", "fp8_e4m3"]))
