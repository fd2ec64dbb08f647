"""How fast the quickstart starts and runs, imports and work measured apart, against targets.

Every measurement runs in a fresh Python process (nothing imported or cached beforehand), the
measurements alternate, and each figure is the median of ``--repeat`` rounds:

* ``--help``: ``dagfusion --help``, the whole process; target ≤ 0.3 s.
* ``process``: a fresh process that imports dagfusion and runs ``workflows/quickstart.yaml``
  once (no output cache, no run record): what a user waits for, less the progress display.
* ``startup``: in that process, importing dagfusion and making an engine (its registry).
* ``imports``: that first run less ``work`` — the modules it imports (torch, diffusers,
  transformers …) plus first-use costs; compare with ``torch floor``.
* ``work``: the same workflow run again in the same process with the model cache emptied and
  the output cache off: load + encode + sample + decode + score, nothing left to import;
  target ≤ 2 s.
* ``torch floor``: a fresh process that only imports torch (the part no change here can remove).

Torch uses ``--threads`` threads (default 1, through ``DAGFUSION_THREADS`` and
``OMP_NUM_THREADS``; ``auto`` leaves both unset). ``--busy N`` keeps N other processes spinning
on a core each during the measurements, to see how a run behaves on a loaded machine::

    python benchmarks/quickstart_speed.py [--repeat 5] [--threads 1|2|auto] [--busy 1] [--check]

With ``--check`` the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "workflows" / "quickstart.yaml"
HELP_TARGET_S = 0.3
WORK_TARGET_S = 2.0
#: Modules whose presence after a run shows it imported more than it needed.
HEAVY_EXTRAS = ("torch._dynamo", "diffusers.pipelines", "transformers.generation", "sklearn", "scipy", "pandas")

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from dagfusion import Engine, Settings
from dagfusion.events import NodeFinished
engine = Engine(settings=Settings.load({"output_dir": sys.argv[2], "cache_dir": sys.argv[3]}))
startup = time.perf_counter() - t0
before = set(sys.modules)

class Nodes:
    def __init__(self):
        self.seconds = {}
    def handle(self, event):
        if isinstance(event, NodeFinished):
            self.seconds[event.node_id] = event.seconds

def run(out):
    nodes = Nodes()
    t = time.perf_counter()
    result = engine.run(sys.argv[1], out=out, handler=nodes, use_cache=False, record=False)
    seconds = time.perf_counter() - t
    assert result.ok, result.errors
    return seconds, nodes.seconds

first, first_nodes = run(sys.argv[2] + "/first")
imported = sorted(set(sys.modules) - before)
from dagfusion.model import default_cache
default_cache().clear()
again, again_nodes = run(sys.argv[2] + "/again")
import torch
print(json.dumps({
    "startup": startup, "first": first, "work": again, "first_nodes": first_nodes, "work_nodes": again_nodes,
    "modules": imported, "torch_threads": torch.get_num_threads(),
}))
"""


@dataclass(frozen=True)
class Round:
    """One round of measurements, seconds."""

    help: float
    process: float
    startup: float
    first: float
    work: float
    torch_floor: float
    nodes: dict[str, float]
    modules: list[str]
    torch_threads: int


def child_env(threads: str, root: Path) -> dict[str, str]:
    """The environment of a measured process: ``threads`` torch threads, private cache folders."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGFUSION_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads != "auto":
        env["DAGFUSION_THREADS"] = threads
        env["OMP_NUM_THREADS"] = threads
    env["DAGFUSION_CACHE_DIR"] = str(root / "cache")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def timed(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of running ``cmd`` to completion, and its standard output."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def help_command() -> list[str]:
    """``dagfusion --help`` through the installed console script (or its equivalent)."""
    script = Path(sys.executable).parent / "dagfusion"
    if script.is_file():
        return [str(script), "--help"]
    return [sys.executable, "-c", "import sys; from dagfusion.cli import main; sys.exit(main(['--help']))"]


def measure_round(threads: str, root: Path, index: int) -> Round:
    env = child_env(threads, root)
    out = root / f"out-{index}"
    help_s, _ = timed(help_command(), env)
    process_s, stdout = timed([sys.executable, "-c", _CHILD, str(QUICKSTART), str(out), str(root / "cache")], env)
    floor_s, _ = timed([sys.executable, "-c", "import torch"], env)
    data = json.loads(stdout.strip().splitlines()[-1])
    return Round(
        help=help_s, process=process_s - data["work"], startup=data["startup"], first=data["first"], work=data["work"], torch_floor=floor_s,
        nodes=data["work_nodes"], modules=data["modules"], torch_threads=data["torch_threads"],
    )


@contextmanager
def busy(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def line(name: str, value: float, detail: str, target: float | None = None) -> tuple[str, bool]:
    verdict, met = "", True
    if target is not None:
        met = value <= target
        verdict = f"(target ≤ {target:g} s)  {'ok' if met else 'MISSED'}"
    return f"{name:12} {value:6.2f} s  {detail:64} {verdict}".rstrip(), met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", default="1", help="torch threads in the measured processes: an integer or 'auto'")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on a core each meanwhile")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if args.threads != "auto" and (not args.threads.isdigit() or int(args.threads) < 1):
        parser.error("--threads must be an integer ≥ 1 or 'auto'")
    repeat = max(1, args.repeat)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory() as tmp, busy(args.busy):
        timed([sys.executable, "-c", "import torch, diffusers, transformers"], child_env(args.threads, Path(tmp)))  # warm the file cache
        for i in range(repeat):
            rounds.append(measure_round(args.threads, Path(tmp), i))
    threads = rounds[-1].torch_threads
    print(
        f"# quickstart speed, {platform.machine()}, {os.cpu_count()} cores, torch threads {threads} "
        f"(--threads {args.threads}), {args.busy} busy, median of {repeat}"
    )
    work = median([r.work for r in rounds])
    first = median([r.first for r in rounds])
    nodes = {n: median([r.nodes.get(n, 0.0) for r in rounds]) for n in rounds[0].nodes}
    shown = ", ".join(f"{n} {s:.2f}" for n, s in sorted(nodes.items(), key=lambda kv: -kv[1])[:5])
    extras = [m for m in HEAVY_EXTRAS if m in rounds[-1].modules]
    results = [
        line("--help", median([r.help for r in rounds]), "dagfusion --help, whole process", HELP_TARGET_S),
        line("process", median([r.process for r in rounds]), "fresh process: import dagfusion, run the quickstart once"),
        line("startup", median([r.startup for r in rounds]), "import dagfusion, make an engine (registry)"),
        line("imports", first - work, f"first run {first:.2f} s less work; {len(rounds[-1].modules)} modules imported"),
        line("work", work, shown, WORK_TARGET_S),
        line("torch floor", median([r.torch_floor for r in rounds]), "fresh process: import torch only"),
    ]
    for text, _ in results:
        print(text, flush=True)
    print(f"# heavy modules the run imported: {', '.join(extras) if extras else 'none of ' + ', '.join(HEAVY_EXTRAS)}")
    missed = [text.split()[0] for text, met in results if not met]
    if missed:
        print(f"# missed: {', '.join(missed)}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
