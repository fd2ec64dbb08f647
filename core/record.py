"""The run record: every run leaves ``workflow.yaml``, ``events.jsonl`` and ``manifest.json``
in its output folder, so a result can be traced to exactly what produced it."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from dagfusion.events import Event, NodePreview
from dagfusion.node import REQUIRED
from dagfusion.plan import Plan
from dagfusion.registry import Registry
from dagfusion.workflow import Link

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def manifest(plan: Plan, registry: Registry, run_id: str, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions (dagfusion, torch, diffusers, plugins), input file fingerprints and seeds."""
    from dagfusion import __version__

    seeds: dict[str, Any] = {}
    validated = plan.validated
    for node_id in plan.order:
        spec = validated.specs[node_id]
        inst = validated.workflow.nodes[node_id]
        for input_spec in spec.inputs:
            if input_spec.type_name == "SEED" or input_spec.name == "seed":
                value = inst.inputs.get(input_spec.name, input_spec.default)
                seeds[f"{node_id}.{input_spec.name}"] = str(value) if isinstance(value, Link) else (
                    None if value is REQUIRED else value
                )
    plugins = {
        info.name: {"distribution": info.distribution, "version": info.version, "status": info.status}
        for info in registry.plugin_manager.plugin_infos()
    }
    return {
        "run_id": run_id,
        "dagfusion": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "plugins": plugins,
        "nodes": {n: f"{validated.specs[n].type_id}@{validated.specs[n].version}" for n in plan.order},
        "input_files": dict(plan.path_fingerprints),
        "seeds": seeds,
        "sweep": sweep or {},
        "cache_keys": dict(plan.keys),
    }


class RunRecorder:
    """A progress handler that writes every event to ``events.jsonl`` as it happens.

    Each event is flushed to the operating system when written, so a run killed with
    ``kill -9`` keeps every event it printed; :meth:`close` also syncs the file to disk. The
    file is started anew: a later run into the same folder replaces the record.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(folder / "events.jsonl", "w", encoding="utf-8")

    def handle(self, event: Event) -> None:
        if isinstance(event, NodePreview):
            data = {"event": "NodePreview", "run_id": event.run_id, "node_id": event.node_id, "label": event.label, "time": event.time}
        else:
            data = event.to_dict()
        self._fh.write(json.dumps(data, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.flush()
        try:
            os.fsync(self._fh.fileno())
        except OSError:  # a file system without fsync still has every event written
            pass
        self._fh.close()


def write_record(folder: Path, provenance: Mapping[str, Any]) -> None:
    """Write ``workflow.yaml`` (resolved) and ``manifest.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "workflow.yaml").write_text(provenance["workflow"], encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps(provenance["manifest"], indent=2, default=str), encoding="utf-8")


class Provenance(Mapping[str, Any]):
    """``{"workflow": resolved YAML text, "manifest": dict}`` of a run, computed on first access.

    Most runs never need it unless they write a record or a node embeds it in a file, and
    dumping a large workflow costs more than running a thousand trivial nodes.
    """

    _KEYS = ("workflow", "manifest")

    def __init__(self, plan: Plan, registry: Registry, run_id: str, sweep: dict[str, Any] | None = None) -> None:
        self._plan, self._registry, self._run_id, self._sweep = plan, registry, run_id, sweep
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        if key not in self._values:
            if key == "workflow":
                self._values[key] = self._plan.validated.workflow.dump()
            else:
                self._values[key] = manifest(self._plan, self._registry, self._run_id, self._sweep)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


def provenance(plan: Plan, registry: Registry, run_id: str, sweep: dict[str, Any] | None = None) -> Provenance:
    """The resolved workflow YAML and the manifest of a run (lazily computed)."""
    return Provenance(plan, registry, run_id, sweep)
