"""Engine overhead on large graphs of trivial ``dagfusion.math.Add`` nodes, against targets.

Every time includes reading and parsing the workflow file, as a user's run does. Each figure
is the median of ``--repeat`` runs, with one torch thread and a collected heap before each:

* ``1k chain``: a 1,000-node chain end to end (read + parse + validate + plan + execute, no
  run record, a fresh engine) against libyaml alone composing the same text; target ≤ 3×.
* ``re-run``: the same unchanged file run again on the same engine; target ≥ 10× cheaper
  than the first run.
* ``10k chain``: 10,000 nodes end to end; target ≤ 12× the 1,000-node time.
* ``100k validate``: reading, parsing and validating a 100,000-node chain; target ≤ 3 s.

    python benchmarks/engine_overhead.py [--repeat 5] [--check]

With ``--check`` the exit status is 1 when any target is missed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from dagfusion import Engine, Settings  # noqa: E402
from dagfusion.registry import Registry  # noqa: E402

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def chain_yaml(n: int) -> str:
    """A chain of ``n`` Add nodes, each reading the previous one's sum."""
    lines = ["format_version: 1", "nodes:", "  n0: {type: dagfusion.math.Add, inputs: {a: 1, b: 0}}"]
    for i in range(1, n):
        lines.append(f"  n{i}: {{type: dagfusion.math.Add, inputs: {{a: {{from: n{i - 1}.sum}}, b: 1}}}}")
    return "\n".join(lines) + "\n"


def median_seconds(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    at_most: bool  # True: value must be ≤ limit; False: ≥ limit
    detail: str

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        sign = "≤" if self.at_most else "≥"
        verdict = "ok" if self.met else "MISSED"
        return f"{self.name:14} {self.detail:58} {self.value:7.2f} (target {sign} {self.limit:g})  {verdict}"


class Bench:
    """Workflow files in a temporary folder and engines over one registry and settings."""

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.registry = registry
        self.settings = Settings.load({"output_dir": str(root / "out"), "cache_dir": str(root / "cache")}, environ={})
        self.out = root / "out" / "run"

    def write(self, n: int) -> tuple[Path, str]:
        text = chain_yaml(n)
        path = self.root / f"chain-{n}.yaml"
        path.write_text(text, encoding="utf-8")
        return path, text

    def engine(self) -> Engine:
        return Engine(self.registry, self.settings)

    def run(self, engine: Engine, path: Path, nodes: int) -> None:
        result = engine.run(path, record=False, out=self.out)
        assert result.ok, result.errors
        assert len(result.executed) + len(result.cached) >= 1

    def end_to_end(self, n: int, repeat: int) -> float:
        """Median seconds of a first run of an ``n``-node chain on a fresh engine."""
        path, _ = self.write(n)
        engines: list[Engine] = []
        return median_seconds(lambda: self.run(engines[-1], path, n), repeat, setup=lambda: engines.append(self.engine()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    registry = Registry.from_plugins(load_entrypoints=False)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    print(f"# engine overhead, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    repeat = max(1, args.repeat)
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), registry)

        path, text = bench.write(1000)
        compose_s = median_seconds(lambda: yaml.compose(text, Loader=_Loader), repeat)
        first_s = bench.end_to_end(1000, repeat)
        targets.append(
            Target("1k chain", first_s / compose_s, 3, True, f"end to end {first_s * 1e3:.1f} ms / libyaml compose {compose_s * 1e3:.1f} ms")
        )

        engine = bench.engine()
        bench.run(engine, path, 1000)
        rerun_s = median_seconds(lambda: bench.run(engine, path, 1000), repeat)
        targets.append(Target("re-run", first_s / rerun_s, 10, False, f"first {first_s * 1e3:.1f} ms / re-run {rerun_s * 1e3:.2f} ms"))

        big_s = bench.end_to_end(10_000, max(1, repeat // 2))
        targets.append(Target("10k chain", big_s / first_s, 12, True, f"end to end {big_s * 1e3:.0f} ms / 1k chain {first_s * 1e3:.1f} ms"))

        huge, _ = bench.write(100_000)

        def validate_huge() -> None:
            validated, problems, _ = bench.engine().check_source(huge)
            assert validated is not None, problems[:3]

        huge_s = median_seconds(validate_huge, max(1, repeat // 2))
        targets.append(Target("100k validate", huge_s, 3, True, "read + parse + validate, seconds"))

    for target in targets:
        print(target.line(), flush=True)
    missed = [t.name for t in targets if not t.met]
    if missed:
        print(f"# missed: {', '.join(missed)}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
