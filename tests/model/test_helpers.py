"""unwrap_compiled, swap_parameters (tied weights, restore on error, pinning) and applied_patch
(on handles, and on modules while patches are applied)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dagfusion.model import (  # noqa: E402
    FunctionPatch,
    ModelHandle,
    ModelPatch,
    applied_patch,
    applying,
    apply_patches,
    parameter_places,
    patches_of,
    swap_parameters,
    unwrap_compiled,
)


class _Compiled(torch.nn.Module):
    """Stands in for torch.compile's OptimizedModule: the model is ``_orig_mod``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, *args: Any) -> Any:
        return self._orig_mod(*args)


def _tied() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied (5, 3)
    return model


def test_unwrap_compiled() -> None:
    inner = torch.nn.Linear(2, 2)
    assert unwrap_compiled(inner) is inner
    assert unwrap_compiled(_Compiled(inner)) is inner
    assert unwrap_compiled("not a module") == "not a module"


def test_parameter_places_lists_tied_weights_once_with_every_place() -> None:
    model = _tied()
    places = parameter_places(_Compiled(model))
    assert sorted(places) == ["0.weight"]
    assert [(type(owner).__name__, attr) for owner, attr in places["0.weight"].places] == [
        ("Embedding", "weight"),
        ("Linear", "weight"),
    ]


def test_swap_parameters_replaces_every_place_and_restores_the_originals() -> None:
    model = _tied()
    original = model[0].weight
    saved = original.detach().clone()
    with swap_parameters(model, {"0.weight": torch.zeros(5, 3)}) as inside:
        assert inside is model
        assert model[0].weight is model[1].weight is not original
        assert isinstance(model[0].weight, torch.nn.Parameter) and not model[0].weight.requires_grad
        assert model[0].weight.abs().sum() == 0
    assert model[0].weight is original and model[1].weight is original
    assert torch.equal(original, saved)  # never written


def test_swap_parameters_restores_after_an_error() -> None:
    model = torch.nn.Linear(2, 2)
    weight, bias = model.weight, model.bias
    with pytest.raises(RuntimeError, match="boom"), swap_parameters(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2)}):
        raise RuntimeError("boom")
    assert model.weight is weight and model.bias is bias


def test_swap_parameters_checks_names_and_shapes_before_changing_anything() -> None:
    model = torch.nn.Linear(2, 2)
    weight = model.weight
    with pytest.raises(KeyError, match="no parameter 'nope'"), swap_parameters(model, {"weight": torch.ones(2, 2), "nope": torch.ones(1)}):
        pass
    with pytest.raises(ValueError, match="shape"), swap_parameters(model, {"weight": torch.ones(3, 3)}):
        pass
    assert model.weight is weight


def test_swap_parameters_installs_a_parameter_as_is_and_pins_originals() -> None:
    model = torch.nn.Linear(2, 2)
    original = model.weight
    mine = torch.nn.Parameter(torch.ones(2, 2))
    with swap_parameters(model, {"weight": mine}, requires_grad=True):
        assert model.weight is mine
    with swap_parameters(model, {"weight": original}):  # pin: whatever happens inside, the original comes back
        model._parameters["weight"] = torch.nn.Parameter(torch.zeros(2, 2))
    assert model.weight is original


def test_swap_parameters_wraps_tensors_with_requires_grad() -> None:
    model = torch.nn.Linear(2, 2)
    with swap_parameters(model, {"weight": torch.ones(2, 2)}, requires_grad=True):
        assert model.weight.requires_grad


class Marker(ModelPatch):
    def __init__(self, name: str) -> None:
        self.key = f"test.marker:{name}"


class Other(ModelPatch):
    key = "test.other"


def test_applied_patch_and_patches_of_on_a_handle() -> None:
    first, second = Marker("a"), Marker("b")
    handle = ModelHandle.from_module(torch.nn.Linear(2, 2)).with_patch(Other()).with_patch(first).with_patch(second)
    assert applied_patch(handle, Marker) is first  # the outermost
    assert applied_patch(handle, FunctionPatch) is None
    assert patches_of(handle, Marker) == [first, second]
    assert patches_of(handle, (Marker, Other)) == list(handle.patches)


def test_applied_patch_on_a_module_only_while_applied() -> None:
    module = torch.nn.Linear(2, 2)
    outer, inner = Marker("outer"), Marker("inner")
    assert applied_patch(module, Marker) is None
    with apply_patches([outer, Other()], module):
        assert applied_patch(module, Marker) is outer
        assert applied_patch(_Compiled(module), Marker) is outer  # through a compile wrapper
        with applying(_Compiled(module), inner):
            assert applied_patch(module, Marker) is inner  # the most recent
        assert applied_patch(module, Marker) is outer
        assert isinstance(applied_patch(module, Other), Other)
        assert applied_patch(torch.nn.Linear(2, 2), Marker) is None  # another module
    assert applied_patch(module, Marker) is None and applied_patch(module, Other) is None


def test_apply_patches_forgets_patches_after_an_error() -> None:
    module = torch.nn.Linear(2, 2)
    entered: list[str] = []

    class Failing(ModelPatch):
        key = "test.failing"

        @contextlib.contextmanager
        def apply(self, m: Any):  # type: ignore[no-untyped-def]
            entered.append("in")
            try:
                yield m
            finally:
                entered.append("out")

    with pytest.raises(RuntimeError, match="boom"), apply_patches([Failing()], module):
        raise RuntimeError("boom")
    assert entered == ["in", "out"]
    assert applied_patch(module, Failing) is None


def test_applied_patch_is_visible_across_threads() -> None:
    module = torch.nn.Linear(2, 2)
    seen: list[Any] = []
    patch = Marker("t")
    with apply_patches([patch], module):
        thread = threading.Thread(target=lambda: seen.append(applied_patch(module, Marker)))
        thread.start()
        thread.join()
    assert seen == [patch]
