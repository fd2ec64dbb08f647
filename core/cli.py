"""The ``dagfusion`` command line.

``dagfusion run WF.yaml|PICTURE.png [--set node.input=value]… [--out DIR] [--no-cache] [--json-events]``,
``dagfusion validate``, ``dagfusion nodes [--json]``, ``dagfusion plugins``, ``dagfusion schema``,
``dagfusion docs``, ``dagfusion inspect PICTURE.png``, ``dagfusion ui [WF.yaml|PICTURE.png]``,
``dagfusion serve``, ``dagfusion submit WF``, ``dagfusion jobs``, ``dagfusion cancel JOB`` (the job server),
``dagfusion tune MODEL --floor psnr=35`` (search accelerations; :mod:`dagfusion.nodes.tune.command`).

Exit codes: 0 ok, 1 a node failed, 2 invalid workflow or usage, 130 cancelled (Ctrl-C cancels
the run cleanly; a second Ctrl-C aborts). Importing this module, ``--help`` and ``validate``
never import torch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_CANCELLED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dagfusion",
        description="Run, check and inspect dagfusion workflows.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def settings_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--read-dir", action="append", default=[], metavar="DIR", help="also allow reading files under DIR")
        p.add_argument("--model-dir", action="append", default=[], metavar="DIR", help="also search models in DIR")
        p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (unsafe: runs code from the file)")
        p.add_argument("--device", help="torch device (default: auto, cuda > mps > cpu)")
        p.add_argument("--threads", metavar="N|auto", help="CPU threads torch computes with (default: auto, see the README)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input (value read as YAML)")

    run = sub.add_parser("run", help="run a workflow file, or the workflow embedded in a dagfusion PNG")
    run.add_argument("workflow", help="workflow YAML file or PNG written by dagfusion")
    settings_flags(run)
    run.add_argument("--out", help="output folder of the run (default: a new folder under the settings' output_dir)")
    run.add_argument("--no-cache", action="store_true", help="recompute every node (results are still cached)")
    run.add_argument("--json-events", action="store_true", help="print events as JSON lines instead of progress bars")
    run.add_argument("--target", action="append", default=None, metavar="NODE[.OUTPUT]", help="compute only what this needs")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="run the points here (default) or on Ray workers")
    run.add_argument("--ray-address", metavar="HOST:PORT", help="with --executor ray: a running Ray cluster (default: start a local one)")
    run.add_argument("--ray-workers", type=int, metavar="N", help="with --executor ray: worker processes (default: the cluster's CPUs)")

    validate = sub.add_parser("validate", help="check a workflow and report every problem")
    validate.add_argument("workflow")
    settings_flags(validate)
    validate.add_argument("--json", action="store_true", help="print problems as JSON")

    nodes = sub.add_parser("nodes", help="list the registered node types")
    nodes.add_argument("--json", action="store_true", help="full specifications as JSON")

    plugins = sub.add_parser("plugins", help="list plugins, their versions and why any was disabled")
    plugins.add_argument("-v", "--verbose", action="store_true", help="also show the traceback of each failure")
    sub.add_parser("schema", help="print the JSON Schema of workflow files")

    docs = sub.add_parser("docs", help="write the node, type and hook reference pages")
    docs.add_argument("--out", default="docs/reference", help="folder to write (default docs/reference)")

    inspect_ = sub.add_parser("inspect", help="print the workflow and manifest embedded in a dagfusion PNG")
    inspect_.add_argument("picture")

    ui = sub.add_parser("ui", help="open the visual canvas (a Gradio app on 127.0.0.1, behind a per-launch token)")
    ui.add_argument("workflow", nargs="?", help="workflow YAML file or dagfusion PNG to open")
    ui.add_argument("--port", type=int, help="port to serve on (default: 7860 or the next free one)")
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1); anything but loopback needs the allow_remote setting",
    )
    ui.add_argument("--read-dir", action="append", default=[], metavar="DIR", help="also allow reading files under DIR")
    ui.add_argument("--model-dir", action="append", default=[], metavar="DIR", help="also search models in DIR")
    ui.add_argument("--device", help="torch device (default: auto, cuda > mps > cpu)")
    ui.add_argument("--threads", metavar="N|auto", help="CPU threads torch computes with (default: auto, see the README)")
    ui.add_argument("--server", metavar="URL", help="submit runs to this job server (`dagfusion serve`) instead of running them here")
    ui.add_argument("--token", help="the job server's token (default: $DAGFUSION_TOKEN, else its state folder's token file)")
    ui.add_argument(
        "--state-dir", metavar="DIR",
        help="queue folder of the runs (default: the server_dir setting; a job server running there is used instead)",
    )
    from dagfusion.server.commands import add_parsers as add_server_parsers  # argparse only

    add_server_parsers(sub)
    from dagfusion.nodes.tune.command import add_parser as add_tune_parser  # argparse only

    add_tune_parser(sub, settings_flags)
    return parser


def _version() -> str:
    from dagfusion import __version__

    return f"dagfusion {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dagfusion`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INVALID
    from dagfusion.errors import WorkflowError

    try:
        _check_plugins(args.command)
        return _COMMANDS[args.command](args)
    except WorkflowError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except BrokenPipeError:  # `dagfusion nodes | head`: the reader left; not an error
        sys.stderr.close()
        return EXIT_OK


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message, markup=False, style="red", soft_wrap=True)


def _settings(args: argparse.Namespace) -> Any:
    from dagfusion.settings import Settings

    base = Settings.load()
    changes: dict[str, Any] = {}
    if getattr(args, "read_dir", None):
        changes["read_dirs"] = [*base.read_dirs, *args.read_dir]
    if getattr(args, "model_dir", None):
        changes["model_dirs"] = [*base.model_dirs, *args.model_dir]
    if getattr(args, "allow_pickle", False):
        changes["allow_pickle"] = True
    if getattr(args, "device", None):
        changes["device"] = args.device
    if getattr(args, "threads", None):
        changes["threads"] = args.threads
    return base.with_overrides(**changes) if changes else base


def _run_settings(args: argparse.Namespace) -> Any:
    """The settings of ``dagfusion run``: with ``--out``, that folder is readable too, so a node can
    read what an earlier node of the same run wrote there (a saved LoRA or embedding)."""
    if args.out:
        args.read_dir = [*(getattr(args, "read_dir", None) or []), args.out]
    return _settings(args)


def _workflow_source(path_text: str) -> Any:
    """The path of a workflow YAML file or of a dagfusion PNG (the engine reads either)."""
    return Path(path_text)


def _print_problems(problems: Sequence[Any], source: str) -> None:
    count = len(problems)
    _err(f"{source}: {count} problem{'s' if count != 1 else ''}:")
    for problem in problems:
        _err(f"  - {problem}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from dagfusion.engine import Engine

    engine = Engine(settings=_settings(args))
    validated, problems, warnings = engine.check_source(_workflow_source(args.workflow), overrides=args.overrides)
    if args.json:
        print(json.dumps({"valid": validated is not None, "problems": [p.to_dict() for p in problems], "warnings": warnings}, indent=2))
    else:
        for warning in warnings:
            _err(f"warning: {warning}")
        if validated is None:
            _print_problems(problems, args.workflow)
        else:
            print(f"{args.workflow}: valid ({len(validated.order)} nodes)")
    return EXIT_OK if validated is not None else EXIT_INVALID


def _cmd_run(args: argparse.Namespace) -> int:
    from dagfusion.context import CancelToken
    from dagfusion.engine import Engine
    from dagfusion.errors import ValidationError

    engine = Engine(settings=_run_settings(args))
    source = _workflow_source(args.workflow)
    token = CancelToken()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum: int, frame: Any) -> None:
        if token.cancelled:
            raise KeyboardInterrupt
        token.cancel()
        _err("cancelling… (press Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, on_interrupt)
    handler = _JsonEventPrinter() if args.json_events else _RichProgress()
    try:
        with handler:
            run_sweep = _ray_sweep(engine, args) if args.executor == "ray" else engine.run_sweep
            results = run_sweep(
                source,
                overrides=args.overrides,
                out=args.out,
                handler=handler,
                cancel_token=token,
                use_cache=not args.no_cache,
                targets=args.target,
            )
    except ValidationError as exc:
        _print_problems(exc.problems, args.workflow if exc.source is None else exc.source)
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err("aborted")
        return EXIT_CANCELLED
    finally:
        signal.signal(signal.SIGINT, previous)
    if token.cancelled or any(r.status == "cancelled" for r in results):
        _err("cancelled")
        return EXIT_CANCELLED
    failed = [r for r in results if r.status == "failed"]
    if not args.json_events:
        for result in results:
            _summarize(result)
    return EXIT_FAILED if failed else EXIT_OK


def _ray_sweep(engine: Any, args: argparse.Namespace) -> Any:
    """``engine.run_sweep`` with the points run on Ray workers (``--executor ray``)."""
    from dagfusion.distributed.command import run_on_ray

    def run_sweep(source: Any, **options: Any) -> list[Any]:
        return run_on_ray(engine, source, address=args.ray_address, workers=args.ray_workers, **options).results

    return run_sweep


def _summarize(result: Any) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    status = {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(result.status, result.status)
    console.print(
        f"run {result.run_id}: {status} — {len(result.executed)} ran, {len(result.cached)} cached, "
        f"{len(result.errors)} failed, {len(result.skipped)} skipped in {result.seconds:.2f}s → {result.output_dir}"
    )
    for node_id, error in result.errors.items():
        console.print(f"[red]✗ {error}[/]")
    for node_id, because in result.skipped.items():
        console.print(f"  skipped {node_id} (because {because} failed)")


class _JsonEventPrinter:
    def __enter__(self) -> _JsonEventPrinter:
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.stdout.flush()

    def handle(self, event: Any) -> None:
        data = event.to_dict()
        data.pop("preview", None)
        print(json.dumps(data, default=str), flush=True)


class _RichProgress:
    """One bar for the run's nodes, one for the running node's steps."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.run_task: Any = None
        self.step_task: Any = None

    def __enter__(self) -> _RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def handle(self, event: Any) -> None:
        kind = event.kind
        p = self.progress
        if kind == "RunStarted":
            if self.run_task is not None:
                p.remove_task(self.run_task)
            self.run_task = p.add_task("nodes", total=len(event.nodes))
        elif kind == "NodeStarted":
            p.update(self.run_task, description=f"{event.node_id} ({event.node_type})")
        elif kind == "NodeProgress":
            if self.step_task is None:
                self.step_task = p.add_task(f"  {event.node_id}", total=event.total)
            p.update(self.step_task, completed=event.step, total=event.total, description=f"  {event.node_id} {event.message}")
        elif kind in ("NodeFinished", "NodeCached", "NodeFailed", "NodeSkipped"):
            p.advance(self.run_task)
            if self.step_task is not None:
                p.remove_task(self.step_task)
                self.step_task = None
            if kind == "NodeFailed":
                p.console.print(f"[red]✗ {event.error}[/]", highlight=False)
                p.console.print(event.traceback, markup=False, highlight=False)
        elif kind == "RunWarning":
            where = f"node '{event.node_id}': " if event.node_id else ""
            p.console.print(f"! {where}{event.message}", style="yellow", markup=False, highlight=False)


def _cmd_nodes(args: argparse.Namespace) -> int:
    from dagfusion.node import REQUIRED
    from dagfusion.registry import default_registry

    registry = default_registry()
    specs = sorted(registry, key=lambda s: s.type_id)
    if args.json:
        def default_of(i: Any) -> Any:
            return None if i.default is REQUIRED else i.default

        data = [
            {
                "type": s.type_id,
                "version": s.version,
                "category": s.category,
                "description": s.description,
                "pure": s.pure,
                "plugin": registry.origin(s.type_id),
                "inputs": [
                    {
                        "name": i.name,
                        "type": i.type_name,
                        "required": i.required,
                        "default": default_of(i),
                        "min": i.min,
                        "max": i.max,
                        "exclusive_min": i.exclusive_min,
                        "exclusive_max": i.exclusive_max,
                        "choices": list(i.choices) if i.choices is not None else None,
                        "optional": i.optional,
                        "link_only": i.link_only,
                        "description": i.description,
                        "ui": dict(i.ui),
                    }
                    for i in s.inputs
                ],
                "outputs": [{"name": o.name, "type": o.type_name, "description": o.description} for o in s.outputs],
            }
            for s in specs
        ]
        print(json.dumps(data, indent=2, default=repr))
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None)
    table.add_column("type", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("summary")
    for s in specs:
        table.add_row(s.type_id, s.version, escape(s.summary))
    Console().print(table)
    return EXIT_OK


#: Commands that load the installed plugins: each warns once about a disabled plugin.
_PLUGIN_COMMANDS = frozenset({"run", "validate", "nodes", "plugins", "schema", "ui", "serve", "tune"})


def _check_plugins(command: str) -> None:
    """Before a command that loads plugins, load them once (quietly) and, for every command but
    ``plugins`` (which lists failures itself), warn on stderr about each disabled plugin, or
    raise :class:`~dagfusion.PluginError` listing them when ``plugins_strict`` is on."""
    if command not in _PLUGIN_COMMANDS:
        return
    registry = _quiet_default_registry()
    manager = registry.plugin_manager
    if command == "plugins" or not manager.load_failures:
        return
    _raise_if_plugins_strict(manager)
    for failure in manager.load_failures:
        _err(f"warning: {failure.summary()}; see `dagfusion plugins`")


def _quiet_default_registry() -> Any:
    """The process-wide registry, built without Python warnings for disabled plugins (the CLI
    reports those itself)."""
    import warnings

    from dagfusion.plugins import PluginWarning
    from dagfusion.registry import default_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        return default_registry()


def _raise_if_plugins_strict(manager: Any) -> None:
    """:class:`~dagfusion.PluginError` with every failure when the ``plugins_strict`` setting is on."""
    from dagfusion.errors import PluginError
    from dagfusion.settings import Settings

    if manager.load_failures and Settings.load().plugins_strict:
        raise PluginError(f"{manager.failure_report()}\nplugins_strict is on: fix or uninstall these plugins")


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = _quiet_default_registry()
    for info in registry.plugin_manager.plugin_infos():
        nodes = len(registry.nodes_of(info.name))
        dist = f"{info.distribution} {info.version}" if info.distribution else "-"
        print(f"{info.name:32} {info.status:8} {dist:32} {nodes} nodes")
        if info.error:
            print(f"    {info.error}")
        if info.detail and args.verbose:
            print("      " + info.detail.rstrip().replace("\n", "\n      "))
    _raise_if_plugins_strict(registry.plugin_manager)
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from dagfusion.registry import default_registry
    from dagfusion.schema import workflow_schema

    print(json.dumps(workflow_schema(default_registry()), indent=2, default=repr))
    return EXIT_OK


def _cmd_docs(args: argparse.Namespace) -> int:
    from dagfusion.docsgen import write_docs
    from dagfusion.registry import Registry

    registry = Registry.from_plugins(load_entrypoints=False)
    for path in write_docs(Path(args.out), registry):
        print(f"wrote {path}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dagfusion.pngmeta import MANIFEST_KEY, WORKFLOW_KEY, read_png_text

    chunks = read_png_text(args.picture)
    if WORKFLOW_KEY not in chunks:
        _err(f"{args.picture}: no dagfusion workflow in this file")
        return EXIT_INVALID
    print(chunks[WORKFLOW_KEY].rstrip())
    if MANIFEST_KEY in chunks:
        print("---")
        try:
            print(json.dumps(json.loads(chunks[MANIFEST_KEY]), indent=2))
        except (ValueError, RecursionError):
            _err(f"{args.picture}: its manifest chunk is not valid JSON; shown as text")
            print(chunks[MANIFEST_KEY][:4096])
    return EXIT_OK


def _cmd_ui(args: argparse.Namespace) -> int:
    try:
        from dagfusion.ui.app import main as ui_main  # imports Gradio: only for this command
    except ImportError as exc:
        _err(f"the canvas needs the ui extra (pip install 'dagfusion[ui]'): {exc}")
        return EXIT_INVALID
    from dagfusion.engine import Engine

    return ui_main(
        args.workflow, engine=Engine(settings=_settings(args)), port=args.port, host=args.host,
        server=args.server, token=args.token, state_dir=args.state_dir,
    )


def _cmd_server(args: argparse.Namespace) -> int:
    """``serve``, ``submit``, ``jobs``, ``cancel``: the job server and its client."""
    from dagfusion.server.commands import run as run_server_command

    return run_server_command(args, _settings)


def _cmd_tune(args: argparse.Namespace) -> int:
    from dagfusion.nodes.tune.command import run as run_tune

    return run_tune(args, _settings(args))


_COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    "nodes": _cmd_nodes,
    "plugins": _cmd_plugins,
    "schema": _cmd_schema,
    "docs": _cmd_docs,
    "inspect": _cmd_inspect,
    "ui": _cmd_ui,
    "serve": _cmd_server,
    "submit": _cmd_server,
    "jobs": _cmd_server,
    "cancel": _cmd_server,
    "tune": _cmd_tune,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
