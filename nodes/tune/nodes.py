"""The tuner's nodes: Reference and Measure (one point; what ``dagfusion tune`` sweeps) and Tune (a whole search).

Reference and Measure are pure; Measure persists its outputs in the disk cache, so a sweep over
its ``setting`` that stops half way resumes where it stopped (the reference is sampled again,
the cost of one point). Tune runs a whole search in
one node and keeps every measured point in ``<cache_dir>/tune/<key>/points.jsonl`` (the key
covers everything that determines the measurements), so running it again resumes too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dagfusion import (
    DICT,
    FLOAT,
    INT,
    LIST,
    SEED,
    STRING,
    Input,
    Output,
    RunContext,
    node,
)
from dagfusion.errors import NodeInputError, Problem
from dagfusion.nodes.cache.checks import enforce
from dagfusion.nodes.tune.measure import MAX_PROMPTS
from dagfusion.nodes.tune.space import MAX_POINTS, QUANTS, SettingError

_COLOR = "#00897b"
MAX_RESOLUTION = 2048


def _prompt_problems(values: Mapping[str, Any], name: str, required: bool = True) -> Iterator[Problem]:
    prompts = values.get(name)
    if prompts is None:
        return
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        yield Problem("bad-value", f"expected a list of prompt strings, got {type(prompts).__name__}", input=name)
    elif required and not prompts:
        yield Problem("bad-value", "expected at least one prompt, got an empty list", input=name)
    elif len(prompts) > MAX_PROMPTS:
        yield Problem("too-large", f"at most {MAX_PROMPTS} prompts per search, got {len(prompts)}", input=name)


def _common_problems(values: Mapping[str, Any]) -> Iterator[Problem]:
    yield from _prompt_problems(values, "prompts")
    yield from _prompt_problems(values, "calibration_prompts")
    resolution = values.get("resolution")
    if isinstance(resolution, int) and resolution % 8:
        yield Problem("bad-value", f"the resolution must be a multiple of 8, got {resolution}", input="resolution")


def check_measure(values: Mapping[str, Any]) -> Iterator[Problem]:
    """Measure: the prompts, the resolution and the setting text."""
    from dagfusion.nodes.tune.space import parse_setting

    yield from _common_problems(values)
    setting = values.get("setting")
    if isinstance(setting, str):
        try:
            parse_setting(setting)
        except SettingError as exc:
            yield Problem("bad-value", str(exc), input="setting")


def check_tune(values: Mapping[str, Any]) -> Iterator[Problem]:
    """Tune: the prompts, the floor, the step counts, schedulers and formats, and the space's size."""
    from dagfusion.nodes.tune.pareto import parse_floor
    from dagfusion.nodes.tune.space import parse_ints, parse_list, parse_quants

    yield from _common_problems(values)
    for name, parse in (("floor", parse_floor), ("step_counts", lambda t: parse_ints(t, "step_counts")),
                        ("caches", lambda t: parse_list(t, "caches")), ("quants", lambda t: parse_quants(t, "quants"))):
        if isinstance(values.get(name), str):
            try:
                parse(values[name])
            except SettingError as exc:
                yield Problem("bad-value", str(exc), input=name)


def _tiny() -> dict[str, Any]:
    from dagfusion.testing import models as tiny

    return tiny.sd_handles()


_MODEL_INPUTS = (
    Input("model", "MODEL", link_only=True, description="The model, as it is without acceleration."),
    Input("clip", "CLIP", link_only=True, description="Its text encoder bundle."),
    Input("vae", "VAE", link_only=True, description="Its VAE."),
)
_SAMPLING_INPUTS = (
    Input("guidance_scale", FLOAT, 7.5, min=0.0, max=100.0),
    Input("seed", SEED, 0, min=0, description="Chunk i of the prompts is sampled with seed + i (the same in every node of a search)."),
    Input("resolution", INT, 512, min=8, max=MAX_RESOLUTION),
    Input("batch_size", INT, 8, min=1, max=MAX_PROMPTS, description="Prompts sampled together."),
)
"""The inputs every tune node shares: the model's three parts, and how the prompts are sampled."""

_PROMPTS = ["a large red circle on the left on a black background", "a small blue square at the top on a white background"]


def _reference_example() -> dict[str, Any]:
    parts = _tiny()
    return {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "prompts": _PROMPTS, "steps": 4,
            "resolution": 32}


@node(
    "dagfusion.tune.Reference",
    version="1.0.0",
    category="tune",
    inputs=[
        *_MODEL_INPUTS,
        Input("prompts", LIST, description=f"The tuning prompts (at most {MAX_PROMPTS})."),
        Input("steps", INT, 25, min=1, max=1000, description="The full run's step count."),
        *_SAMPLING_INPUTS,
    ],
    outputs=[Output("images", "IMAGE", "The full run's images, one per prompt."),
             Output("macs", INT, "Denoiser multiply-accumulates of the full run (counted).")],
    examples=[_reference_example],
    ui={"color": _COLOR},
    check=_common_problems,
)
def reference_node(ctx: RunContext, model: Any, clip: Any, vae: Any, prompts: list[str], steps: int,
                   guidance_scale: float, seed: int, resolution: int, batch_size: int) -> dict[str, Any]:
    """The full run a search compares every point with: its images and its counted denoiser MACs."""
    from dagfusion.nodes.tune.measure import reference_run

    enforce(_common_problems, {"prompts": prompts, "resolution": resolution})
    images, macs = reference_run(model, clip, vae, prompts, steps=steps, guidance=guidance_scale, seed=seed,
                                 resolution=resolution, batch_size=batch_size)
    return {"images": images, "macs": int(macs)}


def _measure_example() -> dict[str, Any]:
    from dagfusion.nodes.tune.measure import reference_run

    parts = _tiny()
    images, macs = reference_run(parts["model"], parts["clip"], parts["vae"], _PROMPTS, steps=4, guidance=7.5, seed=0,
                                 resolution=32, batch_size=8)
    return {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "prompts": _PROMPTS,
            "calibration_prompts": _PROMPTS[:1], "reference": images, "reference_macs": macs,
            "setting": "steps=4 cache=deepcache:2 quant=int8", "resolution": 32}


@node(
    "dagfusion.tune.Measure",
    version="1.0.0",
    category="tune",
    inputs=[
        *_MODEL_INPUTS,
        Input("prompts", LIST, description="The tuning prompts (those of the reference)."),
        Input("calibration_prompts", LIST, description="CacheQuant calibrates on these (keep them apart from 'prompts')."),
        Input("reference", "IMAGE", link_only=True, description="dagfusion.tune.Reference's images."),
        Input("reference_macs", INT, link_only=True, description="dagfusion.tune.Reference's MACs."),
        Input("setting", STRING, "steps=25 cache=none quant=none",
              description="The point: 'steps=N cache=none|deepcache:N|blockcache:N|cachequant:N quant=none|int8|int4|fp8_e4m3'."),
        *_SAMPLING_INPUTS,
        Input("evaluator", "SHAPE_EVALUATOR", link_only=True, optional=True,
              description="ShapeEval, to score shapes-world prompts (the drop against the reference is reported)."),
    ],
    outputs=[Output("result", STRING, "The point's result as JSON: setting, label, mac_speedup, macs, weight_bits, psnr, "
                                      "ssim, shapeeval, shapeeval_drop (and full_steps for CacheQuant)."),
             Output("psnr", FLOAT, "Mean PSNR against the reference (dB)."),
             Output("mac_speedup", FLOAT, "Reference MACs over the point's."),
             Output("weight_bits", FLOAT, "Bits per denoiser parameter as stored.")],
    persist=True,
    examples=[_measure_example],
    ui={"color": _COLOR},
    check=check_measure,
)
def measure_node(ctx: RunContext, model: Any, clip: Any, vae: Any, prompts: list[str], calibration_prompts: list[str],
                 reference: Any, reference_macs: int, setting: str, guidance_scale: float, seed: int, resolution: int,
                 batch_size: int, evaluator: Any = None) -> dict[str, Any]:
    """Measure one point of a search (a step count, a cache scheduler, a weight format) against the full run.

    Sweep 'setting' over the points of a search (dagfusion tune writes such a workflow). The
    point samples the reference's prompts with the same seeds; CacheQuant calibrates on
    calibration_prompts. See docs/tune.md for what each field means.
    """
    from dagfusion.nodes.tune.measure import (
        denoiser_kind,
        measure_point,
        shapeeval_score,
    )
    from dagfusion.nodes.tune.space import CACHES, parse_setting

    enforce(check_measure, {"prompts": prompts, "calibration_prompts": calibration_prompts, "setting": setting,
                             "resolution": resolution})
    point = parse_setting(setting)
    kind = denoiser_kind(model)
    if point.cache not in CACHES[kind]:
        raise NodeInputError("setting", f"cache {point.cache!r} does not suit this {kind} denoiser; "
                                        f"expected one of {', '.join(CACHES[kind])}")
    if tuple(reference.shape[:1]) != (len(prompts),):
        raise NodeInputError("reference", f"expected {len(prompts)} images (one per prompt), got {tuple(reference.shape)}")
    result = measure_point(model, clip, vae, point, prompts=prompts, calibration_prompts=calibration_prompts,
                           reference=reference, reference_macs=reference_macs, guidance=guidance_scale, seed=seed,
                           resolution=resolution, batch_size=batch_size, evaluator=evaluator,
                           reference_shapeeval=shapeeval_score(evaluator, reference, prompts))
    return {"result": json.dumps(result), "psnr": float(result["psnr"]), "mac_speedup": float(result["mac_speedup"]),
            "weight_bits": float(result["weight_bits"])}


def _tune_example() -> dict[str, Any]:
    parts = _tiny()
    return {"model": parts["model"], "clip": parts["clip"], "vae": parts["vae"], "prompts": _PROMPTS,
            "calibration_prompts": _PROMPTS[:1], "steps": 4, "step_counts": "4", "caches": "none, deepcache",
            "quants": "none", "resolution": 32, "floor": "psnr=10"}


@node(
    "dagfusion.tune.Tune",
    version="1.0.0",
    category="tune",
    inputs=[
        *_MODEL_INPUTS,
        Input("prompts", LIST, description=f"The tuning prompts (at most {MAX_PROMPTS})."),
        Input("calibration_prompts", LIST, description="CacheQuant calibrates on these (keep them apart from 'prompts')."),
        Input("floor", STRING, "psnr=30", description="The least quality: 'psnr=DB' against the full run, or "
                                                      "'shapeeval=POINTS' (the most ShapeEval all-correct may drop)."),
        Input("steps", INT, 25, min=1, max=1000, description="The full run's step count."),
        Input("step_counts", STRING, "25, 20, 15", description="Step counts to search (comma-separated)."),
        Input("caches", STRING, "all", description="Cache schedulers to search: 'all' (those that suit the denoiser) "
                                                   "or some of none, deepcache, blockcache, cachequant."),
        Input("quants", STRING, "none, int8", description=f"Weight formats to search: some of {', '.join(QUANTS)}."),
        Input("budget", INT, 64, min=1, max=MAX_POINTS, description="The most points to measure (the space is cut to this many)."),
        *_SAMPLING_INPUTS,
        Input("evaluator", "SHAPE_EVALUATOR", link_only=True, optional=True,
              description="ShapeEval, to score shapes-world prompts (needed for a shapeeval floor)."),
    ],
    outputs=[Output("pareto", LIST, "The Pareto set (speedup, weight bits, quality), fastest first."),
             Output("chosen", DICT, "The fastest point that meets the floor (empty when none does)."),
             Output("workflow", STRING, "The chosen point as a workflow (YAML), ready for dagfusion run."),
             Output("plot", STRING, "Speedup against quality of every point, as SVG (save it with dagfusion.io.SaveText)."),
             Output("results", LIST, "Every measured point.")],
    examples=[_tune_example],
    ui={"color": _COLOR},
    check=check_tune,
)
def tune_node(ctx: RunContext, model: Any, clip: Any, vae: Any, prompts: list[str], calibration_prompts: list[str],
              floor: str, steps: int, step_counts: str, caches: str, quants: str, budget: int, guidance_scale: float,
              seed: int, resolution: int, batch_size: int, evaluator: Any = None) -> dict[str, Any]:
    """Search step counts × cache schedulers × weight formats for the fastest setting that keeps a quality floor.

    Measures every point of the space (up to 'budget' points) against the full run on the tuning
    prompts, with a progress step per point, and returns the Pareto set, the chosen point, it as
    a workflow, and a plot. Measured points are kept under the cache folder, so running the same
    search again resumes it. For sweeps on Ray, use dagfusion tune on the command line.
    """
    import yaml
    from dagfusion.fingerprint import fingerprint
    from dagfusion.nodes.tune.measure import (
        denoiser_kind,
        measure_point,
        reference_run,
        run_search,
        shapeeval_score,
    )
    from dagfusion.nodes.tune.pareto import choose, pareto_front, parse_floor
    from dagfusion.nodes.tune.report import chosen_workflow, plot_svg
    from dagfusion.nodes.tune.space import (
        parse_ints,
        parse_list,
        parse_quants,
        search_space,
    )

    values = {"prompts": prompts, "calibration_prompts": calibration_prompts, "floor": floor, "step_counts": step_counts,
              "caches": caches, "quants": quants, "resolution": resolution}
    enforce(check_tune, values)
    wanted = parse_floor(floor)
    if wanted.kind == "shapeeval" and evaluator is None:
        raise NodeInputError("evaluator", "a shapeeval floor needs a ShapeEval evaluator (dagfusion.metrics.LoadShapeEval)")
    kind = denoiser_kind(model)
    try:
        names = None if caches.strip() == "all" else parse_list(caches, "caches")
        points = search_space(kind, parse_ints(step_counts, "step_counts"), caches=names, quants=parse_quants(quants, "quants"))
    except SettingError as exc:
        raise NodeInputError("caches", str(exc)) from None
    points = points[:budget]
    images, macs = reference_run(model, clip, vae, prompts, steps=steps, guidance=guidance_scale, seed=seed,
                                 resolution=resolution, batch_size=batch_size)
    reference_score = shapeeval_score(evaluator, images, prompts)
    key = fingerprint([getattr(model, "fingerprint", repr(model)), getattr(clip, "fingerprint", repr(clip)),
                       getattr(vae, "fingerprint", repr(vae)), prompts, calibration_prompts, steps, guidance_scale,
                       seed, resolution, batch_size, fingerprint(evaluator) if evaluator is not None else None])
    store = Path(ctx.settings.cache_dir) / "tune" / str(key)[:32] / "points.jsonl"
    done = _read_points(store)

    def measure(point: Any) -> dict[str, Any]:
        ctx.check_cancelled()
        return measure_point(model, clip, vae, point, prompts=prompts, calibration_prompts=calibration_prompts,
                             reference=images, reference_macs=macs, guidance=guidance_scale, seed=seed,
                             resolution=resolution, batch_size=batch_size, evaluator=evaluator,
                             reference_shapeeval=reference_score)

    def save(result: dict[str, Any]) -> None:
        store.parent.mkdir(parents=True, exist_ok=True)
        with store.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")

    def report(done_count: int, total: int, result: dict[str, Any]) -> None:
        ctx.progress(done_count, total, message=f"{result['label']}: {result['mac_speedup']}×, {result['psnr']} dB")

    results = run_search(points, measure, done=done, on_point=report, save=save)
    front = pareto_front(results, wanted)
    chosen = choose(results, wanted)
    workflow = ""
    if chosen is not None:
        workflow = yaml.safe_dump(chosen_workflow(chosen, loader=loader_for(model), prompt=prompts[0],
                                                  calibration_prompts=calibration_prompts, guidance=guidance_scale,
                                                  seed=seed, resolution=resolution), sort_keys=False)
    plot = plot_svg(results, front, wanted, chosen, title=f"{len(results)} points, floor {wanted}")
    return {"pareto": [dict(r) for r in front], "chosen": dict(chosen or {}), "workflow": workflow, "plot": plot,
            "results": results}


def _read_points(path: Path) -> dict[str, dict[str, Any]]:
    """``{setting: result}`` of a points file (lines that do not parse are skipped)."""
    if not path.is_file():
        return {}
    done: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and "setting" in result:
            done[result["setting"]] = result
    return done


def loader_for(model: Any) -> dict[str, Any]:
    """The loader node that gives ``model`` back: the embedded model, a diffusers folder, or a placeholder path."""
    source = str(getattr(model, "info", {}).get("source", ""))
    if source.startswith("embedded:"):
        return {"type": "dagfusion.models.LoadEmbedded", "inputs": {"model": source.split(":", 1)[1]}}
    if source and not source.startswith(("in-memory", "hf:")):
        return {"type": "dagfusion.models.LoadDiffusers", "inputs": {"path": source}}
    return {"type": "dagfusion.models.LoadDiffusers", "inputs": {"path": "PATH/TO/THE/MODEL/FOLDER"}}


NODES = (reference_node, measure_node, tune_node)
