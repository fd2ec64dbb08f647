"""Settings: model folders, allowed read folders, output and cache folders, cache budget, opt-ins.

Sources, later ones winning: built-in defaults < a TOML settings file < environment variables
< explicit overrides (CLI flags, the Python API). A workflow file never changes settings: the
security opt-ins (pickle loading, extra read folders) exist only here.

Settings file: ``$DAGFUSION_CONFIG`` if set, else ``./dagfusion.toml`` if it exists, else
``~/.config/dagfusion/config.toml`` if it exists. Its keys are the field names below::

    model_dirs = ["~/models"]
    read_dirs = ["~/datasets"]
    output_dir = "outputs"
    cache_bytes = 8_000_000_000
    allow_pickle = false

Environment: ``DAGFUSION_MODEL_DIRS`` and ``DAGFUSION_READ_DIRS`` (``os.pathsep``-separated),
``DAGFUSION_OUTPUT_DIR``, ``DAGFUSION_CACHE_DIR``, ``DAGFUSION_CACHE_BYTES``, ``DAGFUSION_MODEL_CACHE_BYTES``,
``DAGFUSION_DEVICE``, ``DAGFUSION_ALLOW_PICKLE`` (``1``/``true``), ``DAGFUSION_MAX_IMAGE_PIXELS``,
``DAGFUSION_MAX_VIDEO_PIXELS``, ``DAGFUSION_MAX_SWEEP_POINTS``, ``DAGFUSION_ALLOW_REMOTE``, ``DAGFUSION_PLUGINS_STRICT``,
``DAGFUSION_THREADS``, ``DAGFUSION_SERVER_DIR``, ``DAGFUSION_SERVER_HISTORY_DAYS``,
``DAGFUSION_SERVER_REQUEUE_INTERRUPTED``, ``DAGFUSION_SERVER_MAX_QUEUE``, ``DAGFUSION_SERVER_CPU_JOBS``.
Environment values are checked exactly as the settings file's are.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dagfusion.context import is_within
from dagfusion.errors import UnsafeOperationError, WorkflowError

DEFAULT_CACHE_BYTES = 4 * 1024**3
DEFAULT_MODEL_CACHE_BYTES = 16 * 1024**3
#: Largest image (width × height) any decoder accepts, checked from the header before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024**2
#: Largest video (frames × width × height) any decoder accepts, checked from the header.
DEFAULT_MAX_VIDEO_PIXELS = 1024**3
#: Most runs one sweep may describe, counted from its group sizes at validation.
DEFAULT_MAX_SWEEP_POINTS = 10_000


class SettingsError(WorkflowError):
    """The settings file or an environment variable holds an invalid value."""


@dataclass(frozen=True)
class Settings:
    """Resolved settings of a process (frozen; derive changed copies with :meth:`with_overrides`).

    Attributes:
        model_dirs: Folders searched for models by name; readable.
        read_dirs: Extra folders nodes may read from (the current folder is always allowed).
        output_dir: Where runs write their output folders.
        cache_dir: Where pure ``persist`` nodes keep outputs between processes.
        cache_bytes: Byte budget of the in-memory output cache (LRU eviction beyond it).
        model_cache_bytes: Byte budget of loaded model weights shared across nodes and runs.
        device: ``"auto"`` (cuda > mps > cpu) or a torch device string.
        allow_pickle: Security opt-in: allow loading pickle-based checkpoints.
        max_image_pixels: Largest image (width × height) a decoder accepts, from its header.
        max_video_pixels: Largest video (frames × width × height) a decoder accepts.
        max_sweep_points: Most runs one sweep may expand to (checked at validation).
        allow_remote: Security opt-in: let an HTTP surface (the canvas) bind an address other
            than loopback. Requests still need the per-launch token.
        plugins_strict: Make every plugin failure an error (exit 2) instead of a warning that
            disables that plugin; for plugin authors' CI.
        threads: CPU threads torch computes with during runs: an integer ≥ 1 or ``"auto"``
            (``OMP_NUM_THREADS`` if set, else half the usable CPUs, 1 to 4; see
            :mod:`dagfusion.threads`).
        server_dir: The job server's state folder: its queue and history database, its lock
            and its access token file (readable by the user only).
        server_history_days: Days the job server keeps finished jobs' records (0: forever).
        server_requeue_interrupted: Re-queue, once, a job that was running when the job server
            stopped (the second time it is marked failed).
        server_max_queue: Most jobs waiting in the job server's queue (more are refused).
        server_cpu_jobs: Jobs the job server runs at once on the CPU (one per GPU).
        source: Where the settings came from (for ``dagfusion plugins``/diagnostics).
    """

    model_dirs: tuple[Path, ...] = ()
    read_dirs: tuple[Path, ...] = ()
    output_dir: Path = Path("outputs")
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "dagfusion")
    cache_bytes: int = DEFAULT_CACHE_BYTES
    model_cache_bytes: int = DEFAULT_MODEL_CACHE_BYTES
    device: str = "auto"
    allow_pickle: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS
    max_sweep_points: int = DEFAULT_MAX_SWEEP_POINTS
    allow_remote: bool = False
    plugins_strict: bool = False
    threads: int | str = "auto"
    server_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "state" / "dagfusion" / "server")
    server_history_days: int = 30
    server_requeue_interrupted: bool = True
    server_max_queue: int = 10_000
    server_cpu_jobs: int = 1
    source: str = "defaults"

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None) -> Settings:
        """Settings from file, environment and ``overrides`` (see the module docstring)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources = ["defaults"]
        path = _settings_file(env)
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
            values.update(_from_mapping(data, f"settings file {path}"))
            sources.append(str(path))
        env_values = _from_environment(env)
        if env_values:
            sources.append("environment")
        values.update(env_values)
        if overrides:
            values.update(_from_mapping({k: v for k, v in overrides.items() if v is not None}, "overrides"))
            sources.append("overrides")
        return cls(**values, source=" < ".join(sources))

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated like file values)."""
        return replace(self, **_from_mapping(changes, "overrides"))

    @property
    def readable_roots(self) -> tuple[Path, ...]:
        return (Path.cwd(), *self.model_dirs, *self.read_dirs, self.output_dir)

    def check_readable(self, path: str | os.PathLike[str]) -> Path:
        """The resolved path if it lies under a readable root, else :class:`UnsafeOperationError`."""
        resolved = Path(path).expanduser()
        if not resolved.is_absolute():
            resolved = Path.cwd() / resolved
        if not is_within(resolved, list(self.readable_roots)):
            roots = ", ".join(str(r) for r in self.readable_roots)
            raise UnsafeOperationError(
                f"{str(path)!r} is outside the allowed read folders ({roots}); "
                "add its folder to read_dirs in the settings or DAGFUSION_READ_DIRS"
            )
        real = resolved.resolve()
        kind = special_file_kind(real)
        if kind is not None:
            raise UnsafeOperationError(f"{str(path)!r} is a {kind}; only regular files and folders can be read")
        return real


    def check_tree_readable(self, path: str | os.PathLike[str]) -> Path:
        """Like :meth:`check_readable`, and for a folder every entry under it too: each is
        resolved (links followed) and must lie under a readable root; special files are refused.
        Opens nothing. Returns the resolved path."""
        from dagfusion.confinement import check_tree_readable

        resolved = self.check_readable(path)
        check_tree_readable(resolved, self.readable_roots)
        return resolved


def special_file_kind(path: Path) -> str | None:
    """``"FIFO"``, ``"socket"`` or ``"device"`` if ``path`` is such a file (never opened), else ``None``."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def _settings_file(env: Any) -> Path | None:
    explicit = env.get("DAGFUSION_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingsError(f"DAGFUSION_CONFIG names {path}, which is not a file")
        return path
    for candidate in (Path("dagfusion.toml"), Path.home() / ".config" / "dagfusion" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


_PATH_LISTS = {"model_dirs", "read_dirs"}
#: Integer settings: name → smallest allowed value.
_BUDGETS = {
    "cache_bytes": 0,
    "model_cache_bytes": 0,
    "max_image_pixels": 1,
    "max_video_pixels": 1,
    "max_sweep_points": 1,
    "server_history_days": 0,
    "server_max_queue": 1,
    "server_cpu_jobs": 1,
}
_PATHS = {"output_dir", "cache_dir", "server_dir"}
_KNOWN = {f.name for f in fields(Settings)} - {"source"}


def _from_mapping(data: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KNOWN:
            raise SettingsError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(_KNOWN))})")
        if key in _PATH_LISTS:
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
                raise SettingsError(f"{where}: {key} must be a list of folder paths")
            out[key] = tuple(Path(v).expanduser() for v in value)
        elif key in _PATHS:
            if not isinstance(value, (str, os.PathLike)):
                raise SettingsError(f"{where}: {key} must be a folder path")
            out[key] = Path(value).expanduser()
        elif key in _BUDGETS:
            out[key] = _budget(value, key, where)
        elif key in ("allow_pickle", "allow_remote", "plugins_strict", "server_requeue_interrupted"):
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: {key} must be true or false, got {value!r}")
            out[key] = value
        elif key == "device":
            if not isinstance(value, str):
                raise SettingsError(f"{where}: device must be a string, got {value!r}")
            out[key] = value
        elif key == "threads":
            out[key] = _threads(value, where)
    return out


def _threads(value: Any, where: str) -> int | str:
    from dagfusion.threads import parse_threads

    try:
        return parse_threads(value, where)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _budget(value: Any, key: str, where: str) -> int:
    """``value`` as an integer setting ``key``, refusing non-integers and values below its floor."""
    floor = _BUDGETS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < floor:
        kind = "a non-negative integer" if floor == 0 else f"an integer ≥ {floor}"
        raise SettingsError(f"{where}: {key} must be {kind}, got {value!r}")
    return value


def _from_environment(env: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _PATH_LISTS:
        raw = env.get(f"DAGFUSION_{key.upper()}")
        if raw:
            out[key] = tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)
    for key in _PATHS:
        raw = env.get(f"DAGFUSION_{key.upper()}")
        if raw:
            out[key] = Path(raw).expanduser()
    for key in _BUDGETS:
        name = f"DAGFUSION_{key.upper()}"
        raw = env.get(name)
        if raw:
            try:
                value = int(raw.replace("_", ""))
            except ValueError as exc:
                raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
            out[key] = _budget(value, key, name)
    raw = env.get("DAGFUSION_DEVICE")
    if raw:
        out["device"] = raw
    raw = env.get("DAGFUSION_THREADS")
    if raw:
        out["threads"] = _threads(raw, "DAGFUSION_THREADS")
    for key in ("allow_pickle", "allow_remote", "plugins_strict", "server_requeue_interrupted"):
        name = f"DAGFUSION_{key.upper()}"
        raw = env.get(name)
        if raw:
            if raw.lower() not in {"1", "true", "yes", "0", "false", "no"}:
                raise SettingsError(f"{name} must be 1/true or 0/false, got {raw!r}")
            out[key] = raw.lower() in {"1", "true", "yes"}
    return out

