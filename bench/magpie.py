"""Magpie descriptors: agd's vectorised featurizer against matminer's ElementProperty("magpie").

Timings use real formulas from ../shared/data/mp_gap_by_composition.csv sampled with replacement.
matminer is timed on a subset (it takes about a millisecond per composition) and compared per
composition. Memory is the tracemalloc peak while streaming a million formulas through
``featurize_chunks``, once sampled with replacement from the real formulas (the parse cache
absorbs the repeats) and once as a million distinct formulas (real reduced formulas times 1, 2, 3, ...),
where every formula is parsed and the parse cache fills up.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

from agd.chem import formula as formula_module
from agd.chem.formula import counts_to_formula, parse_formula, reduce_counts
from agd.chem.magpie import MagpieFeaturizer
from bench import (
    SHARED_DATA,
    BenchOptions,
    Section,
    Skipped,
    Target,
    Timing,
    format_exponent,
    growth_exponent,
    markdown_table,
    measure,
)

DEFAULT_SIZES = [1_000, 10_000, 100_000]
MATMINER_SUBSET = 2_000
STREAM_SIZE = 1_000_000
#: ``--quick``: a smoke run of a few seconds
QUICK_SIZES = [1_000, 3_000, 10_000]
QUICK_MATMINER_SUBSET = 200
QUICK_STREAM_SIZE = 20_000
CHUNK_SIZE = 100_000
SEED = 0


def _clear_parse_cache() -> None:
    """Empty parse_formula's cache so that a run pays for parsing (private hook; no-op if renamed)."""
    getattr(getattr(formula_module, "_parse_cached", None), "cache_clear", lambda: None)()


def _parse_cache_entries() -> int:
    info = getattr(getattr(formula_module, "_parse_cached", None), "cache_info", None)
    return info().currsize if info else -1


def load_formulas() -> list[str]:
    """The distinct formula strings of the shared MP band-gap table."""
    path = SHARED_DATA / "mp_gap_by_composition.csv"
    if not path.is_file():
        raise Skipped(f"benchmark data {path} is absent (../shared/data beside the clone)")
    table = pd.read_csv(path, keep_default_na=False)  # the formula "NaN" is sodium nitride
    return list(dict.fromkeys(table["formula"]))


def sampled_stream(formulas: list[str], n: int, seed: int = SEED) -> Iterator[str]:
    """n formulas drawn with replacement, generated lazily in blocks."""
    rng = np.random.default_rng(seed)
    for first in range(0, n, CHUNK_SIZE):
        for i in rng.integers(0, len(formulas), min(CHUNK_SIZE, n - first)):
            yield formulas[i]


def distinct_bases(formulas: list[str]) -> list[tuple[tuple[str, int], ...]]:
    """The distinct reduced compositions among the formulas, as (element, count) tuples."""
    return list({tuple(reduce_counts(parse_formula(f)).items()): None for f in formulas})


def distinct_stream(bases: list[tuple[tuple[str, int], ...]], n: int) -> Iterator[str]:
    """n distinct formulas: each distinct reduced composition times 1, 2, 3, ... (never repeats)."""
    produced = 0
    multiplier = 1
    while True:
        for base in bases:
            if produced == n:
                return
            yield counts_to_formula({el: count * multiplier for el, count in base})
            produced += 1
        multiplier += 1


def _consume(featurizer: MagpieFeaturizer, stream: Iterator[str]) -> int:
    """Featurise a stream chunk by chunk, keep nothing but a count of good rows."""
    good = 0
    for result in featurizer.featurize_chunks(stream, chunk_size=CHUNK_SIZE):
        good += int(result.ok.sum())
        del result
    return good


def _stream_figures(
    featurizer: MagpieFeaturizer, make_stream: Callable[[], Iterator[str]], stream_size: int
) -> list[str]:
    """Wall time (no tracing) and tracemalloc peak (second pass) of streaming ``stream_size`` formulas."""
    generate = measure(lambda: sum(1 for _ in make_stream()), 1)
    _clear_parse_cache()
    start, cpu = time.perf_counter(), time.process_time()
    good = _consume(featurizer, make_stream())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    _clear_parse_cache()
    tracemalloc.start()
    _consume(featurizer, make_stream())
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib = 2**20
    return [
        f"{good:,}",
        f"{wall:.1f}",
        f"{cpu:.1f} ({generate.cpu:.1f} of it generating the input)",
        f"{cpu / stream_size * 1e6:.2f}",
        f"{peak / mib:.0f}",
        f"{retained / mib:.0f}",
        f"{_parse_cache_entries():,}",
    ]


def run(options: BenchOptions) -> Section:
    """Time agd and matminer on the same formulas; measure memory for a million streamed formulas."""
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition

    warnings.simplefilter("ignore")  # pymatgen warns on missing electronegativities (noble gases)
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    subset_size = QUICK_MATMINER_SUBSET if options.quick else MATMINER_SUBSET
    stream_size = QUICK_STREAM_SIZE if options.quick else STREAM_SIZE
    repeats = options.repeats
    formulas = load_formulas()
    rng = np.random.default_rng(SEED)
    ours = MagpieFeaturizer()

    # matminer on a subset, from strings and from pre-built Compositions
    reference = ElementProperty.from_preset("magpie")
    reference.set_n_jobs(1)
    subset = [formulas[i] for i in rng.integers(0, len(formulas), subset_size)]
    compositions = [Composition(f) for f in subset]
    mm_strings = measure(lambda: [reference.featurize(Composition(f)) for f in subset], repeats)
    mm_compositions = measure(lambda: [reference.featurize(c) for c in compositions], repeats)

    def row(label: str, n: int, timing: Timing, versus: Timing | None = None) -> list[str]:
        cells = [label, f"{n:,}", f"{timing.wall:.4f}", f"{timing.cpu:.4f}", f"{timing.cpu / n * 1e6:.2f}"]
        if versus is None:
            return [*cells, "", ""]
        matminer_us = versus.cpu / subset_size * 1e6
        return [*cells, f"{matminer_us:.0f}", f"{versus.cpu / subset_size / (timing.cpu / n):.0f}x"]

    rows = [
        row("matminer, formula strings", subset_size, mm_strings),
        row("matminer, pre-built Compositions", subset_size, mm_compositions),
        row(
            "agd, pre-built Compositions",
            subset_size,
            measure(lambda: ours.featurize_counts(compositions), repeats),
            mm_compositions,
        ),
    ]
    cold_costs, cold_speedups = [], []
    for n in sizes:
        sample = [formulas[i] for i in rng.integers(0, len(formulas), n)]
        parse = measure(lambda s=sample: [parse_formula(f) for f in s], repeats, setup=_clear_parse_cache)
        cold = measure(lambda s=sample: ours.featurize_formulas(s), repeats, setup=_clear_parse_cache)
        warm = measure(lambda s=sample: ours.featurize_formulas(s), repeats)
        parsed = [parse_formula(f) for f in sample]
        counts = measure(lambda p=parsed: ours.featurize_counts(p), repeats)
        cold_costs.append(cold.cpu)
        cold_speedups.append(mm_strings.cpu / subset_size / (cold.cpu / n))
        rows += [
            row("`parse_formula` alone, cold cache", n, parse),
            row("agd, formula strings, cold parse cache", n, cold, mm_strings),
            row("agd, formula strings, warm parse cache", n, warm, mm_strings),
            row("agd, parsed counts (dicts)", n, counts, mm_compositions),
        ]
    header = ["input", "n", "wall s", "CPU s", "µs / composition", "matminer µs", "speed-up"]
    timing = markdown_table(header, rows)

    bases = distinct_bases(formulas)
    sampled = _stream_figures(ours, lambda: sampled_stream(formulas, stream_size), stream_size)
    distinct = _stream_figures(ours, lambda: distinct_stream(bases, stream_size), stream_size)
    stream_rows = [
        [f"{stream_size:,} sampled with replacement", *sampled],
        [f"{stream_size:,} distinct formulas", *distinct],
    ]
    memory = markdown_table(
        [
            "stream",
            "rows ok",
            "wall s",
            "CPU s",
            "µs / formula",
            "peak MiB",
            "retained MiB",
            "parse-cache entries",
        ],
        stream_rows,
    )
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = f"""
Medians of {repeats} runs. Per-composition figures and speed-ups use CPU time, which a busy shared
machine distorts far less than wall time (both are shown). matminer is
`ElementProperty.from_preset("magpie").featurize` in one process (`n_jobs=1`) on {subset_size:,}
compositions, compared on the same kind of input: formula strings against `Composition(formula)` +
featurize, pre-parsed inputs against pre-built Compositions. "Cold" runs empty `parse_formula`'s
cache first; "warm" runs find every formula parsed already.

{timing}

How CPU time grows with n for formula strings on a cold parse cache (log-log slope over
n = {", ".join(f"{n:,}" for n in sizes)}; 1 is linear): {format_exponent(growth_exponent(list(sizes), cold_costs))}.

Streaming {stream_size:,} formulas through `featurize_chunks(chunk_size={CHUNK_SIZE:,})`, results
dropped chunk by chunk, starting from an empty parse cache. Times come from an untraced pass and
include generating the input; peak and retained memory from a second pass under `tracemalloc`.
"Retained" is what stays allocated afterwards: almost all of it `parse_formula`'s LRU cache (up to
{formula_module._parse_cached.cache_parameters()["maxsize"]:,} entries), which belongs to the parser, not the featurizer; peak minus retained is roughly
the featurizer's working set (one chunk's 132-column float64 output is {CHUNK_SIZE * 132 * 8 / 2**20:.0f} MiB).
Process peak RSS over the whole benchmark, tracemalloc's own bookkeeping included: {max_rss:.0f} MiB.

{memory}
"""
    targets = [
        Target(
            "Magpie: speed-up over matminer per composition (formula strings, cold parse cache)",
            ">= 100x",
            f"{min(cold_speedups):.0f}x (lowest over n = {', '.join(f'{n:,}' for n in sizes)})",
            min(cold_speedups) >= 100,
        )
    ]
    return Section(
        "magpie", "Magpie descriptors (`agd.chem.magpie`)", body, ["matminer", "pymatgen"], targets
    )
