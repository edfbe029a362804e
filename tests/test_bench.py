"""The benchmark suite: the new benchmarks on tiny sizes and tiny trained models, the `all` run and its summary.

The real BENCHMARKS.md is never written here: sections go to a copy in a temporary folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import bench
from bench import (
    BENCHMARKS_MD,
    BenchOptions,
    Section,
    Skipped,
    Target,
    growth_exponent,
    peak_rss_mib,
    write_section,
)
from bench import generation as generation_bench
from bench import oracle as oracle_bench
from bench import surrogate as surrogate_bench
from bench import validity as validity_bench
from bench.__main__ import main
from bench.suite import SUMMARY, run_all, suite_options
from tests.conftest import read_shared_csv

TINY_OPTIONS = BenchOptions(sizes=[20, 60, 150], repeats=1, quick=True)


def table(body: str, first_header: str, which: int = 0) -> list[dict[str, str]]:
    """The rows of the ``which``-th markdown table whose header starts with ``first_header``, as dicts."""
    lines = body.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |")]
    start = starts[which]
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def number(cell: str) -> float:
    """A table cell such as '1,234', '0.52' or '17x' as a float."""
    return float(cell.replace(",", "").rstrip("x").split()[0])


def test_growth_exponent_is_the_log_log_slope() -> None:
    sizes = [100, 1_000, 10_000]
    assert growth_exponent(sizes, [1.0, 10.0, 100.0]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [1.0, 100.0, 10_000.0]) == pytest.approx(2.0)
    assert growth_exponent(sizes, [5.0, 5.0, 5.0]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(growth_exponent([100], [1.0]))  # one size: no slope
    assert math.isnan(growth_exponent([100, 1_000], [0.0, 0.0]))  # zero costs are left out


def test_peak_rss_sees_a_large_allocation() -> None:
    def allocate() -> int:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page touched
        return int(block.size)

    result, rss = peak_rss_mib(allocate)
    assert result == 64 * 2**20 // 8
    assert rss.peak >= rss.start > 0
    if rss.isolated:  # Linux: the high-water mark was reset, so the block shows up as growth
        assert rss.peak - rss.start >= 50


def test_write_section_replaces_its_own_block_and_puts_first_ones_on_top(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    if BENCHMARKS_MD.is_file():
        shutil.copy(BENCHMARKS_MD, path)
    write_section(Section("alpha", "Alpha", "first body"), path)
    write_section(Section("beta", "Beta", "beta body"), path)
    before = path.read_text()
    write_section(Section("alpha", "Alpha", "second body"), path)
    text = path.read_text()
    assert (
        text.count("<!-- bench:alpha:begin -->") == 1 and "second body" in text and "first body" not in text
    )
    # everything outside alpha's block is untouched
    assert text.replace("second body", "first body") == before

    write_section(Section(SUMMARY, "Summary", "summary body"), path, first=True)
    text = path.read_text()
    assert text.index("<!-- bench:summary:begin -->") < min(
        text.index(marker) for marker in ("<!-- bench:alpha:begin -->", "<!-- bench:beta:begin -->")
    )
    write_section(Section(SUMMARY, "Summary", "summary again"), path, first=True)
    text = path.read_text()
    assert text.count("<!-- bench:summary:begin -->") == 1 and "summary again" in text
    if BENCHMARKS_MD.is_file():  # the real file's sections survive in the copy
        assert "<!-- bench:magpie:begin -->" in text


def test_validity_bench_agrees_with_smact_on_real_formulas(shared_data, monkeypatch) -> None:
    # the shared MP formulas, not this clone's generated candidates (absent in CI)
    monkeypatch.setattr(validity_bench, "CANDIDATES", shared_data / "absent.parquet")
    section = validity_bench.run(TINY_OPTIONS)
    rows = table(section.body, "sample")
    assert [(r["sample"], number(r["n"])) for r in rows] == [
        (kind, n) for kind in ("distinct", "as generated") for n in (20, 60, 150)
    ]
    for row in rows:
        assert row["disagreements"] == "0"
        assert number(row["smact CPU s"]) > 0 and number(row["CPU s"]) > 0
        assert 0 < number(row["valid share"]) <= 1
        assert number(row["distinct"]) <= number(row["n"])
    assert all(number(r["distinct"]) == number(r["n"]) for r in rows if r["sample"] == "distinct")
    agreement = section.targets[0]
    assert agreement.met is True and agreement.measured.startswith("0 of 460")
    assert "Materials Project formulas" in section.body


def test_surrogate_bench_times_full_refresh_and_list_rounds(shared_data, monkeypatch) -> None:
    # the shared MP formulas (a 5,000-member sample), not this clone's generated candidates
    monkeypatch.setattr(surrogate_bench, "CANDIDATES", shared_data / "absent.parquet")
    section = surrogate_bench.run(BenchOptions(sizes=[40, 80], repeats=1, quick=True))
    rows = table(section.body, "registered")
    assert [(number(r["registered"]), r["round"]) for r in rows] == [
        (n, kind) for n in (40, 80) for kind in ("full", "refresh", "list")
    ]
    library = surrogate_bench.QUICK_LIBRARY
    for row in rows:
        n = number(row["registered"])
        assert row["suggested"] == "20"
        assert 0 < number(row["forest fit s"]) <= number(row["wall s / round"])
        # a full round scores every unregistered member, the others only the shortlist
        expected = library - n if row["round"] == "full" else surrogate_bench.QUICK_SHORTLIST
        assert number(row["members scored"]) == expected
    assert "Materials Project formulas" in section.body
    (target,) = section.targets
    assert target.met is None and "2,000 not measured" in target.measured  # judged only at 2,000 points


def test_surrogate_bench_skips_without_formulas(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(surrogate_bench, "CANDIDATES", tmp_path / "absent.parquet")
    monkeypatch.setattr(surrogate_bench, "FALLBACK", tmp_path / "absent.csv")
    with pytest.raises(Skipped, match="neither"):
        surrogate_bench.run(BenchOptions(sizes=[40], repeats=1, quick=True))


@pytest.fixture(scope="module")
def tiny_gan_dir(shared_data, tmp_path_factory) -> Path:
    """A GAN trained for one epoch on 400 real formulas, saved as the generate stage expects."""
    from agd.chem.encoding import Vocabulary
    from agd.config import GanConfig
    from agd.models.gan import read_training_compositions, save_gan, train_gan

    cfg = GanConfig(
        epochs=1,
        batch_size=64,
        n_critic=2,
        noise_dim=16,
        generator_hidden=[32],
        critic_hidden=[32],
        quality_samples=0,
    )
    frame = read_shared_csv(shared_data / "formulas_icsd_in_mp_synthnn.csv").head(400)
    compositions, summary = read_training_compositions(frame, cfg)
    vocab = Vocabulary.from_compositions(compositions, cfg.max_count)
    known = summary["known_formulas"]
    generator, critic, history = train_gan(compositions, vocab, cfg, known_formulas=known, progress=False)
    return save_gan(tmp_path_factory.mktemp("gan"), generator, critic, vocab, cfg, history, known)


def test_generation_bench_reports_consistent_rates(tiny_gan_dir, monkeypatch) -> None:
    monkeypatch.setattr(generation_bench, "GAN_DIR", tiny_gan_dir)
    section = generation_bench.run(BenchOptions(sizes=[100, 200, 400], repeats=1))
    rows = table(section.body, "samples")
    assert [number(r["samples"]) for r in rows] == [100, 200, 400]
    for row in rows:
        n = number(row["samples"])
        assert number(row["samples / s"]) > 0 and number(row["sample + check wall s"]) > 0
        for share in ("decodable", "within trims", "valid (of decodable)"):
            assert 0 <= number(row[share]) <= 1
        unique_valid = number(row["unique valid formulas"])
        assert 0 <= unique_valid <= n * number(row["decodable"]) * number(row["valid (of decodable)"]) + 0.5
        assert number(row["unique valid / s (wall)"]) == pytest.approx(
            unique_valid / number(row["sample + check wall s"]), rel=0.05, abs=1
        )
        assert number(row["peak RSS MiB"]) >= number(row["RSS at start MiB"]) > 0
    assert "sampling" in section.body and section.targets[0].met is None


def test_generation_bench_skips_without_a_trained_generator(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(generation_bench, "GAN_DIR", tmp_path)
    with pytest.raises(Skipped, match="no trained generator"):
        generation_bench.run(TINY_OPTIONS)


@pytest.fixture(scope="module")
def tiny_oracle_dir(shared_data, tmp_path_factory) -> Path:
    """An oracle folder laid out as the train_oracle stage writes it: a 2-member Roost and a forest."""
    from agd.config import ForestConfig, RoostConfig
    from agd.models.forest import train_forest
    from agd.models.roost import train_ensemble

    data = read_shared_csv(shared_data / "mp_gap_agd_exp1.csv").sample(400, random_state=0)
    formulas, gaps = data["composition"].tolist(), data["band_gap"].to_numpy()
    cfg = RoostConfig(
        ensemble_size=2, epochs=1, batch_size=64, elem_fea_len=16, n_graph=1, elem_heads=1, cry_heads=1,
        hidden=16, trunk_hidden=[16], out_hidden=[16], patience=None, num_threads=1,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("oracle")
    train_ensemble(formulas, gaps, None, None, cfg, progress=False).save(folder / "deployed" / "roost")
    train_forest(formulas, gaps, ForestConfig(n_estimators=5, n_jobs=1)).save(
        folder / "deployed" / "forest.joblib"
    )
    meta = {
        "kind": "roost",
        "path": "deployed/roost",
        "name": "tiny",
        "others": {"forest": "deployed/forest.joblib"},
    }
    (folder / "oracle.json").write_text(json.dumps(meta))
    return folder


def test_oracle_bench_times_roost_at_both_thread_counts_and_the_forest(tiny_oracle_dir, monkeypatch) -> None:
    monkeypatch.setattr(oracle_bench, "ORACLE_DIR", tiny_oracle_dir)
    monkeypatch.setattr(oracle_bench, "CANDIDATES", tiny_oracle_dir / "absent.parquet")
    section = oracle_bench.run(BenchOptions(sizes=[50, 100, 200], repeats=1))
    rows = table(section.body, "model")
    assert [(r["torch threads"], number(r["formulas"])) for r in rows] == [
        (threads, n) for threads in ("1", "2", "1", "n/a") for n in (50, 100, 200)
    ]
    for row in rows:
        assert number(row["formulas / s (wall)"]) > 0
        n, wall = number(row["formulas"]), number(row["wall s"])  # wall is rounded to 0.1 ms
        assert n / (wall + 5e-5) - 1 <= number(row["formulas / s (wall)"]) <= n / max(wall - 5e-5, 1e-9) + 1
        assert 0.5 < number(row["labelled"]) <= 1  # a few MP formulas hold elements the tiny model never saw
    growth = table(section.body, "model", which=1)
    assert [r["torch threads"] for r in growth] == ["1", "2", "1", "n/a"]
    assert [r["model"].split(",")[-1].strip() for r in growth[:3]] == [
        "batch 256)",
        "batch 256)",
        "batch 4096)",
    ]
    # a slope is computed for every row; its value at 50-200 formulas on one repeat is timing noise
    # (a loaded CI machine gave one outside (-1, 3)), so only the benchmark itself judges it
    assert all(math.isfinite(number(r["growth exponent"])) for r in growth)
    assert "(1 thread)" in section.targets[0].measured and "(2 threads)" in section.targets[0].measured


def test_with_threads_changes_only_the_thread_count(tiny_oracle_dir) -> None:
    from agd.models.roost import RoostEnsemble

    ensemble = RoostEnsemble.load(tiny_oracle_dir / "deployed" / "roost")
    two = oracle_bench.with_threads(ensemble, 2)
    assert [m.config.num_threads for m in two.members] == [2, 2]
    assert [m.config.num_threads for m in ensemble.members] == [1, 1]  # the original is left alone
    formulas = ["NaCl", "Fe2O3", "GaN"]
    np.testing.assert_allclose(two.predict(formulas).gaps, ensemble.predict(formulas).gaps, rtol=1e-5)


def test_run_all_writes_sections_and_a_summary_of_targets(shared_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(validity_bench, "CANDIDATES", tmp_path / "absent.parquet")
    path = tmp_path / "BENCHMARKS.md"
    if BENCHMARKS_MD.is_file():
        shutil.copy(BENCHMARKS_MD, path)

    def broken(options: BenchOptions) -> Section:
        raise RuntimeError("boom")

    def absent(options: BenchOptions) -> Section:
        raise Skipped("no model here")

    def tiny_validity(options: BenchOptions) -> Section:
        assert options.quick and options.repeats == 1 and options.stock_suggestions == 1
        return validity_bench.run(BenchOptions(sizes=[10, 20, 40], repeats=1, quick=True))

    registry = {"validity": tiny_validity, "broken": broken, "absent": absent}
    messages: list[str] = []
    outcomes = run_all(suite_options(True, None), None, path, registry, echo=messages.append)
    assert [o.status.split(":")[0] for o in outcomes] == ["ok", "failed", "skipped"]
    assert outcomes[1].error == "RuntimeError: boom" and outcomes[2].skipped == "no model here"
    text = path.read_text()
    assert text.index("<!-- bench:summary:begin -->") < text.index("<!-- bench:validity:begin -->")
    summary = text[text.index("<!-- bench:summary:begin -->") : text.index("<!-- bench:summary:end -->")]
    targets = table(summary, "benchmark")
    assert targets[0]["benchmark"] == "validity" and targets[0]["met"] == "yes"
    statuses = {row["benchmark"]: row["status"] for row in table(summary, "benchmark", which=1)}
    assert statuses == {
        "validity": "ok",
        "broken": "failed: RuntimeError: boom",
        "absent": "skipped: no model here",
    }
    assert "--quick" in summary and any("Traceback" in m for m in messages)

    # a later partial run keeps listing the targets of the section it did not replace, with its date
    outcomes = run_all(suite_options(True, None), ["absent"], path, registry, echo=messages.append)
    text = path.read_text()
    summary = text[text.index("<!-- bench:summary:begin -->") : text.index("<!-- bench:summary:end -->")]
    kept = [row for row in table(summary, "benchmark") if row["benchmark"].startswith("validity")]
    assert kept and all(row["benchmark"].startswith("validity (20") for row in kept)  # "validity (2026-...)"
    assert kept[0]["met"] == "yes"
    assert [row["benchmark"] for row in table(summary, "benchmark", which=1)] == ["absent"]
    assert (
        text.count("<!-- bench:summary:begin -->") == 1 and text.count("<!-- bench:validity:begin -->") == 1
    )


def test_targets_survive_the_round_trip_through_the_file(tmp_path) -> None:
    from bench import read_targets

    targets = [
        Target("round <= 3 s --> fast", "<= 3 s", "0.9 s", True),
        Target("rate", "(none set)", "5 / s", None),
    ]
    path = tmp_path / "B.md"
    write_section(Section("alpha", "Alpha", "body", targets=targets), path)
    write_section(Section("beta", "Beta", "no targets"), path)
    found = read_targets(path)
    assert found["alpha"][1] == targets and found["beta"][1] == []
    assert found["alpha"][0].endswith("UTC")


def test_summary_marks_unmet_and_unjudged_targets() -> None:
    from bench.suite import Outcome, summary_section

    section = Section(
        "x", "X", "body", targets=[Target("a", "<= 1 s", "2 s", False), Target("b", "(none)", "3", None)]
    )
    summary = summary_section([Outcome("x", 1.0, section=section)], BenchOptions(), 1.0)
    rows = table(summary.body, "benchmark")
    assert [r["met"] for r in rows] == ["**no**", "—"]
    assert "0 of 1 judged targets met" in summary.body


def test_one_benchmark_written_alone_gathers_the_summary_from_every_section(tmp_path, monkeypatch) -> None:
    import bench.__main__ as cli

    path = tmp_path / "B.md"
    write_section(
        Section("alpha", "Alpha", "old", targets=[Target("alpha round", "<= 3 s", "0.9 s", True)]), path
    )
    write_section(Section(SUMMARY, "Summary: targets", "a stale summary without beta"), path, first=True)
    fresh = Section("beta", "Beta", "new", targets=[Target("beta round", "<= 3 s", "9.4 s", False)])
    monkeypatch.setattr(cli, "BENCHMARKS_MD", path)
    monkeypatch.setitem(cli.BENCHMARKS, "beta", lambda options: fresh)
    main(["beta", "--write"])
    text = path.read_text()
    assert text.count("<!-- bench:summary:begin -->") == 1
    assert text.index("<!-- bench:summary:begin -->") < text.index("<!-- bench:alpha:begin -->")
    summary = text[text.index("<!-- bench:summary:begin -->") : text.index("<!-- bench:summary:end -->")]
    assert "stale" not in summary and "Gathered by `python -m bench beta --write`" in summary
    assert "Measured" not in summary  # it measured nothing: its rows carry their sections' dates
    rows = table(summary, "benchmark")
    assert [(r["benchmark"].split(" (")[0], r["measured"], r["met"]) for r in rows] == [
        ("alpha", "0.9 s", "yes"),
        ("beta", "9.4 s", "**no**"),
    ]
    assert all(r["benchmark"].endswith("UTC)") for r in rows)  # each dated by its own section
    assert "1 of 2 judged targets met" in summary


def test_gather_rewrites_only_the_summary(tmp_path, monkeypatch, capsys) -> None:
    import bench.__main__ as cli

    path = tmp_path / "B.md"
    write_section(Section("alpha", "Alpha", "kept body", targets=[Target("a", "<= 1 s", "2 s", False)]), path)
    monkeypatch.setattr(cli, "BENCHMARKS_MD", path)
    main(["all", "--gather"])
    text = path.read_text()
    assert "kept body" in text and text.index("bench:summary:begin") < text.index("bench:alpha:begin")
    assert "0 of 1 judged targets met" in text
    with pytest.raises(SystemExit):
        main(["all", "--gather", "--only", "magpie"])
    assert "--gather goes with all alone" in capsys.readouterr().err


def test_cli_refuses_sizes_with_all_and_only_without_all(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["all", "--sizes", "10"])
    assert exc.value.code == 2 and "--sizes applies to one benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["validity", "--only", "magpie"])
    assert exc.value.code == 2
    assert set(bench.BENCHMARKS) >= {"magpie", "acquisition", "validity", "generation", "oracle"}


def test_cli_all_quick_runs_the_chosen_benchmarks_without_writing(
    shared_data, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(validity_bench, "CANDIDATES", tmp_path / "absent.parquet")
    before = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else None
    main(["all", "--quick", "--only", "validity"])
    out = capsys.readouterr().out
    assert "## Summary: targets" in out and "validity: ok" in out and "| validity | " in out
    assert (BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else None) == before  # no --write, no change
