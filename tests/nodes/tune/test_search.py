"""The search loop: measured points are reused, new ones saved as they come, a budget stops it."""

from __future__ import annotations

from typing import Any

from dagfusion.nodes.tune.measure import run_search
from dagfusion.nodes.tune.space import Point

POINTS = [Point(25), Point(25, "deepcache", 3), Point(25, "deepcache", 5)]


def fake(point: Point) -> dict[str, Any]:
    return {"setting": point.setting, "mac_speedup": float(point.interval or 1)}


def test_known_points_are_not_measured_again_and_new_ones_are_saved_at_once() -> None:
    measured, saved, seen = [], [], []

    def measure(point: Point) -> dict[str, Any]:
        measured.append(point.setting)
        return fake(point)

    done = {POINTS[1].setting: fake(POINTS[1])}
    results = run_search(POINTS, measure, done=done, save=saved.append, on_point=lambda i, n, r: seen.append((i, n)))
    assert measured == [POINTS[0].setting, POINTS[2].setting]
    assert [r["setting"] for r in saved] == measured
    assert [r["setting"] for r in results] == [p.setting for p in POINTS]
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_a_spent_budget_stops_before_the_next_new_point() -> None:
    calls = []
    results = run_search(POINTS, lambda p: calls.append(p) or fake(p), should_stop=lambda: len(calls) >= 1)
    assert len(calls) == 1 and [r["setting"] for r in results] == [POINTS[0].setting]
