"""Copy the pinned third-party browser assets from ``ui/node_modules`` into ``ui/static/vendor``.

Run after ``npm ci`` in ``ui/`` (``make setup`` does both). The versions come from
``package-lock.json``; nothing is downloaded here and nothing is loaded from a CDN at run time:
the canvas serves these files itself, and wheels include them as package data. The vendor
folder is not committed (``ui/.gitignore``). ``python ui/build_assets.py --check`` only reports
whether the folder is complete and matches the lock file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
VENDOR = HERE / "static" / "vendor"

#: (npm package, file inside it, name in the vendor folder)
ASSETS = (
    ("litegraph.js", "build/litegraph.core.js", "litegraph.core.js"),
    ("litegraph.js", "css/litegraph.css", "litegraph.css"),
    ("litegraph.js", "LICENSE", "litegraph.LICENSE"),
)
MANIFEST = "manifest.json"


def locked_versions() -> dict[str, str]:
    """``{package: version}`` pinned by ``package-lock.json``."""
    lock = json.loads((HERE / "package-lock.json").read_text(encoding="utf-8"))
    packages = lock.get("packages", {})
    return {name.removeprefix("node_modules/"): info["version"] for name, info in packages.items() if name.startswith("node_modules/")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check() -> list[str]:
    """What is missing or stale in the vendor folder (empty when it is ready)."""
    problems = []
    manifest_path = VENDOR / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: run `npm ci` in ui/ and `python ui/build_assets.py`"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    versions = locked_versions()
    for package, _, name in ASSETS:
        target = VENDOR / name
        entry = manifest.get("files", {}).get(name)
        if not target.is_file() or entry is None:
            problems.append(f"{target} is missing")
        elif entry.get("version") != versions.get(package):
            problems.append(f"{name} is {package} {entry.get('version')}, the lock file pins {versions.get(package)}")
        elif entry.get("sha256") != _sha256(target):
            problems.append(f"{name} differs from what was copied")
    return problems


def build() -> None:
    versions = locked_versions()
    VENDOR.mkdir(parents=True, exist_ok=True)
    files = {}
    for package, source, name in ASSETS:
        package_dir = NODE_MODULES / package
        installed = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))["version"]
        if installed != versions.get(package):
            raise SystemExit(f"node_modules has {package} {installed}, the lock file pins {versions.get(package)}: run `npm ci` in ui/")
        target = VENDOR / name
        shutil.copyfile(package_dir / source, target)
        files[name] = {"package": package, "version": installed, "source": source, "sha256": _sha256(target)}
    (VENDOR / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if not (NODE_MODULES / "litegraph.js").is_dir():
        print("ui/node_modules is missing: run `npm ci` in ui/ first", file=sys.stderr)
        return 1
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
