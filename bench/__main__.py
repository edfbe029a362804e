"""``python -m bench NAME [--sizes N ...] [--repeats R] [--write]``: run a benchmark, print its table."""

from __future__ import annotations

import argparse

from bench import BENCHMARKS, BENCHMARKS_MD, BenchOptions, write_section


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the named benchmark, print it and optionally record it."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="benchmark to run")
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes (benchmark defaults if omitted)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument(
        "--write", action="store_true", help=f"replace this benchmark's section in {BENCHMARKS_MD.name}"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.sizes and min(args.sizes) < 1):
        parser.error("--repeats and --sizes must be positive")
    section = BENCHMARKS[args.name](BenchOptions(sizes=args.sizes, repeats=args.repeats))
    print(section.render())
    if args.write:
        write_section(section)
        print(f"wrote section '{section.name}' to {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
