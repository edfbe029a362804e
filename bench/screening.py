"""Streaming screen of a million generated formulas (issue 7): wall time, peak memory, where time goes.

The candidate file is synthetic but made only of real generated formulas: the GAN's own sample stream
rebuilt from ``data/generated/candidates.parquet`` (each unique candidate repeated ``n_sampled`` times,
963,343 rows), topped up to 1,180,000 by drawing candidates in proportion to ``n_sampled``, then
shuffled with a fixed seed; smaller sizes are prefixes of it. Rows keep their ``valid`` and ``novel``
flags; every row is screened (no filter). The file is cached in ``bench/.cache`` (gitignored; set
``AGD_BENCH_CACHE`` to put it elsewhere).

Each size runs :func:`agd.screening.stream.stream_screen` with the deployed forest of
``models/oracle`` in a fresh subprocess, so its peak RSS (``VmHWM`` of that process) is the whole
job's: interpreter, model, parse cache and one chunk. Wall time is the subprocess's, model loading
included; the phases are timed inside the stream. Forest prediction alone is timed separately on
featurised rows: scikit-learn's ``forest.predict`` against the stream's float32, threaded running-sum
predictor (which also gives the tree spread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO_ROOT, BenchOptions, Section, Skipped, Target, markdown_table

DEFAULT_SIZES = [118_000, 590_000, 1_180_000]
QUICK_SIZES = [20_000, 60_000]
CHUNK_SIZE = 50_000
PREDICT_ROWS = 100_000
SEED = 0
TARGET_ROWS = 1_180_000
TARGET_SECONDS = 120.0
TARGET_GIB = 4.0
CANDIDATES = REPO_ROOT / "data" / "generated" / "candidates.parquet"
FOREST = REPO_ROOT / "models" / "oracle" / "deployed" / "forest.joblib"


def cache_dir() -> Path:
    """Where the synthetic candidate files live (``AGD_BENCH_CACHE`` or ``bench/.cache``)."""
    path = Path(os.environ.get("AGD_BENCH_CACHE") or REPO_ROOT / "bench" / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_tag(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def stream_index(weights, n: int, seed: int = SEED):
    """Row numbers of the rebuilt sample stream: each candidate ``weights[i]`` times, topped up to at least
    ``TARGET_ROWS`` by draws in proportion to the weights, shuffled; its first ``n`` entries."""
    import numpy as np

    weights = np.asarray(weights, dtype=np.int64)
    full_n = max(n, TARGET_ROWS)
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(len(weights)), weights)
    if len(index) < full_n:
        extra = rng.choice(len(weights), full_n - len(index), p=weights / weights.sum())
        index = np.concatenate([index, extra])
    # the whole stream is always drawn, so a smaller size is a prefix of a larger one
    return rng.permutation(index)[:n]


def synthetic_candidates(n: int, source: Path | None = None, seed: int = SEED) -> Path:
    """A cached parquet of the first ``n`` rows of the sample stream rebuilt from ``source``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = source or CANDIDATES
    path = cache_dir() / f"stream-{n}-seed{seed}-{_source_tag(source)}.parquet"
    if not path.is_file():
        table = pq.read_table(source, columns=["formula", "reduced_formula", "valid", "novel", "n_sampled"])
        index = stream_index(table["n_sampled"].to_numpy(), n, seed)
        rows = table.select(["formula", "reduced_formula", "valid", "novel"]).take(pa.array(index))
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(rows, tmp, row_group_size=100_000)
        os.replace(tmp, path)
    return path


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def _run_child(*args: str) -> tuple[dict, float]:
    """Run this module's child mode; its JSON report and the subprocess's wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.screening", *args],
        cwd=REPO_ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def _child_screen(forest: str, candidates: str, out: str, chunk_size: int, jobs: int | None) -> dict:
    from agd.screening.stream import load_screening_model, stream_screen

    t0 = time.perf_counter()
    model = load_screening_model(forest, "forest", n_jobs=jobs)
    load = time.perf_counter() - t0
    result = stream_screen(candidates, model, out, chunk_size=chunk_size, progress=False)
    report = result.to_dict()
    report.update(
        load_seconds=load,
        n_jobs=model.n_jobs,
        maxrss_mib=_peak_rss_mib(),
    )
    return report


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    ``VmHWM`` belongs to the process's own address space. ``ru_maxrss`` does not: Linux carries the
    parent's peak across fork and exec, so a child of a large process (``python -m bench all`` after
    the oracle benchmark, about 1.5 GiB) would report the parent's figure.
    """
    import resource

    from bench import _status_mib

    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_predict(forest_path: str, candidates: str, rows: int, jobs: int | None) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from agd.screening.stream import forest_mean_std, load_screening_model

    model = load_screening_model(forest_path, "forest", n_jobs=jobs)
    formulas = pq.read_table(candidates, columns=["formula"]).slice(0, rows)["formula"].to_pylist()
    (ok_rows, features32), _ = model.featurise(formulas)
    features64 = features32.astype(np.float64)
    forest = model.model.forest
    forest.n_jobs = model.n_jobs
    timings = {}
    for label, call in (
        ("sklearn forest.predict (float64 in)", lambda: forest.predict(features64)),
        ("stream: float32, running mean + std", lambda: forest_mean_std(forest, features32, model.n_jobs)),
    ):
        t0 = time.perf_counter()
        call()
        timings[label] = time.perf_counter() - t0
    return {
        "rows": len(ok_rows),
        "trees": len(forest.estimators_),
        "n_jobs": model.n_jobs,
        "seconds": timings,
    }


def run(options: BenchOptions) -> Section:
    """Screen 118k / 590k / 1.18M generated formulas with the deployed forest, one subprocess per size."""
    for path, what in (
        (CANDIDATES, "`agd generate` output"),
        (FOREST, "deployed forest (`agd train oracle`)"),
    ):
        if not path.is_file():
            raise Skipped(f"screening benchmark: {path} ({what}) is absent")
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    t0 = time.perf_counter()
    files = {n: synthetic_candidates(n) for n in sizes}
    build = time.perf_counter() - t0
    out_dir = cache_dir() / "out"
    rows, phase_rows, results = [], [], {}
    for n in sizes:
        report, wall = _run_child(
            "screen", str(FOREST), str(files[n]), str(out_dir / f"hits-{n}.parquet"), str(CHUNK_SIZE)
        )
        results[n] = (report, wall)
        t = report["timings"]
        hits = ", ".join(f"{k} {v:,}" for k, v in report["counts"].items())
        rows.append(
            [
                f"{n:,}",
                f"{wall:.1f}",
                f"{t['total']:.1f}",
                f"{n / t['total']:,.0f}",
                f"{report['maxrss_mib'] / 1024:.2f}",
                hits,
                f"{report['n_rejected']:,}",
            ]
        )
        other = wall - sum(t[p] for p in ("read", "featurise", "predict", "write"))
        phase_rows.append(
            [f"{n:,}", f"{report['load_seconds']:.1f}"]
            + [f"{t[p]:.1f}" for p in ("read", "featurise", "predict", "write")]
            + [f"{other - report['load_seconds']:.1f}"]
        )
    predict, _ = _run_child(
        "predict", str(FOREST), str(files[max(sizes)]), str(min(PREDICT_ROWS, max(sizes)))
    )
    predict_rows = [
        [
            label,
            f"{predict['rows']:,}",
            f"{s:.2f}",
            f"{s / predict['rows'] * 1e6:.1f}",
            f"{s / predict['rows'] * TARGET_ROWS:.0f}",
        ]
        for label, s in predict["seconds"].items()
    ]
    body = [
        f"Synthetic file: the GAN's sample stream rebuilt from `data/generated/candidates.parquet` (each unique "
        f"candidate repeated `n_sampled` times, topped up to {TARGET_ROWS:,} in proportion to `n_sampled`, shuffled "
        f"with seed {SEED}); smaller sizes are its prefixes; built or found in cache in {build:.1f} s. Every row is "
        f"screened (no valid/novel filter) with the forest `{_shown(FOREST)}` "
        f"({predict['trees']} trees, {predict['n_jobs']} threads) for the default windows, in chunks of "
        f"{CHUNK_SIZE:,}, one fresh subprocess per size (`agd screen-candidates` does the same). Wall = the "
        "subprocess, interpreter start and model loading included; peak RSS = its `VmHWM`. One run per size.",
        "",
        markdown_table(
            ["rows", "wall s", "stream s", "rows / s (stream)", "peak RSS GiB", "hits", "rejected"], rows
        ),
        "",
        "Where the time goes (seconds; `other` = interpreter start, imports and assembling the output):",
        "",
        markdown_table(["rows", "load model", "read", "featurise", "predict", "write", "other"], phase_rows),
        "",
        f"Forest prediction alone on {predict['rows']:,} featurised rows ({predict['n_jobs']} threads), "
        f"extrapolated linearly to {TARGET_ROWS:,}:",
        "",
        markdown_table(["predictor", "rows", "seconds", "µs / row", f"s per {TARGET_ROWS:,}"], predict_rows),
    ]
    targets = []
    if TARGET_ROWS in results:
        report, wall = results[TARGET_ROWS]
        gib = report["maxrss_mib"] / 1024
        targets = [
            Target(
                "screen 1.18M formulas: wall time",
                f"<= {TARGET_SECONDS:.0f} s",
                f"{wall:.1f} s",
                wall <= TARGET_SECONDS,
            ),
            Target(
                "screen 1.18M formulas: peak memory",
                f"<= {TARGET_GIB:.0f} GiB",
                f"{gib:.2f} GiB",
                gib <= TARGET_GIB,
            ),
        ]
    return Section(
        name="screening",
        title="Streaming screen of generated candidates (`agd screen-candidates`)",
        body="\n".join(body),
        packages=["scikit-learn", "pyarrow"],
        targets=targets,
    )


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.screening", description="benchmark child process")
    sub = parser.add_subparsers(dest="mode", required=True)
    screen = sub.add_parser("screen")
    screen.add_argument("forest")
    screen.add_argument("candidates")
    screen.add_argument("out")
    screen.add_argument("chunk_size", type=int)
    screen.add_argument("--jobs", type=int, default=None)
    predict = sub.add_parser("predict")
    predict.add_argument("forest")
    predict.add_argument("candidates")
    predict.add_argument("rows", type=int)
    predict.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.mode == "screen":
        report = _child_screen(args.forest, args.candidates, args.out, args.chunk_size, args.jobs)
    else:
        report = _child_predict(args.forest, args.candidates, args.rows, args.jobs)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
