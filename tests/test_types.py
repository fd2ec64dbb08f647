from __future__ import annotations

import pytest

from dagfusion import ANY, FLOAT, INT, SEED, STRING, TENSOR, SocketType, union
from dagfusion.errors import NodeDefinitionError
from dagfusion.types import CORE_TYPES, TypeSystem


@pytest.fixture
def types() -> TypeSystem:
    ts = TypeSystem(CORE_TYPES)
    ts.add(SocketType("IMAGE", parents=("TENSOR",)))
    ts.add(SocketType("LATENT", parents=("TENSOR",)))
    return ts


def test_int_widens_to_float_but_not_back(types: TypeSystem) -> None:
    assert types.accepts(FLOAT, INT)
    assert types.accepts(FLOAT, SEED)
    assert not types.accepts(INT, FLOAT)


def test_any_connects_both_ways(types: TypeSystem) -> None:
    assert types.accepts(ANY, "IMAGE")
    assert types.accepts("IMAGE", ANY)


def test_subtype_accepted_where_parent_expected(types: TypeSystem) -> None:
    assert types.accepts(TENSOR, "IMAGE")
    assert not types.accepts("IMAGE", TENSOR)
    assert not types.accepts("IMAGE", "LATENT")


def test_unions(types: TypeSystem) -> None:
    image_or_latent = union("IMAGE", "LATENT")
    assert types.accepts(image_or_latent, "LATENT")
    assert not types.accepts(image_or_latent, STRING)
    # a union output fits only if every member fits
    assert types.accepts(TENSOR, image_or_latent)
    assert not types.accepts("IMAGE", image_or_latent)
    assert union(image_or_latent, "IMAGE").members == ("IMAGE", "LATENT")
    with pytest.raises(NodeDefinitionError):
        union("IMAGE", "IMAGE")


def test_values(types: TypeSystem) -> None:
    assert types.value_matches(INT, 3)
    assert not types.value_matches(INT, True)
    assert not types.value_matches(INT, 3.0)
    assert types.value_matches(FLOAT, 3)  # an INT value is a FLOAT value
    assert not types.value_matches(FLOAT, "3")
    assert types.value_matches(union(INT, STRING), "x")
    assert types.value_matches(ANY, object())


def test_tensor_values_resolved_lazily(types: TypeSystem) -> None:
    torch = pytest.importorskip("torch")
    assert types.value_matches(TENSOR, torch.zeros(1))
    assert types.value_matches("IMAGE", torch.zeros(1))  # no own python_types: no runtime check
    assert not types.value_matches(TENSOR, [0.0])


def test_unknown_parent_and_bad_names_rejected() -> None:
    ts = TypeSystem()
    with pytest.raises(NodeDefinitionError, match="unknown parent"):
        ts.add(SocketType("CHILD", parents=("NOPE",)))
    with pytest.raises(NodeDefinitionError):
        SocketType("lowercase")
