"""GAN generator designs: train one configuration, report the quality of its samples.

Trains the composition WGAN-GP (:func:`agd.models.gan.train_gan_to_dir`) with the pipeline's ``gan:``
parameters plus the overrides given on the command line, into a temporary folder, then measures
:func:`agd.models.gan.sample_quality` on N samples with the ``generate`` stage's trims, seed and
chunking, against the known formulas saved with the model (what ``metrics/generate.json`` "quality"
reports). Prints one markdown table row:

    | label | epochs | validity | uniqueness | novelty | valid+unique+novel | decodable | train min |

validity is valid / decodable, uniqueness distinct reduced formulas / decodable, novelty distinct
novel / distinct, valid+unique+novel the count of distinct valid novel reduced formulas.

Examples (one thread, as the study was run)::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.studies.gan_study --quick
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.studies.gan_study --set generator_design=slots \\
        --set epochs=90 --samples 100000 --keep models/study/slots90

Measured 2026-12-05 against the params of that day (matrix design, 90 epochs, lr 1e-4, n_critic 5;
the slots row marked 'ema' is params.yaml's since) (one thread, 100,000 samples, validity / uniqueness / novelty % and valid+unique+novel;
all ``slots`` runs with the default ``min_slots`` 2; train minutes include 1,000-sample quality per epoch):

    default (metrics/generate.json, 90 epochs)                 49.7 / 75.2 / 96.2   38,572
    slots, 30 epochs                                           64.5 / 81.9 / 95.6   51,092  3.2 min
    slots, relaxation 1, 30 epochs                             63.4 / 79.7 / 95.4   48,947  2.9 min
    slots, lr 3e-4, 30 epochs                                  66.0 / 85.0 / 95.9   54,153  3.3 min
    slots, lr 3e-4, n_critic 2, 30 epochs                      71.6 / 86.4 / 98.2   59,384  4.1 min
    slots, lr 3e-4, n_critic 2, generator_ema 0.995, 30 ep.    70.5 / 90.3 / 96.7   61,074  4.1 min
    the same, 60 epochs                                        68.2 / 74.6 / 96.1   46,788  7.4 min
    the 30-epoch ema model sampled at T = 0.8 / 0.6            72.5 / 78.1, 73.8 / 55.1

Measured 2026-12-05 (session 9), the ema configuration above plus ``charge_guide`` (the generator
tracks which total charges its picks can reach with the icsd24 oxidation states; "mask" also lets it
stop only once neutral and makes its last pick neutralise where one can), 30 epochs:

    charge_guide input                                         70.5 / 80.7 / 95.5   54,658  8.4 min
    charge_guide mask                                          93.4 / 61.7 / 94.8   54,917  8.4 min
    the mask model sampled at T = 1.3                          91.7 / 79.5 / 96.4   70,191
    the mask model sampled at T = 1.7 (params.yaml since)      88.1 / 91.8 / 97.6   78,562

(The two guided runs trained side by side on the 2 cores, hence the longer training times.)

Measured 2026-12-06 (session 12) on the pipeline's own model (``dvc repro generate`` with
``charge_guide: valid``: the neutral states must also pass smact's Pauling test before the generator may
stop; two threads, 12 minutes), its 100,000-sample quality at the ``generate`` stage's seed:

    charge_guide valid, T = 1.0                                99.8 / 70.1 / 95.6   66,807
    charge_guide valid, T = 1.3                                99.2 / 82.9 / 96.7   79,439
    charge_guide valid, T = 1.7 (params.yaml)                  97.4 / 93.0 / 97.7   88,209
    charge_guide valid, T = 2.0                                95.4 / 96.4 / 98.1   89,989

``--quick``: 30 epochs, 20,000 samples (about 2-3 minutes). ``--set key=value`` takes YAML values
(``--set critic_hidden=[1024,512]``); ``--jsonl FILE`` appends the full result.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from agd.config import GanConfig, GenerateConfig, ValidityConfig, load_params
from agd.models.gan import Trims, load_gan, sample_quality, train_gan_to_dir

ROOT = Path(__file__).resolve().parents[2]


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not _:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(
    overrides: dict,
    samples: int,
    label: str,
    keep: Path | None = None,
    temperature: float | None = None,
    load: Path | None = None,
) -> dict:
    """Train with the pipeline's gan params + ``overrides`` (or ``load`` a trained model instead);
    quality of ``samples`` generate-style samples."""
    params = load_params(ROOT / "params.yaml")
    gan_cfg = GanConfig.model_validate({**params.gan.model_dump(), **overrides})
    gen_cfg: GenerateConfig = params.generate
    validity_cfg: ValidityConfig = params.validity
    out = load or keep or Path(tempfile.mkdtemp(prefix="gan_study_"))
    try:
        if load is None:
            start = time.perf_counter()
            train_gan_to_dir(gan_cfg, out, validity_cfg, root=ROOT, progress=False)
            train_minutes = (time.perf_counter() - start) / 60
        else:
            summary = json.loads((load / "summary.json").read_text())
            train_minutes = summary["train_seconds"] / 60
        bundle = load_gan(out)
        gan_cfg = bundle.config
        quality = sample_quality(
            bundle.generator,
            bundle.vocab,
            samples,
            seed=gen_cfg.seed,
            chunk_size=gen_cfg.chunk_size,
            known_formulas=bundle.known_formulas,
            validity_cfg=validity_cfg,
            trims=Trims.from_generate_config(gen_cfg),
            temperature=temperature,
        )
    finally:
        if keep is None and load is None:
            shutil.rmtree(out, ignore_errors=True)
    return {
        "label": label,
        "overrides": overrides,
        "temperature": temperature,
        "epochs": gan_cfg.epochs,
        "train_minutes": train_minutes,
        **quality,
    }


def row(result: dict) -> str:
    def pct(key: str) -> str:
        value = result[key]
        return "nan" if math.isnan(value) else f"{100 * value:.1f}"

    return (
        f"| {result['label']} | {result['epochs']} | {pct('validity_rate')} | {pct('uniqueness')} | "
        f"{pct('novelty')} | {int(result['valid_unique_novel']):,} | {pct('decodable_rate')} | "
        f"{result['train_minutes']:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="GanConfig override key=value (YAML)")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="30 epochs and 20,000 samples unless set")
    parser.add_argument("--label", default=None)
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature override")
    parser.add_argument("--keep", type=Path, default=None, help="save the trained model here")
    parser.add_argument("--load", type=Path, default=None, help="measure this trained model (no training)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append the full result to this file")
    args = parser.parse_args(argv)
    overrides = {"quality_samples": 0, **_overrides(args.set)}
    samples = args.samples
    if args.quick:
        overrides.setdefault("epochs", 30)
        if "--samples" not in (argv if argv is not None else sys.argv):
            samples = 20_000
    torch.set_num_threads(1)
    label = args.label or (", ".join(args.set) or "default")
    result = run(overrides, samples, label, args.keep, args.temperature, args.load)
    print(row(result), flush=True)
    if args.jsonl is not None:
        with args.jsonl.open("a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
