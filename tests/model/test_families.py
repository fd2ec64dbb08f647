"""Denoiser families: registered through a ``register`` callback, asked newest first, idempotent."""

from __future__ import annotations

from typing import Any

import pytest

from dagfusion.model import Family, FamilyRegistry, default_families, family_for, register_family


class _Module:
    def __init__(self, kind: str) -> None:
        self.kind = kind


def _family(name: str, kind: str) -> Family:
    cls = type(f"{name.title()}Family", (Family,), {"name": name, "matches": lambda self, m: getattr(m, "kind", None) == kind})
    return cls()


def test_lookup_asks_the_most_recent_first_and_names_the_known_ones() -> None:
    registry = FamilyRegistry()
    a, b = _family("a", "x"), _family("b", "x")
    registry.register(a)
    registry.register(b)
    assert registry.names() == ["b", "a"]
    assert registry.family_for(_Module("x")) is b
    registry.register(_family("c", "x"), first=False)
    assert registry.names() == ["b", "a", "c"]
    with pytest.raises(TypeError, match=r"no sampler family handles a _Module \(known families: b, a, c\)"):
        registry.family_for(_Module("y"))


def test_a_pack_registrar_puts_its_families_first_in_its_own_order() -> None:
    registry = FamilyRegistry()
    builtin = registry.registrar()
    builtin(_family("unet", "u"))
    builtin(_family("dit", "d"))
    plugin = registry.registrar()
    plugin(_family("flux", "f"))
    plugin(_family("wan", "w"))
    assert registry.names() == ["flux", "wan", "unet", "dit"]


def test_registering_the_same_family_again_changes_nothing_and_a_clash_is_refused() -> None:
    registry = FamilyRegistry()
    family, other = _family("a", "x"), _family("b", "y")
    for _ in range(2):
        registrar = registry.registrar()
        registrar(family)
        registrar(type(other)())  # a new instance of the same class
    assert registry.names() == ["a", "b"]
    replacement = type(family)()
    registry.register(replacement, first=False)  # same class, same name: replaces it in place
    assert registry.names() == ["a", "b"] and len(registry) == 2 and registry.family_for(_Module("x")) is replacement
    with pytest.raises(ValueError, match="named 'a' is already registered"):
        registry.register(_family("a", "z"))
    with pytest.raises(TypeError, match="expected a denoiser family"):
        registry.register(object())  # type: ignore[arg-type]


def test_the_process_wide_registry_holds_the_built_in_families() -> None:
    pytest.importorskip("torch")
    from dagfusion.nodes.diffusion import register_denoiser_families
    from dagfusion.nodes.diffusion.families import BUILTIN_FAMILIES

    names = default_families().names()
    assert names[-4:] == ["unet", "dit", "pixart", "svd"]
    collected: list[Family] = []
    register_denoiser_families(collected.append)
    assert [type(f) for f in collected] == list(BUILTIN_FAMILIES)


def test_register_family_takes_precedence_until_unregistered() -> None:
    family = _family("test-only", "t")
    register_family(family)
    try:
        assert default_families().names()[0] == "test-only"
        assert family_for(_Module("t")) is family
    finally:
        assert default_families().unregister("test-only")
    assert "test-only" not in default_families().names()
    assert not default_families().unregister("test-only")


def test_family_for_finds_the_built_in_families_of_real_modules() -> None:
    pytest.importorskip("diffusers")
    from dagfusion.testing.models import dit_model, sd_handles

    assert family_for(sd_handles()["model"].denoiser).name == "unet"
    assert family_for(dit_model().denoiser).name == "dit"


def test_registering_a_pack_again_keeps_every_family_where_it_is() -> None:
    registry = FamilyRegistry()
    builtin = [_family("unet", "u"), _family("dit", "d")]
    for register in (registry.registrar(),):
        for family in builtin:
            register(family)
    registry.register(_family("mine", "m"))
    again = registry.registrar()
    for family in builtin:
        again(family)
    assert registry.names() == ["mine", "unet", "dit"]


def test_a_plugin_hook_function_registers_through_a_registrar() -> None:
    def register_denoiser_families(register: Any) -> None:  # a plugin's hook implementation
        register(_family("plugin-a", "pa"))
        register(_family("plugin-b", "pb"))

    registry = FamilyRegistry()
    registry.register(_family("builtin", "b"))
    register_denoiser_families(register=registry.registrar())
    assert registry.names() == ["plugin-a", "plugin-b", "builtin"]
