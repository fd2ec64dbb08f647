from __future__ import annotations

from dagfusion.nodes.shapes.world import ATTRIBUTES, parse_caption, scenes, single_object_scenes


def test_captions_read_naturally_and_parse_back() -> None:
    for scene in single_object_scenes():
        assert parse_caption(scene.caption) == scene
    first = single_object_scenes()[0]
    assert first.caption == "a small red circle on the left on a black background"
    assert parse_caption("a red circle above a blue square on a black background") is None
    assert parse_caption("a huge red circle on the left on a black background") is None


def test_eval_split_holds_out_combinations_but_covers_every_value() -> None:
    train, held = scenes("train"), scenes("eval")
    assert not {s.caption for s in train} & {s.caption for s in held}
    assert len(train) + len(held) == 720
    assert 0.08 < len(held) / 720 < 0.2
    for attribute, values in ATTRIBUTES.items():
        assert {s.labels()[attribute] for s in held} == set(values), attribute


def test_two_object_split_uses_relations() -> None:
    two = scenes("eval", objects=2)
    assert two and all(s.relation in {"above", "below", "left of", "right of"} for s in two)
    assert " above " in next(s.caption for s in two if s.relation == "above")
