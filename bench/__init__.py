"""Benchmarks with their own entry point (``python -m bench NAME``); ``--write`` records them in BENCHMARKS.md.

Each benchmark is a function ``BenchOptions -> Section`` registered by name in ``BENCHMARKS``; it owns
one marked section of BENCHMARKS.md, which ``write_section`` replaces (or appends) in place. A Section
carries the targets it checks (``Target``: item, target, measured, met); ``python -m bench all``
(``bench.suite``) runs every benchmark and gathers the targets in a summary section at the top.
A benchmark that cannot run here (a model or data file absent) raises ``Skipped`` with the reason.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


@dataclass(frozen=True)
class BenchOptions:
    """Options every benchmark understands; ``sizes=None`` means the benchmark's own defaults."""

    sizes: list[int] | None = None
    repeats: int = 3
    #: a smoke run: each benchmark shrinks its default sizes and slow reference work to seconds
    quick: bool = False
    #: stock ``suggest()`` calls timed per size by the acquisition benchmark (None: its default)
    stock_suggestions: int | None = None


class Skipped(SystemExit):
    """A benchmark cannot run here (a trained model or a data file is absent); the message says which.

    A SystemExit, so that ``python -m bench NAME`` stops with the message; ``python -m bench all``
    records it and goes on with the next benchmark.
    """


@dataclass(frozen=True)
class Target:
    """One target of the issue and what was measured against it; ``met`` None: not judged at these sizes."""

    item: str
    target: str
    measured: str
    met: bool | None


@dataclass
class Section:
    """A benchmark's result: a title, a markdown body, and the package versions it depends on."""

    name: str
    title: str
    body: str
    packages: list[str] = field(default_factory=list)
    #: the targets this benchmark checks, for the summary at the top of BENCHMARKS.md
    targets: list[Target] = field(default_factory=list)
    #: False for a section that measured nothing here (a summary gathered from the others)
    measured_here: bool = True

    def render(self) -> str:
        """The full markdown section: title, machine and versions, the body, and its targets as a hidden line."""
        machine = f"{machine_description(self.packages)}\n\n" if self.measured_here else ""
        text = f"## {self.title}\n\n{machine}{self.body.strip()}\n"
        if self.targets:
            # machine-readable, so that a later summary can list targets of sections it did not re-run
            payload = json.dumps([asdict(t) for t in self.targets]).replace(">", "\\u003e")
            text += f"\n<!-- bench:targets {payload} -->\n"
        return text


def _magpie(options: BenchOptions) -> Section:
    from bench.magpie import run  # imported on demand: heavy dependencies per benchmark

    return run(options)


def _acquisition(options: BenchOptions) -> Section:
    from bench.acquisition import run

    return run(options)


def _validity(options: BenchOptions) -> Section:
    from bench.validity import run

    return run(options)


def _generation(options: BenchOptions) -> Section:
    from bench.generation import run

    return run(options)


def _oracle(options: BenchOptions) -> Section:
    from bench.oracle import run

    return run(options)


#: name -> benchmark; add new benchmarks here (``python -m bench all`` runs them in this order).
BENCHMARKS: dict[str, Callable[[BenchOptions], Section]] = {"magpie": _magpie, "acquisition": _acquisition}
BENCHMARKS.update(validity=_validity, generation=_generation, oracle=_oracle)


def _screening(options: BenchOptions) -> Section:
    from bench.screening import run

    return run(options)


BENCHMARKS["screening"] = _screening


def _surrogate(options: BenchOptions) -> Section:
    from bench.surrogate import run

    return run(options)


BENCHMARKS["surrogate"] = _surrogate


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


def growth_exponent(sizes: list[int], costs: list[float]) -> float:
    """Least-squares slope of log(cost) against log(size): 1 is linear growth, 2 quadratic; NaN if undefined."""
    pairs = [(n, c) for n, c in zip(sizes, costs, strict=True) if n > 0 and c > 0]
    if len({n for n, _ in pairs}) < 2:
        return float("nan")
    x, y = np.log([n for n, _ in pairs]), np.log([c for _, c in pairs])
    return float(np.polyfit(x, y, 1)[0])


def format_exponent(value: float) -> str:
    """A growth exponent for a table cell ('n/a' when it could not be fitted)."""
    return "n/a" if value != value else f"{value:.2f}"


def _status_mib(field_name: str) -> float | None:
    """A memory figure (kB in /proc/self/status, e.g. VmHWM or VmRSS) in MiB; None where /proc is absent."""
    try:
        match = re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


@dataclass(frozen=True)
class RssPeak:
    """Resident set size (MiB) when a run started and its high-water mark while it ran."""

    start: float
    peak: float
    isolated: bool  # False: the peak is the process's lifetime peak (the high-water mark could not be reset)


def peak_rss_mib(run: Callable[[], object]) -> tuple[object, RssPeak]:
    """Run once; return its result and the process's RSS at the start and at its peak during the run.

    Linux lets a process reset its RSS high-water mark (``/proc/self/clear_refs``), so the peak is the
    run's own; elsewhere it falls back to getrusage's lifetime peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        isolated = True
    except OSError:
        isolated = False
    start = _status_mib("VmRSS") or 0.0
    result = run()
    peak = _status_mib("VmHWM")
    if peak is None:
        import resource

        peak, isolated = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False
    return result, RssPeak(start, peak, isolated)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def read_targets(path: Path = BENCHMARKS_MD) -> dict[str, tuple[str, list[Target]]]:
    """Per section of ``path`` (file order): its "Measured ..." line and the targets recorded with it."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    found: dict[str, tuple[str, list[Target]]] = {}
    for match in re.finditer(r"<!-- bench:(\S+):begin -->(.*?)<!-- bench:\1:end -->", text, re.DOTALL):
        name, block = match.group(1), match.group(2)
        targets = [
            Target(**item)
            for line in re.findall(r"<!-- bench:targets (.*?) -->", block)
            for item in json.loads(line)
        ]
        measured = re.search(r"^Measured (.*?) on ", block, re.MULTILINE)
        found[name] = (measured.group(1) if measured else "an unknown date", targets)
    return found


def write_section(section: Section, path: Path = BENCHMARKS_MD, first: bool = False) -> None:
    """Replace this benchmark's marked section of ``path``, or add it (at the end; ``first``: before the others)."""
    begin, end = f"<!-- bench:{section.name}:begin -->", f"<!-- bench:{section.name}:end -->"
    block = f"{begin}\n{section.render()}{end}\n"
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        text = (
            "# Benchmarks\n\nWritten by `python -m bench NAME --write` (one benchmark) or `python -m bench all"
            " --write` (every one, and the summary of targets below); each benchmark owns its marked section.\n"
        )
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    elif first and "<!-- bench:" in text:
        at = text.index("<!-- bench:")
        text = text[:at] + block + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")
