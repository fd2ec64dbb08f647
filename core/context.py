"""What a running node sees: :class:`RunContext` (device, progress, cancel, output folder, logger)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagfusion.errors import RunCancelled, UnsafeOperationError
from dagfusion.events import NodePreview, NodeProgress, ProgressHandler

if TYPE_CHECKING:
    from dagfusion.settings import Settings


class CancelToken:
    """A per-run flag; set it from any thread (Ctrl-C, a Cancel button) to stop the run.

    The executor checks it between nodes; long nodes call :meth:`RunContext.check_cancelled`
    every step.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise RunCancelled("the run was cancelled")


def confine(base: Path, relative: str | os.PathLike[str]) -> Path:
    """``base / relative``, refusing absolute paths and anything that escapes ``base``.

    Raises :class:`UnsafeOperationError` naming the offending path.
    """
    rel = Path(relative)
    if rel.is_absolute() or rel.drive:
        raise UnsafeOperationError(f"output path {str(relative)!r} must be relative to the output directory")
    if any(part == ".." for part in rel.parts):
        raise UnsafeOperationError(f"output path {str(relative)!r} must not contain '..'")
    base_resolved = base.resolve()
    target = (base_resolved / rel).resolve()
    if target != base_resolved and base_resolved not in target.parents:
        raise UnsafeOperationError(f"output path {str(relative)!r} escapes the output directory")
    return target


def is_within(path: Path, roots: list[Path] | tuple[Path, ...]) -> bool:
    """Whether ``path`` (resolved) lies in one of ``roots``."""
    resolved = path.resolve()
    for root in roots:
        root = root.resolve()
        if resolved == root or root in resolved.parents:
            return True
    return False


@dataclass
class RunContext:
    """Passed to every node's run function as its first argument.

    Attributes:
        node_id: The id of the node being run (for messages).
        run_id: The id of the whole run.
        settings: The run's settings (read only; a workflow can never change them).
        output_dir: The run's output folder; write files only through :meth:`output_path`.
        cancel_token: The run's cancel token.
        logger: A logger for node messages.
        provenance: ``{"workflow": resolved YAML text, "manifest": dict}`` of the run, for
            nodes that embed it in what they save (PNG text chunks).
    """

    node_id: str
    run_id: str
    settings: Settings
    output_dir: Path
    cancel_token: CancelToken
    handler: ProgressHandler | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("dagfusion.node"))
    provenance: Mapping[str, Any] = field(default_factory=dict)
    _device: str | None = None

    @property
    def device(self) -> str:
        """The torch device to use: the settings' choice, else cuda > mps > cpu."""
        if self._device is None:
            self._device = _auto_device(self.settings.device)
        return self._device

    def progress(self, step: int, total: int | None = None, message: str = "", **values: float) -> None:
        """Check for cancellation, then report progress (``step`` of ``total``)."""
        self.cancel_token.raise_if_cancelled()
        if self.handler is not None:
            self.handler.handle(
                NodeProgress(self.run_id, node_id=self.node_id, step=step, total=total, message=message, values=values)
            )

    def preview(self, image: Any, label: str = "") -> None:
        """Show an intermediate or final picture on the canvas (ignored headless)."""
        if self.handler is not None:
            self.handler.handle(NodePreview(self.run_id, node_id=self.node_id, label=label, preview=image))

    def check_cancelled(self) -> None:
        """Raise :class:`~dagfusion.errors.RunCancelled` if the run was cancelled."""
        self.cancel_token.raise_if_cancelled()

    def output_path(self, relative: str | os.PathLike[str]) -> Path:
        """A path inside the output folder (parents created); ``../``, absolute paths and the
        run record's names (``workflow.yaml``, ``events.jsonl``, ``manifest.json``) and paths into
        the cache folder are refused."""
        from dagfusion.outdir import check_not_private, check_not_reserved

        target = confine(self.output_dir, relative)
        check_not_reserved(self.output_dir, target)
        check_not_private(target, (self.settings.cache_dir,))
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def input_path(self, path: str | os.PathLike[str]) -> Path:
        """Resolve a path to read, refusing anything outside the settings' allowed read folders."""
        return self.settings.check_readable(path)


def _auto_device(preference: str) -> str:
    if preference and preference != "auto":
        return preference
    import torch  # deferred: choosing a device is the first moment torch is needed

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
