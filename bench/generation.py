"""Generation: how many valid, unique formulas the trained composition GAN yields per second.

Uses the trained generator in ``models/gan`` (skipped with a message when it is absent) through the
package's own API: ``sample_formulas`` (noise -> generator -> one-hot draws -> decoded formulas) for
the sampling rate, and ``sample_quality`` (the same samples, the generate stage's trims, smact validity
on a new ValidityChecker, de-duplication by reduced formula) for decodable, valid and unique rates and
unique valid formulas per second. Trims and validity settings come from params.yaml.
"""

from __future__ import annotations

import torch

from agd.config import load_params
from agd.models.gan import Trims, _formula_keys, load_gan, sample_formulas, sample_quality
from bench import (
    REPO_ROOT,
    BenchOptions,
    Section,
    Skipped,
    Target,
    format_exponent,
    growth_exponent,
    markdown_table,
    measure,
    peak_rss_mib,
)

DEFAULT_SIZES = [10_000, 50_000, 200_000]
QUICK_SIZES = [1_000, 2_000, 5_000]
GAN_DIR = REPO_ROOT / "models" / "gan"
SEED = 0


def _known_keys(formulas: list[str] | None) -> set[str] | None:
    """Reduced-formula keys of the GAN's training formulas (for novelty), skipping unparsable ones."""
    return None if formulas is None else _formula_keys(formulas)


def _unique_valid(report: dict[str, float]) -> int:
    """Distinct valid reduced formulas, recovered from sample_quality's rates (0 when nothing was valid)."""
    n_valid = report["n"] * report["decodable_rate"] * report["validity_rate"]
    if not n_valid > 0:  # also NaN: nothing decodable
        return 0
    return round(n_valid * report["valid_uniqueness"])


def _share(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def run(options: BenchOptions) -> Section:
    """Sampling rate and unique valid formulas per second at each size, with the peak RSS of each run."""
    if not (GAN_DIR / "generator.pt").is_file():
        raise Skipped(f"generation benchmark: no trained generator in {GAN_DIR} (run `agd train gan` first)")
    sizes = options.sizes or (QUICK_SIZES if options.quick else DEFAULT_SIZES)
    repeats = options.repeats
    params = load_params(REPO_ROOT / "params.yaml")
    bundle = load_gan(GAN_DIR)
    trims = Trims.from_generate_config(params.generate)
    known = _known_keys(bundle.known_formulas)
    chunk = params.generate.chunk_size
    threads = torch.get_num_threads()

    def sample_only(n: int) -> int:
        return sum(len(frame) for frame in sample_formulas(bundle.generator, bundle.vocab, n, SEED, chunk))

    def quality(n: int) -> dict[str, float]:
        return sample_quality(
            bundle.generator,
            bundle.vocab,
            n,
            SEED,
            chunk,
            known_formulas=known,
            validity_cfg=params.validity,
            trims=trims,
        )

    rows, sample_costs, unique_costs, best_rate = [], [], [], 0.0
    for n in sizes:
        sampling = measure(lambda n=n: sample_only(n), repeats)
        reports: list[dict[str, float]] = []
        full = measure(lambda n=n, out=reports: out.append(quality(n)), max(1, repeats - 1))
        _, rss = peak_rss_mib(lambda n=n, out=reports: out.append(quality(n)))
        report = reports[-1]
        unique_valid = _unique_valid(report)
        rate = unique_valid / full.wall
        best_rate = max(best_rate, rate)
        sample_costs.append(sampling.cpu)
        unique_costs.append(full.cpu)
        rows.append(
            [
                f"{n:,}",
                f"{sampling.wall:.2f}",
                f"{n / sampling.wall:,.0f}",
                f"{report['decodable_rate']:.3f}",
                f"{report['within_trims_rate']:.3f}",
                f"{report['validity_rate']:.3f}",
                f"{unique_valid:,.0f}",
                _share(report["valid_novelty"]),
                f"{full.wall:.2f}",
                f"{full.cpu:.2f}",
                f"{rate:,.0f}",
                f"{unique_valid / full.cpu:,.0f}",
                f"{rss.start:,.0f}",
                f"{rss.peak:,.0f}" + ("" if rss.isolated else " (process lifetime)"),
            ]
        )
    header = [
        "samples",
        "sampling wall s",
        "samples / s",
        "decodable",
        "within trims",
        "valid (of decodable)",
        "unique valid formulas",
        "novel (of unique valid)",
        "sample + check wall s",
        "CPU s",
        "unique valid / s (wall)",
        "unique valid / CPU s",
        "RSS at start MiB",
        "peak RSS MiB",
    ]
    vocab = f"{len(bundle.vocab.elements)} elements x counts 0..{bundle.vocab.max_count}"
    limits = f"atoms <= {trims.max_atoms}, elements <= {trims.max_elements}, atoms per element <= {trims.max_atoms_per_element}"
    sample_growth = format_exponent(growth_exponent(list(sizes), sample_costs))
    check_growth = format_exponent(growth_exponent(list(sizes), unique_costs))
    body = f"""
The trained generator in `models/gan` ({vocab}, sample temperature
{bundle.generator.sample_temperature}), seed {SEED}, chunks of {chunk:,}, torch with {threads} thread(s).
"Sampling" is `sample_formulas` alone (generator forward pass, count draws, decoding to formulas),
median of {repeats} runs. "Sample + check" is `sample_quality` on the same samples: the generate
stage's trims on the reduced composition ({limits}), smact validity on a new checker (cold cache) and
de-duplication by reduced formula; median of {max(1, repeats - 1)} run(s). Unique valid formulas are
distinct valid reduced formulas; novel ones are absent from the GAN's training formulas. Peak RSS is
the process's resident-set high-water mark during one more `sample_quality` run, reset just before it
(so it is that run's own peak, on top of the RSS at its start: libraries, model and memory the
allocator kept from earlier runs).

{markdown_table(header, rows)}

How CPU time grows with the number of samples (log-log slope; 1 is linear): sampling {sample_growth},
sample + check {check_growth}. Unique valid formulas per second fall slowly as n grows: a larger
sample draws more formulas it has drawn already.
"""
    targets = [
        Target(
            "generation: unique valid formulas per second",
            "(none set)",
            f"{best_rate:,.0f} / s (best over n = {', '.join(f'{n:,}' for n in sizes)})",
            None,
        )
    ]
    return Section(
        "generation",
        "Generation with the composition GAN (`agd.models.gan`)",
        body,
        ["torch", "smact"],
        targets,
    )
