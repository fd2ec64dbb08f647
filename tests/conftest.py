"""Shared fixtures: a registry of the built-in packs only, isolated settings and an engine."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings as hypothesis_settings

from dagfusion import Engine, Settings
from dagfusion.registry import Registry

# One intra-op thread: tests use tiny tensors, and on a small shared machine (CI has 2 cores)
# thread oversubscription makes tiny ops many times slower. Set before torch is first imported
# (tests that need no torch never import it), and again for subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)

hypothesis_settings.register_profile(
    "dagfusion",
    max_examples=int(os.environ.get("DAGFUSION_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.load_profile("dagfusion")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def registry() -> Registry:
    """Built-in packs only: installed third-party plugins never change test results."""
    return Registry.from_plugins(load_entrypoints=False)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(
        overrides={
            "output_dir": str(tmp_path / "outputs"),
            "cache_dir": str(tmp_path / "cache"),
            "read_dirs": [str(tmp_path)],
            "device": "cpu",
        },
        environ={},
    )


@pytest.fixture
def engine(registry: Registry, settings: Settings) -> Engine:
    return Engine(registry, settings)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def both_cores() -> Iterator[None]:
    """Two intra-op threads for the test (one again after it), where the machine has them: for the
    few tests that sample 48 images of a shipped model, whose ops are large enough to gain (on a
    2-core machine about 1.6x faster sampled in one batch, 1.1x one image at a time). Their
    readings were the same at either count."""
    import torch

    from dagfusion.threads import usable_cpus

    torch.set_num_threads(min(2, usable_cpus()))
    try:
        yield
    finally:
        torch.set_num_threads(1)


# --- a plugin of test nodes --------------------------------------------------------------

from typing import Any  # noqa: E402

from dagfusion import FLOAT, INT, MODULE, STRING, TENSOR, Input, Output, hookimpl, node  # noqa: E402


class Calls:
    """Counts how often each test node ran (reset per test by the fixture)."""

    counts: dict[str, int] = {}

    @classmethod
    def hit(cls, name: str) -> None:
        cls.counts[name] = cls.counts.get(name, 0) + 1


@node("test.Linear", version="1.0.0", category="test", inputs=[Input("seed", INT, 0)], outputs=[Output("module", MODULE)])
def make_linear(ctx, seed: int) -> Any:
    """A seeded torch.nn.Linear(4, 4)."""
    import torch

    Calls.hit("linear")
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 4)


@node(
    "test.DoubleWeightsInPlace",
    version="1.0.0",
    category="test",
    inputs=[Input("module", MODULE, mutates=True)],
    outputs=[Output("module", MODULE)],
)
def double_in_place(ctx, module: Any) -> Any:
    """Patch the module it receives: doubles the weights in place (declares mutates=True)."""
    import torch

    with torch.no_grad():
        module.weight.mul_(2)
    return module


@node(
    "test.SneakyPatch",
    version="1.0.0",
    category="test",
    inputs=[Input("module", MODULE)],
    outputs=[Output("module", MODULE)],
)
def sneaky_patch(ctx, module: Any) -> Any:
    """Patches its input in place without declaring it (a bug the mutation check catches)."""
    import torch

    with torch.no_grad():
        module.weight.add_(1)
    return module


@node("test.WeightSum", version="1.0.0", category="test", inputs=[Input("module", MODULE)], outputs=[Output("sum", FLOAT)])
def weight_sum(ctx, module: Any) -> float:
    """Sum of the module's weights."""
    Calls.hit("weight_sum")
    return float(module.weight.detach().sum())


@node("test.Fail", version="1.0.0", category="test", inputs=[Input("x", FLOAT, 0.0)], outputs=[Output("y", FLOAT)])
def fail(ctx, x: float) -> float:
    """Always raises ZeroDivisionError."""
    return x / 0


@node("test.Count", version="1.0.0", category="test", inputs=[Input("x", FLOAT, 0.0)], outputs=[Output("y", FLOAT)])
def count(ctx, x: float) -> float:
    """Identity that counts its calls."""
    Calls.hit("count")
    return x


@node(
    "test.Steps",
    version="1.0.0",
    category="test",
    inputs=[Input("steps", INT, 3, min=1, max=1000), Input("cancel_at", INT, -1)],
    outputs=[Output("done", INT)],
)
def steps(ctx, steps: int, cancel_at: int) -> int:
    """Reports progress per step and cancels its own run at step ``cancel_at``."""
    for i in range(steps):
        if i == cancel_at:
            ctx.cancel_token.cancel()
        ctx.progress(i + 1, steps, message="step")
    return steps


@node("test.Impure", version="1.0.0", category="test", inputs=[Input("x", FLOAT, 0.0)], outputs=[Output("y", FLOAT)], pure=False)
def impure(ctx, x: float) -> float:
    """Impure identity (as a node with side effects would be)."""
    Calls.hit("impure")
    return x


@node("test.WrongType", version="1.0.0", category="test", outputs=[Output("y", INT)])
def wrong_type(ctx) -> Any:
    """Declares INT, returns a string."""
    return "seven"


@node("test.AnyOut", version="1.0.0", category="test", inputs=[Input("value", STRING, "x")], outputs=[Output("value", "ANY")])
def any_out(ctx, value: str) -> Any:
    """Passes a string through an ANY output."""
    return value


@node(
    "test.Persisted",
    version="1.0.0",
    category="test",
    inputs=[Input("seed", INT, 0)],
    outputs=[Output("tensor", TENSOR)],
    persist=True,
)
def persisted(ctx, seed: int) -> Any:
    """Deterministic 'expensive' work whose result is kept on disk."""
    import torch

    Calls.hit("persisted")
    return torch.randn(3, generator=torch.Generator().manual_seed(seed))


class TestNodesPlugin:
    @hookimpl
    def register_nodes(self, register):
        for spec in (
            make_linear, double_in_place, sneaky_patch, weight_sum, fail, count, steps, impure,
            wrong_type, any_out, persisted,
        ):
            register(spec)


@pytest.fixture(scope="session")
def test_nodes_plugin() -> TestNodesPlugin:
    return TestNodesPlugin()


@pytest.fixture(scope="session")
def test_registry() -> Registry:
    return Registry.from_plugins(load_entrypoints=False, extra_plugins=[("testnodes", TestNodesPlugin())])


@pytest.fixture
def calls() -> type[Calls]:
    Calls.counts = {}
    return Calls


@pytest.fixture
def test_engine(test_registry: Registry, settings: Settings) -> Engine:
    return Engine(test_registry, settings)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a fresh module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def benchmark_module() -> Callable[[str], ModuleType]:
    """Loads a benchmark script as a module, for tests of benchmarks and of what they measure."""
    return load_benchmark
