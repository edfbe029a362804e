"""The installed packages against ``constraints.txt``, the pinned environment that reproduces ``dvc.lock``.

A run made in another environment is not wrong, but its bytes differ (pyarrow writes its version into
every parquet file) and its numbers may differ in the last digits, so every MLflow run carries tags
that say which environment made it, and ``agd env --check`` tells a user why DVC reruns stages.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from agd.config import find_project_root

CONSTRAINTS_FILE = "constraints.txt"
# environment variables that pin torch's (ATen), MKL's and oneDNN's choice of CPU kernels, and the thread counts
KERNEL_SETTINGS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
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


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vector_isa() -> str:
    """The widest x86 vector extension this CPU reports (avx512 / avx2 / other); torch and MKL pick
    their kernels by it unless told otherwise, and different kernels round differently."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


@lru_cache(maxsize=1)
def environment_record() -> dict:
    """Where a result was made: the machine, the kernel settings that steer torch's and MKL's choice of
    code path, the key packages, and whether the installed packages are those of constraints.txt.

    The same seed gives the same bits on one machine; another CPU can take other kernels (measured:
    the oracle stage's R2 moved from 0.814 to 0.805, docs/findings.md), so metrics files carry this."""
    installed = installed_versions()
    return {
        "machine": {
            "cpu": cpu_model(),
            "vector_isa": vector_isa(),
            "cores": os.cpu_count(),
            "platform": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(),
        },
        "kernel_settings": {name: os.environ.get(name) for name in KERNEL_SETTINGS},
        "packages": {name: installed.get(canonicalize_name(name), "not installed") for name in KEY_PACKAGES},
        "constraints": constraints_status(installed=installed),
    }


def environment_tags() -> dict[str, str]:
    """MLflow tags naming the environment of this process (:func:`environment_record`, flattened)."""
    record = environment_record()
    machine = record["machine"]
    tags = {
        "agd.env.python": machine["python"],
        "agd.env.platform": machine["platform"],
        "agd.env.cpu": f"{machine['cpu']} ({machine['vector_isa']}, {machine['cores']} cores)",
    }
    tags.update({f"agd.env.{name}": version for name, version in record["packages"].items()})
    set_kernels = {k: v for k, v in record["kernel_settings"].items() if v is not None}
    tags["agd.env.kernels"] = " ".join(f"{k}={v}" for k, v in set_kernels.items()) or "native"
    tags["agd.env.constraints"] = record["constraints"]
    return tags
