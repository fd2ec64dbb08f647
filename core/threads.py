"""How many CPU threads torch computes with: the ``threads`` setting, resolved and applied.

Policy. ``threads`` is an integer ≥ 1 or ``"auto"``. ``"auto"`` takes ``OMP_NUM_THREADS`` when
the environment sets it, else half the CPUs this process may run on, at least 1 and at most
:data:`AUTO_MAX_THREADS`. Half, because a CPU count includes SMT siblings and other processes'
work: torch's intra-op threads wait for each other at every operation, so one thread that loses
its core to another process stalls them all — on a 2-core machine with one core busy, sampling
with 2 threads is several times slower than with 1, while on an idle machine the second thread
gains little for small models. Set an explicit count for a large model on a dedicated many-core
CPU.

Applying. :class:`ThreadPolicy` sets torch's intra-op threads (and its inter-op threads, which
torch allows only once per process and before any inter-op work) the first time it finds torch
imported; it never imports torch itself, so commands that need no torch stay free of it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

AUTO: Literal["auto"] = "auto"
#: The most threads ``"auto"`` chooses.
AUTO_MAX_THREADS = 4

ThreadsSetting = int | Literal["auto"]

_interop_settled = False  # torch accepts set_num_interop_threads once per process


def parse_threads(value: Any, where: str) -> ThreadsSetting:
    """``value`` as a ``threads`` setting: an integer ≥ 1 (or its decimal text) or ``"auto"``.

    :raises ValueError: anything else, the message naming ``where``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: threads must be an integer ≥ 1 or 'auto', got {value!r}")
    return value


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads(environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """The thread count ``"auto"`` means here (see the module docstring)."""
    env = os.environ if environ is None else environ
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    count = usable_cpus() if cpus is None else cpus
    return max(1, min(AUTO_MAX_THREADS, count // 2))


def resolve_threads(setting: ThreadsSetting, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> int:
    """The thread count a ``threads`` setting stands for."""
    return auto_threads(environ, cpus) if setting == AUTO else int(setting)


def apply_to_torch(torch: Any, threads: int) -> None:
    """Give the imported ``torch`` module ``threads`` intra-op threads and, if torch still
    allows it, as many inter-op threads."""
    global _interop_settled
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not _interop_settled:
        _interop_settled = True
        try:
            if torch.get_num_interop_threads() != threads:
                torch.set_num_interop_threads(threads)
        except RuntimeError:  # inter-op work already started, or someone set it before
            pass


class ThreadPolicy:
    """One run's thread policy: applied once, as soon as torch is imported.

    Call :meth:`apply_if_imported` whenever torch may have been imported since the last call
    (before each node); it costs a dictionary lookup until torch appears and nothing after.
    """

    def __init__(self, setting: ThreadsSetting) -> None:
        self.threads = resolve_threads(setting)
        self.applied = False

    def apply_if_imported(self) -> bool:
        """Apply the policy if torch is imported and it was not applied yet; whether it is applied."""
        if self.applied:
            return True
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "set_num_threads"):
            return False
        apply_to_torch(torch, self.threads)
        self.applied = True
        return True
