"""The installed packages against ``constraints.txt``, the pinned environment that reproduces ``dvc.lock``.

A run made in another environment is not wrong, but its bytes differ (pyarrow writes its version into
every parquet file) and its numbers may differ in the last digits, so every MLflow run carries tags
that say which environment made it, and ``agd env --check`` tells a user why DVC reruns stages.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from agd.config import find_project_root

CONSTRAINTS_FILE = "constraints.txt"
# the packages whose versions shape the pipeline's numbers or bytes, shown first and tagged on each run
KEY_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "pyarrow",
    "aviary-models",
    "bayesian-optimization",
    "smact",
    "pymatgen",
    "chgnet",
)


@dataclass(frozen=True)
class Mismatch:
    """One pinned package installed at another version."""

    name: str
    pinned: str
    installed: str

    def __str__(self) -> str:
        return f"{self.name} {self.installed} (pinned {self.pinned})"


def read_constraints(path: str | Path) -> dict[str, Version]:
    """Canonical name -> pinned version. Every line other than a comment must be ``name==version``;
    anything else (a range, a repeat, a bad version) is an error naming the line."""
    path = Path(path)
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        name, version = name.strip(), version.strip()
        if not sep or not name or not version:
            raise ValueError(f"{path.name} line {number}: {raw!r} is not an exact pin name==version")
        key = canonicalize_name(name)
        if key in pins:
            raise ValueError(f"{path.name} line {number}: {name} is pinned twice")
        try:
            pins[key] = Version(version)
        except InvalidVersion:
            raise ValueError(f"{path.name} line {number}: {version!r} is not a version") from None
    return pins


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution this interpreter sees (first one wins, as
    Python's import system does)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def _same(pinned: Version, installed: str) -> bool:
    try:
        have = Version(installed)
    except InvalidVersion:
        return False
    # a pin without a local label (torch==2.13.0) admits any build of that release (2.13.0+cpu), as pip does
    return have == pinned if pinned.local else have.public == pinned.public


def mismatches(pins: dict[str, Version], installed: dict[str, str] | None = None) -> list[Mismatch]:
    """The pinned packages installed at another version, key packages first. A pinned package that is
    not installed is no mismatch: constraints bound what gets installed, they do not ask for it."""
    installed = installed_versions() if installed is None else installed
    out = [
        Mismatch(name, str(version), installed[name])
        for name, version in pins.items()
        if name in installed and not _same(version, installed[name])
    ]
    order = {name: i for i, name in enumerate(KEY_PACKAGES)}
    return sorted(out, key=lambda m: (order.get(m.name, len(order)), m.name))


def constraints_path(root: Path | None = None) -> Path:
    return (root or find_project_root()) / CONSTRAINTS_FILE


def constraints_status(path: Path | None = None, installed: dict[str, str] | None = None) -> str:
    """One line: 'match', 'N differ: ...' (the first five named), or why there is nothing to compare."""
    path = constraints_path() if path is None else path
    if not path.is_file():
        return f"no {path.name} at {path.parent}"
    try:
        pins = read_constraints(path)
    except ValueError as exc:
        return f"unreadable: {exc}"
    found = mismatches(pins, installed)
    if not found:
        return "match"
    named = ", ".join(str(m) for m in found[:5])
    more = f", and {len(found) - 5} more" if len(found) > 5 else ""
    return f"{len(found)} differ: {named}{more}"


@lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    """MLflow tags naming the environment of this process: Python, the key packages, and whether the
    installed packages are those of constraints.txt."""
    installed = installed_versions()
    tags = {"agd.env.python": platform.python_version(), "agd.env.platform": platform.machine()}
    for name in KEY_PACKAGES:
        tags[f"agd.env.{name}"] = installed.get(canonicalize_name(name), "not installed")
    tags["agd.env.constraints"] = constraints_status(installed=installed)
    return tags
