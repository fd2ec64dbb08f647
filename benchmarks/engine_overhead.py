"""Engine overhead on large graphs of trivial nodes (printed, not asserted).

For chains and wide diamonds of 100, 1,000 and 10,000 `dagfusion.math.Add` nodes it measures,
in one process: YAML parse time, validate + plan time (parsing excluded), execution overhead
per node (first run, empty cache, no run record), and a fully cached re-run (validate, plan and
execute; every node a cache hit). Targets at 1,000 nodes: < 50 ms validate+plan, < 0.2 ms per
node, < 20 ms cached re-run; growth should be linear.

    python benchmarks/engine_overhead.py [--sizes 100 1000 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
import time
from collections.abc import Callable

from dagfusion import Engine, Settings
from dagfusion.plan import make_plan
from dagfusion.registry import Registry
from dagfusion.validate import check
from dagfusion.workflow import parse_workflow


def chain_yaml(n: int) -> str:
    lines = ["format_version: 1", "nodes:", "  n0: {type: dagfusion.math.Add, inputs: {a: 1, b: 0}}"]
    for i in range(1, n):
        lines.append(f"  n{i}: {{type: dagfusion.math.Add, inputs: {{a: {{from: n{i - 1}.sum}}, b: 1}}}}")
    return "\n".join(lines) + "\n"


def diamond_yaml(n: int) -> str:
    """One source fanning out to ~n/2 middle nodes, reduced pairwise back to one sink."""
    lines = ["format_version: 1", "nodes:", "  src: {type: dagfusion.math.Add, inputs: {a: 1, b: 0}}"]
    width = max(2, n // 2)
    level = []
    for i in range(width):
        lines.append(f"  m{i}: {{type: dagfusion.math.Add, inputs: {{a: {{from: src.sum}}, b: {i}}}}}")
        level.append(f"m{i}")
    count = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level) - 1, 2):
            name = f"r{count}"
            count += 1
            lines.append(f"  {name}: {{type: dagfusion.math.Add, inputs: {{a: {{from: {level[j]}.sum}}, b: {{from: {level[j + 1]}.sum}}}}}}")
            nxt.append(name)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return "\n".join(lines) + "\n"


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(shape: str, n: int, registry: Registry, repeat: int) -> dict[str, float]:
    text = chain_yaml(n) if shape == "chain" else diamond_yaml(n)
    parse_s = best(lambda: parse_workflow(text), repeat)
    workflow, problems = parse_workflow(text)
    assert workflow is not None and not problems
    nodes = len(workflow.nodes)

    def validate_and_plan() -> None:
        validated, probs, _ = check(workflow, registry)
        assert validated is not None, probs
        make_plan(validated, run_nonce="bench", types=registry.types)

    plan_s = best(validate_and_plan, repeat)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load({"output_dir": tmp, "cache_dir": tmp}, environ={})
        first_runs = []
        for _ in range(repeat):
            engine = Engine(registry, settings)
            gc.collect()
            validated, _, _ = check(workflow, registry)
            assert validated is not None
            t0 = time.perf_counter()
            result = engine.run(workflow, record=False, out=tmp)
            first_runs.append(time.perf_counter() - t0)
            assert result.ok and len(result.executed) == nodes
        run_s = min(first_runs)
        cached_s = best(lambda: engine.run(workflow, record=False, out=tmp), repeat)
        recorded_s = best(lambda: Engine(registry, settings).run(workflow, out=tmp), 1)
    exec_only = max(run_s - plan_s, 0.0)
    return {
        "nodes": nodes,
        "parse_ms": parse_s * 1e3,
        "validate_plan_ms": plan_s * 1e3,
        "first_run_ms": run_s * 1e3,
        "per_node_us": exec_only / nodes * 1e6,
        "cached_rerun_ms": cached_s * 1e3,
        "recorded_run_ms": recorded_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    registry = Registry.from_plugins(load_entrypoints=False)
    print(f"# engine overhead, {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    header = f"{'shape':8} {'nodes':>6} {'parse ms':>9} {'valid+plan ms':>14} {'first run ms':>13} {'per node µs':>12} {'cached ms':>10} {'recorded ms':>12}"
    print(header)
    rows = {}
    for shape in ("chain", "diamond"):
        for n in args.sizes:
            r = measure(shape, n, registry, args.repeat)
            rows[(shape, n)] = r
            print(
                f"{shape:8} {r['nodes']:>6} {r['parse_ms']:>9.1f} {r['validate_plan_ms']:>14.1f} {r['first_run_ms']:>13.1f} "
                f"{r['per_node_us']:>12.1f} {r['cached_rerun_ms']:>10.2f} {r['recorded_run_ms']:>12.1f}",
                flush=True,
            )
    sizes = sorted(args.sizes)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for shape in ("chain", "diamond"):
            a, b = rows[(shape, lo)], rows[(shape, hi)]
            scale = b["nodes"] / a["nodes"]
            print(
                f"# {shape}: {hi}/{lo} nodes = {scale:.0f}x; validate+plan grew {b['validate_plan_ms'] / a['validate_plan_ms']:.1f}x, "
                f"first run {b['first_run_ms'] / a['first_run_ms']:.1f}x (linear = {scale:.0f}x)"
            )


if __name__ == "__main__":
    main()
