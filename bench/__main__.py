"""``python -m bench NAME [--sizes N ...] [--repeats R] [--write]``: run a benchmark, print its table.

``python -m bench all [--quick] [--only NAME ...] [--repeats R] [--write]`` runs every registered
benchmark in turn and adds a summary of their targets at the top of BENCHMARKS.md. A single
benchmark's ``--write`` gathers that summary again from every section, and ``python -m bench all
--gather`` does only that.
"""

from __future__ import annotations

import argparse
import sys

from bench import BENCHMARKS, BENCHMARKS_MD, BenchOptions, write_section


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the named benchmark, print it and optionally record it."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", choices=[*sorted(BENCHMARKS), "all"], help="benchmark to run, or all of them")
    parser.add_argument("--sizes", type=int, nargs="+", help="input sizes (benchmark defaults if omitted)")
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per measurement (median; default 3, 1 with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, light reference work")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help="with all: just these benchmarks",
    )
    parser.add_argument(
        "--write", action="store_true", help=f"replace this benchmark's section in {BENCHMARKS_MD.name}"
    )
    parser.add_argument(
        "--gather",
        action="store_true",
        help=f"with all: rebuild the summary at the top of {BENCHMARKS_MD.name} from its sections; runs nothing",
    )
    args = parser.parse_args(argv)
    if args.gather:
        if args.name != "all" or args.only or args.quick or args.sizes or args.repeats:
            parser.error("--gather goes with all alone: it runs nothing")
        from bench.suite import gathered_summary

        summary = gathered_summary(BENCHMARKS_MD, "python -m bench all --gather")
        write_section(summary, BENCHMARKS_MD, first=True)
        print(summary.render())
        return
    if (args.repeats is not None and args.repeats < 1) or (args.sizes and min(args.sizes) < 1):
        parser.error("--repeats and --sizes must be positive")
    if args.name == "all":
        if args.sizes:
            parser.error(
                "--sizes applies to one benchmark; all runs each at its own sizes (--quick: smaller)"
            )
        from bench.suite import run_all, suite_options

        outcomes = run_all(
            suite_options(args.quick, args.repeats), args.only, BENCHMARKS_MD if args.write else None
        )
        if args.write:
            print(
                f"wrote {sum(o.section is not None for o in outcomes)} section(s) and the summary to {BENCHMARKS_MD}"
            )
        failed = [o.name for o in outcomes if o.error is not None]
        if failed:
            sys.exit(f"failed: {', '.join(failed)}")
        return
    if args.only:
        parser.error("--only applies to all")
    options = BenchOptions(
        sizes=args.sizes, repeats=args.repeats or (1 if args.quick else 3), quick=args.quick
    )
    section = BENCHMARKS[args.name](options)
    print(section.render())
    if args.write:
        write_section(section, BENCHMARKS_MD)
        print(f"wrote section '{section.name}' to {BENCHMARKS_MD}")
        from bench.suite import gathered_summary

        summary = gathered_summary(BENCHMARKS_MD, f"python -m bench {args.name} --write")
        write_section(summary, BENCHMARKS_MD, first=True)
        print(f"gathered the summary of targets at the top of {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
