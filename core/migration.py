"""Pinned node versions: accepted, migrated from an older major version, or refused."""

from __future__ import annotations

from dataclasses import replace

from dagfusion.errors import Problem
from dagfusion.node import NodeSpec
from dagfusion.registry import Registry
from dagfusion.semver import parse_version
from dagfusion.workflow import NodeInstance, Workflow


def resolve_version(
    workflow: Workflow,
    inst: NodeInstance,
    spec: NodeSpec,
    registry: Registry,
    problems: list[Problem],
    warnings: list[str],
) -> NodeInstance:
    """``inst`` at the installed version of ``spec``: the same major version is accepted as is,
    an older one is migrated through ``spec.migrations`` (with a warning), a newer one or a
    missing migration is a problem appended to ``problems`` (``inst`` then comes back unchanged)."""
    if inst.version is None:
        return inst
    line = workflow.line("nodes", inst.id, "version")
    pinned = parse_version(inst.version)
    installed = spec.parsed_version
    if pinned is None:
        problems.append(Problem("bad-version", f"version {inst.version!r} is not MAJOR.MINOR.PATCH", node=inst.id, line=line))
        return inst
    if pinned.major > installed.major or (pinned.major == installed.major and pinned > installed):
        problems.append(
            Problem(
                "version-unsatisfied",
                f"the file needs {spec.type_id} {pinned}, but {registry.origin_description(spec.type_id)} "
                f"provides {installed}; upgrade that plugin",
                node=inst.id,
                line=line,
            )
        )
        return inst
    if pinned.major == installed.major:
        return replace(inst, version=str(installed))
    inputs = dict(inst.inputs)
    for major in range(pinned.major, installed.major):
        migrate = spec.migrations.get(major)
        if migrate is None:
            problems.append(
                Problem(
                    "version-unsatisfied",
                    f"the file was written for {spec.type_id} {pinned}; installed {installed} has no migration "
                    f"from major version {major}",
                    node=inst.id,
                    line=line,
                )
            )
            return inst
        try:
            inputs = dict(migrate(dict(inputs)))
        except Exception as exc:  # a migration that cannot handle this file is a user-facing problem
            problems.append(
                Problem("migration-failed", f"migrating from {major}.x failed: {type(exc).__name__}: {exc}", node=inst.id, line=line)
            )
            return inst
    warnings.append(
        f"node '{inst.id}' ({spec.type_id}) was written for version {pinned}; its inputs were migrated to {installed}. "
        "Save the workflow to keep the upgrade."
    )
    return replace(inst, version=str(installed), inputs=inputs)
