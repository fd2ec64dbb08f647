"""``dagfusion tune``: search a model's accelerations through the engine's sweep machinery.

The command writes ``tune.yaml`` into its output folder — a workflow that loads the model,
samples the full run once (``dagfusion.tune.Reference``) and sweeps ``dagfusion.tune.Measure``'s
``setting`` over the search space — and runs it point by point through the engine (or every
point on Ray workers with ``--executor ray``). Measure persists its results in the disk cache,
so running the same command again resumes: measured points are read back, not sampled again.
It then writes ``results.json`` (every point), ``pareto.json``, ``plot.svg`` and ``chosen.yaml``
(the fastest point that meets the floor, as a workflow of the ordinary nodes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dagfusion.nodes.tune.measure import MAX_PROMPTS
from dagfusion.nodes.tune.space import MAX_POINTS, SettingError


def add_parser(sub: Any, settings_flags: Any) -> None:
    """Add the ``tune`` sub-command to an argparse sub-parser set (argparse only; no torch)."""
    tune = sub.add_parser("tune", help="search step counts × cache schedulers × weight formats for the fastest setting above a quality floor")
    tune.add_argument("model", help="an embedded model name (shapes-sd, shapes-dit) or a diffusers model folder")
    tune.add_argument("--floor", required=True, help="psnr=DB (against the full run) or shapeeval=POINTS (the most all-correct may drop)")
    tune.add_argument("--prompts", help=f"a text file, one tuning prompt per line (at most {MAX_PROMPTS}); default: shapes held-out captions")
    tune.add_argument("--count", type=int, default=16, help="with the default prompts: how many held-out shapes captions (default 16)")
    tune.add_argument("--calibration-prompts", help="a text file of CacheQuant calibration prompts; default: 8 shapes training captions")
    tune.add_argument("--steps", type=int, default=25, help="the full run's step count (default 25)")
    tune.add_argument("--step-counts", default="", help="step counts to search, e.g. '25,20,15' (default: steps, 0.8 and 0.6 of it)")
    tune.add_argument("--caches", default="all", help="cache schedulers: 'all' or some of none, deepcache, blockcache, cachequant")
    tune.add_argument("--quants", default="none,int8", help="weight formats: some of none, int8, int4, fp8_e4m3 (default none,int8)")
    tune.add_argument("--budget", type=int, default=64, help=f"the most points to measure (at most {MAX_POINTS})")
    tune.add_argument("--budget-seconds", type=float, default=0.0, help="start no new point after this many seconds (0: no limit)")
    tune.add_argument("--guidance", type=float, default=4.0, help="guidance scale (default 4)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64, the shapes models' size)")
    tune.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    tune.add_argument("--out", help="output folder (default: a new folder under the settings' output_dir)")
    tune.add_argument("--executor", choices=("local", "ray"), default="local", help="measure the points here (default) or on Ray workers")
    tune.add_argument("--ray-address", metavar="HOST:PORT", help="with --executor ray: a running Ray cluster")
    tune.add_argument("--ray-workers", type=int, metavar="N", help="with --executor ray: worker processes")
    settings_flags(tune)


def _lines(path: str, what: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SettingError(f"{what} {path}: no prompts (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise SettingError(f"{what} {path}: at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    return prompts


def _shapes_captions(split: str, count: int) -> list[str]:
    from dagfusion.nodes.shapes.world import scenes

    pool = [s.caption for s in scenes(split, 1)]
    step = max(1, len(pool) // max(count, 1))
    return pool[::step][:count]


def model_source(text: str) -> tuple[dict[str, Any], Path]:
    """The loader node for ``text`` (an embedded name or a diffusers folder) and the folder it reads."""
    from dagfusion.nodes.shapes.models import EMBEDDED, folder

    if text in EMBEDDED:
        return {"type": "dagfusion.models.LoadEmbedded", "inputs": {"model": text}}, Path(folder(text))
    path = Path(text)
    if not (path / "model_index.json").is_file():
        raise SettingError(f"model {text!r}: expected an embedded model ({', '.join(EMBEDDED)}) or a diffusers folder "
                           "with model_index.json")
    return {"type": "dagfusion.models.LoadDiffusers", "inputs": {"path": str(path.resolve())}}, path


def folder_kind(path: Path) -> str:
    """``"unet"`` or ``"transformer"`` from a diffusers folder's model_index.json."""
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if "unet" in index:
        return "unet"
    if "transformer" in index:
        return "transformer"
    raise SettingError(f"{path}: model_index.json names neither a unet nor a transformer")


def tune_workflow(loader: dict[str, Any], settings: list[str], *, prompts: list[str], calibration: list[str], steps: int,
                  guidance: float, seed: int, resolution: int, batch_size: int, shapes: bool) -> dict[str, Any]:
    """The search as a workflow: load, reference, (ShapeEval,) measure swept over ``settings``."""
    common = {"model": {"from": "load.model"}, "clip": {"from": "load.clip"}, "vae": {"from": "load.vae"},
              "prompts": prompts, "guidance_scale": guidance, "seed": seed, "resolution": resolution, "batch_size": batch_size}
    nodes: dict[str, Any] = {
        "load": loader,
        "reference": {"type": "dagfusion.tune.Reference", "inputs": {**common, "steps": steps}},
        "measure": {"type": "dagfusion.tune.Measure",
                    "inputs": {**common, "calibration_prompts": calibration, "reference": {"from": "reference.images"},
                               "reference_macs": {"from": "reference.macs"}, "setting": settings[0]}},
    }
    if shapes:
        nodes["evaluator"] = {"type": "dagfusion.metrics.LoadShapeEval", "inputs": {}}
        nodes["measure"]["inputs"]["evaluator"] = {"from": "evaluator.evaluator"}
    return {"format_version": 1,
            "metadata": {"name": "tune", "description": f"dagfusion tune: {len(settings)} points against the full run."},
            "nodes": nodes, "outputs": ["measure.result"], "sweep": [{"measure.setting": settings}]}


def run(args: argparse.Namespace, settings: Any) -> int:
    """The command (see the module docstring); returns the exit code."""
    import yaml
    from dagfusion.engine import Engine
    from dagfusion.errors import ValidationError
    from dagfusion.nodes.tune.pareto import choose, pareto_front, parse_floor
    from dagfusion.nodes.tune.report import chosen_workflow, plot_svg
    from dagfusion.nodes.tune.space import (
        parse_ints,
        parse_list,
        parse_quants,
        search_space,
    )
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        floor = parse_floor(args.floor)
        loader, folder = model_source(args.model)
        kind = folder_kind(folder)
        shapes_prompts = args.prompts is None
        if not 1 <= args.count <= MAX_PROMPTS:
            raise SettingError(f"--count: expected 1 to {MAX_PROMPTS}, got {args.count}")
        prompts = _shapes_captions("eval", args.count) if shapes_prompts else _lines(args.prompts, "--prompts")
        calibration = (_lines(args.calibration_prompts, "--calibration-prompts") if args.calibration_prompts
                       else _shapes_captions("train", 8))
        if floor.kind == "shapeeval" and not shapes_prompts:
            raise SettingError("a shapeeval floor needs the shapes captions (leave out --prompts)")
        counts = (parse_ints(args.step_counts, "--step-counts") if args.step_counts
                  else sorted({args.steps, max(2, round(0.8 * args.steps)), max(2, round(0.6 * args.steps))}, reverse=True))
        caches = None if args.caches.strip() == "all" else parse_list(args.caches, "--caches")
        points = search_space(kind, counts, caches=caches, quants=parse_quants(args.quants, "--quants"))
        if not 1 <= args.budget <= MAX_POINTS:
            raise SettingError(f"--budget: expected 1 to {MAX_POINTS} points, got {args.budget}")
    except (SettingError, OSError) as exc:
        console.print(f"dagfusion tune: {exc}", style="red", markup=False)
        return 2
    points = points[: args.budget]
    engine = Engine(settings=settings)
    out = Path(args.out) if args.out else settings.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-tune"
    engine.check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    workflow = tune_workflow(loader, [p.setting for p in points], prompts=prompts, calibration=calibration,
                             steps=args.steps, guidance=args.guidance, seed=args.seed, resolution=args.resolution,
                             batch_size=args.batch_size, shapes=shapes_prompts)
    source = out / "tune.yaml"
    source.write_text(yaml.safe_dump(workflow, sort_keys=False, allow_unicode=True), encoding="utf-8")
    console.print(f"tune: {len(points)} points on {args.model} ({kind}), {len(prompts)} prompts, floor {floor}; "
                  f"workflow {source}", markup=False)
    try:
        results = _measure(engine, source, out, args, console, len(points))
    except ValidationError as exc:
        for problem in exc.problems:
            console.print(f"  - {problem}", style="red", markup=False)
        return 2
    if not results:
        console.print("tune: no point was measured", style="red", markup=False)
        return 1
    front = pareto_front(results, floor)
    chosen = choose(results, floor)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "pareto.json").write_text(json.dumps(front, indent=1), encoding="utf-8")
    (out / "plot.svg").write_text(plot_svg(results, front, floor, chosen, title=f"{args.model}: floor {floor}"), encoding="utf-8")
    _print_table(front, chosen)
    if chosen is None:
        console.print(f"tune: no measured point meets the floor ({floor}); see {out / 'results.json'}", markup=False)
        return 0
    chosen_yaml = chosen_workflow(chosen, loader=loader, prompt=prompts[0], calibration_prompts=calibration,
                                  guidance=args.guidance, seed=args.seed, resolution=args.resolution)
    (out / "chosen.yaml").write_text(yaml.safe_dump(chosen_yaml, sort_keys=False, allow_unicode=True), encoding="utf-8")
    console.print(f"tune: chose {chosen['label']} ({chosen['mac_speedup']}× MACs, {chosen['psnr']} dB) → {out / 'chosen.yaml'}",
                  markup=False)
    return 0


def _measure(engine: Any, source: Path, out: Path, args: argparse.Namespace, console: Any, total: int) -> list[dict[str, Any]]:
    """Run the sweep point by point (or on Ray); the measured results in point order."""
    if args.executor == "ray":
        from dagfusion.distributed.command import run_on_ray

        outcome = run_on_ray(engine, source, address=args.ray_address, workers=args.ray_workers, out=out / "points")
        measured = []
        for result in outcome.results:
            if result.ok:
                measured.append(json.loads(result.output("measure.result")))
                continue
            for error in result.errors.values():
                console.print(f"✗ {error}", style="red", markup=False)
        return measured
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    prepared = engine.prepare(source)
    began = time.perf_counter()
    results: list[dict[str, Any]] = []
    with Progress(TextColumn("[bold]tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=False) as progress:
        task = progress.add_task("", total=total)
        for point in prepared:
            if args.budget_seconds and time.perf_counter() - began > args.budget_seconds:
                console.print(f"tune: the time budget is spent; {total - len(results)} points left unmeasured "
                              "(run the same command again to go on)", markup=False)
                break
            result = engine.run_point(point, out=out / "points" / f"point-{point.index:03d}", record=False)
            if not result.ok:
                for error in result.errors.values():
                    console.print(f"✗ {error}", style="red", markup=False)
                progress.advance(task)
                continue
            measured = json.loads(result.output("measure.result"))
            cached = "measure" in result.cached
            results.append(measured)
            progress.update(task, advance=1, description=f"{measured['label']}: {measured['mac_speedup']}×, "
                                                         f"{measured['psnr']} dB ({'cached' if cached else f'{result.seconds:.1f}s'})")
    return results


def _print_table(front: list[Any], chosen: Any) -> None:
    print("| point | MAC speedup | weight bits | PSNR dB | ShapeEval drop (points) |")
    print("|---|---|---|---|---|")
    for r in front:
        mark = " (chosen)" if chosen is not None and r["setting"] == chosen["setting"] else ""
        drop = "—" if r.get("shapeeval_drop") is None else r["shapeeval_drop"]
        print(f"| {r['label']}{mark} | {r['mac_speedup']:.2f}× | {float(r['weight_bits']):.2f} | {r['psnr']} | {drop} |")
