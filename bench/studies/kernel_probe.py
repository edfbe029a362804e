"""Kernel probe: do torch's and MKL's choices of CPU code path change the weights agd trains?

The same seed gives the same bits on one machine (tests/models/test_oracle.py trains the oracle twice),
but another CPU can take other kernels: ATen picks its vectorised kernels by the widest extension the
CPU has (AVX-512, AVX2, none), MKL picks its own code path by CPU vendor and extension, oneDNN (the
autoencoder's convolutions) likewise. Each rounds differently, and training amplifies the last bit.

This probe trains a Roost member (the oracle's architecture from params.yaml) and the autoencoder for
a few epochs on the first rows of the prepared dataset, once per kernel setting, each in a fresh process
with one thread, and prints a hash of the weights. Run it on two machines and compare the lines: a
setting whose hashes agree there makes the two machines' trainings the same.

    python -m bench.studies.kernel_probe --out reports/kernel_probe.md   # 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-avx2": {"MKL_CBWR": "AVX2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "pinned-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
NEEDS_AVX2 = {"aten-avx2", "mkl-avx2", "pinned-avx2"}
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _digest(state: dict) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def probe(prepared: Path, params: Path, rows: int, epochs: int) -> dict:
    """Train both models here, in this process's kernel settings; their weight hashes and seconds."""
    import pandas as pd
    import torch

    from agd.config import load_params
    from agd.models.autoencoder import run_autoencoder_stage
    from agd.models.roost import train_roost

    torch.set_num_threads(1)
    cfg = load_params(params)
    table = pd.read_parquet(prepared)
    train = table[table["split"] == "train"].iloc[:rows]
    val = table[table["split"] == "val"].iloc[: max(rows // 3, 1)]
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    start = time.perf_counter()
    roost_cfg = cfg.oracle.roost.model_copy(update={"num_threads": 1, "epochs": epochs})
    model = train_roost(
        train["reduced_formula"].tolist(), train["band_gap"].to_numpy(),
        val["reduced_formula"].tolist(), val["band_gap"].to_numpy(), roost_cfg, seed=0, progress=False,
    )  # fmt: skip
    out["roost"] = _digest(model.net.state_dict())
    out["roost_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        subset = Path(work) / "subset.parquet"
        test = table[table["split"] == "test"].iloc[: max(rows // 3, 1)]
        pd.concat([train, val, test])[["reduced_formula", "split"]].to_parquet(subset)
        ae_cfg = cfg.autoencoder.model_copy(update={"epochs": epochs})
        run_autoencoder_stage(subset, Path(work) / "ae", cfg.encoding, ae_cfg)
        out["autoencoder"] = hashlib.sha256((Path(work) / "ae" / "model.pt").read_bytes()).hexdigest()[:16]
    out["autoencoder_s"] = time.perf_counter() - start
    return out


def run_setting(name: str, prepared: Path, params: Path, rows: int, epochs: int) -> dict:
    """One setting in a fresh process (the kernel choice is made once, at a process's first use)."""
    env = {k: v for k, v in os.environ.items() if k not in {n for s in SETTINGS.values() for n in s}}
    env.update(THREADS)
    env.update(SETTINGS[name])
    argv = [sys.executable, "-m", "bench.studies.kernel_probe", "worker", "--prepared", str(prepared),
            "--params", str(params), "--rows", str(rows), "--epochs", str(epochs)]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"setting {name}: the probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[tuple[str, dict | None]], rows: int, epochs: int) -> str:
    from agd.environment import environment_record

    machine = environment_record()["machine"]
    lines = [
        "# Kernel probe: the same seed under each CPU kernel setting",
        "",
        f"Machine: {machine['cpu']} ({machine['vector_isa']}, {machine['cores']} cores), {machine['platform']}, "
        f"Python {machine['python']}. A Roost member (params.yaml's oracle architecture) and the autoencoder, "
        f"{epochs} epochs on the first {rows:,} training rows, seed 0, one thread, each setting in a fresh process.",
        "Equal hashes: bit-identical weights. Compare a setting's line between machines.",
        "",
        "| setting | environment | torch kernels | Roost weights | s | autoencoder weights | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, got in results:
        env = " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "(none)"
        if got is None:
            lines.append(f"| {name} | {env} | skipped: this CPU has no AVX2 | | | | |")
            continue
        lines.append(
            f"| {name} | {env} | {got['capability']} | `{got['roost']}` | {got['roost_s']:.1f} | "
            f"`{got['autoencoder']}` | {got['autoencoder_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["run", "worker"], default="run")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared" / "dataset.parquet")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--rows", type=int, default=3000, help="training rows (val and test: a third each)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), default=["native", "native", *list(SETTINGS)[1:]]
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        print(json.dumps(probe(args.prepared, args.params, args.rows, args.epochs)))
        return 0
    if not args.prepared.is_file():
        print(
            f"{args.prepared}: no prepared dataset; run `dvc repro pipelines/dvc.yaml:prepare` first",
            file=sys.stderr,
        )
        return 2
    from agd.environment import vector_isa

    results = []
    for name in args.settings:
        if name in NEEDS_AVX2 and vector_isa() not in ("avx2", "avx512"):
            results.append((name, None))
            continue
        results.append((name, run_setting(name, args.prepared, args.params, args.rows, args.epochs)))
        print(f"{name}: {results[-1][1]}", file=sys.stderr)
    text = report(results, args.rows, args.epochs)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
