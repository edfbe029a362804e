"""Every registered benchmark in one run, and the summary of their targets at the top of BENCHMARKS.md.

``python -m bench all`` calls :func:`run_all`: the benchmarks run one after the other in this process,
each section is written as soon as it is done (a later failure keeps it), and a summary section
lists every target, what was measured against it and whether it was met, with each benchmark's
run time and whether it ran, was skipped (a model or data file absent) or failed.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import (
    BENCHMARKS,
    BenchOptions,
    Section,
    Skipped,
    Target,
    markdown_table,
    read_targets,
    write_section,
)

SUMMARY = "summary"


@dataclass
class Outcome:
    """What happened to one benchmark in a suite run."""

    name: str
    seconds: float
    section: Section | None = None
    skipped: str | None = None  # the reason it could not run here
    error: str | None = None  # the exception it raised

    @property
    def status(self) -> str:
        """'ok', 'skipped: ...' or 'failed: ...' for the summary table."""
        if self.section is not None:
            return "ok"
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        return f"failed: {self.error}"


def suite_options(quick: bool, repeats: int | None) -> BenchOptions:
    """Options for a suite run: one stock suggest() per size; ``quick``: smoke sizes and one repeat."""
    return BenchOptions(repeats=repeats or (1 if quick else 3), quick=quick, stock_suggestions=1)


def run_all(
    options: BenchOptions,
    names: Sequence[str] | None = None,
    write_to: Path | None = None,
    benchmarks: dict[str, Callable[[BenchOptions], Section]] | None = None,
    echo: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run the named benchmarks (default: all registered) in order; write sections and summary to ``write_to``."""
    registry = BENCHMARKS if benchmarks is None else benchmarks
    chosen = list(registry) if names is None else list(names)
    unknown = [name for name in chosen if name not in registry]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(registry)}")
    outcomes = []
    started = time.perf_counter()
    for name in chosen:
        echo(f"== {name} ==")
        t0 = time.perf_counter()
        try:
            section = registry[name](options)
        except Skipped as exc:
            outcome = Outcome(name, time.perf_counter() - t0, skipped=str(exc.code))
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others' figures
            echo(traceback.format_exc())
            outcome = Outcome(name, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        else:
            outcome = Outcome(name, time.perf_counter() - t0, section=section)
            echo(section.render())
            if write_to is not None:
                write_section(section, write_to)
        echo(f"{name}: {outcome.status} ({outcome.seconds:.0f} s)")
        outcomes.append(outcome)
    earlier = read_targets(write_to) if write_to is not None else {}
    earlier.pop(SUMMARY, None)
    summary = summary_section(outcomes, options, time.perf_counter() - started, earlier, write_to is not None)
    echo(summary.render())
    if write_to is not None:
        write_section(summary, write_to, first=True)
    return outcomes


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def _target_rows(
    fresh: dict[str, list[Target]], earlier: dict[str, tuple[str, list[Target]]] | None
) -> list[list[str]]:
    """One row per target: this run's first, then those of the sections it did not replace, dated."""
    rows = [
        [name, t.item, t.target, t.measured, _met(t.met)] for name, targets in fresh.items() for t in targets
    ]
    for name, (when, targets) in (earlier or {}).items():
        if name not in fresh:
            rows += [[f"{name} ({when})", t.item, t.target, t.measured, _met(t.met)] for t in targets]
    return rows


def _targets_table(rows: list[list[str]]) -> tuple[str, str]:
    """The count of judged targets met, and the table itself."""
    judged = [row for row in rows if row[4] != "—"]
    met = sum(row[4] == "yes" for row in judged)
    table = (
        markdown_table(["benchmark", "item", "target", "measured", "met"], rows)
        if rows
        else "No benchmark reported a target."
    )
    return f"{met} of {len(judged)} judged targets met", table


def summary_section(
    outcomes: Sequence[Outcome],
    options: BenchOptions,
    seconds: float,
    earlier: dict[str, tuple[str, list[Target]]] | None = None,
    written: bool = True,
) -> Section:
    """Every target with what was measured, and each benchmark's run time and status.

    ``earlier`` (``read_targets`` of BENCHMARKS.md) supplies the targets of sections that this run did
    not produce (left out with ``--only``, skipped or failed): their figures stay in the file, so the
    summary lists them too, marked with the date they were measured.
    """
    fresh = {o.name: o.section.targets for o in outcomes if o.section is not None}
    count, table = _targets_table(_target_rows(fresh, earlier))
    run_rows = [[o.name, f"{o.seconds:,.0f}", o.status] for o in outcomes]
    kind = "a smoke run (`--quick`: small sizes)" if options.quick else "a full run"
    command = "python -m bench all" + (" --quick" if options.quick else "")
    if [o.name for o in outcomes] != list(BENCHMARKS):
        command += " --only " + " ".join(o.name for o in outcomes)
    body = f"""
{"Written by" if written else "Printed by"} `{command}{" --write" if written else ""}`, {kind} of
{len(outcomes)} benchmark(s), medians of {options.repeats} run(s), in {seconds / 60:.1f} minutes. Each
benchmark's own section below holds its tables, sizes and growth with size; this table gathers their
targets ({count}; "—": no target set, or not judged at the sizes run;
a date after the benchmark's name: a section this run did not replace, measured then).

{table}

{markdown_table(["benchmark", "run time s", "status"], run_rows)}
"""
    return Section(SUMMARY, "Summary: targets", body)


def gathered_summary(path: Path, written_by: str) -> Section:
    """The summary rebuilt from the targets every section of ``path`` recorded, without running anything.

    A single benchmark written with ``python -m bench NAME --write`` calls this, so the summary at the
    top never lags behind a section below it.
    """
    earlier = read_targets(path)
    earlier.pop(SUMMARY, None)
    count, table = _targets_table(_target_rows({}, earlier))
    body = f"""
Gathered by `{written_by}` from the sections below, each measured on the date after its name
(`python -m bench all --write` runs every benchmark again and times the run). This table lists their
targets ({count}; "—": no target set, or not judged at the sizes run).

{table}
"""
    return Section(SUMMARY, "Summary: targets", body, measured_here=False)
