"""Benchmarks with their own entry point (``python -m bench NAME``); ``--write`` records them in BENCHMARKS.md.

Each benchmark is a function ``BenchOptions -> Section`` registered by name in ``BENCHMARKS``; it owns
one marked section of BENCHMARKS.md, which ``write_section`` replaces (or appends) in place.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class BenchOptions:
    """Options every benchmark understands; ``sizes=None`` means the benchmark's own defaults."""

    sizes: list[int] | None = None
    repeats: int = 3


@dataclass
class Section:
    """A benchmark's result: a title, a markdown body, and the package versions it depends on."""

    name: str
    title: str
    body: str
    packages: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The full markdown section: title, machine and versions, then the body."""
        return f"## {self.title}\n\n{machine_description(self.packages)}\n\n{self.body.strip()}\n"


def _magpie(options: BenchOptions) -> Section:
    from bench.magpie import run  # imported on demand: heavy dependencies per benchmark

    return run(options)


def _acquisition(options: BenchOptions) -> Section:
    from bench.acquisition import run

    return run(options)


#: name -> benchmark; add new benchmarks here.
BENCHMARKS: dict[str, Callable[[BenchOptions], Section]] = {"magpie": _magpie, "acquisition": _acquisition}


def package_version(name: str) -> str:
    """Installed version of a distribution, or 'absent'."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def machine_description(packages: list[str]) -> str:
    """One markdown line on where and with what the figures were measured."""
    versions = ", ".join(f"{p} {package_version(p)}" for p in ["numpy", *packages])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews timings
    return (
        f"Measured {when} on `{platform.platform()}` ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load} at the end), Python {sys.version.split()[0]}, {versions}."
    )


@dataclass(frozen=True)
class Timing:
    """Median wall-clock and CPU seconds of repeated runs (CPU time is steadier on a busy machine)."""

    wall: float
    cpu: float


def measure(run: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> Timing:
    """Time ``run`` ``repeats`` times (``setup`` runs untimed before each); medians of wall and CPU time."""
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return Timing(statistics.median(walls), statistics.median(cpus))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(section: Section, path: Path = BENCHMARKS_MD) -> None:
    """Replace this benchmark's marked section of ``path``, or append it; other sections stay."""
    begin, end = f"<!-- bench:{section.name}:begin -->", f"<!-- bench:{section.name}:end -->"
    block = f"{begin}\n{section.render()}{end}\n"
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        text = "# Benchmarks\n\nWritten by `python -m bench NAME --write`; each benchmark owns its marked section.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")
