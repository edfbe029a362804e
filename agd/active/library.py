"""Generated candidates as a campaign's search space (``experiments.campaign.search: candidates``).

The paper's campaigns search the autoencoder's continuous latent box and decode whatever the optimiser
suggests. With ``search: candidates`` they search a finite set instead: the generator's valid candidates,
each encoded once into the same latent space. The GP, the acquisition function and the believer-greedy
batch are unchanged; only the pool the acquisition ranks is made of library members (random members and
the nearest members of the best registered points) and is never polished off the library. Every
suggestion is then a formula the generator proposed and the screening stage will screen: the campaign
spends its oracle budget on the candidates themselves, as a real campaign spends its DFT budget.

:class:`CandidateLibrary` holds the members (reduced formulas and float32 latents) and answers "which
member is this latent", "the k nearest members of these points" and "m random members";
:class:`LibraryChemistry` is the :class:`~agd.active.campaign.LatentChemistry` of such a campaign (a
latent's formula is its member's, not a decode); :class:`LibrarySource` is the optimiser's pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from agd.active.campaign import LatentChemistry
from agd.config import AcquisitionConfig

if TYPE_CHECKING:
    from agd.chem.validity import ValidityChecker
    from agd.models.autoencoder import TrainedAutoencoder

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 50_000
_NEAREST_BLOCK = 200_000  # library rows per distance block: 30 centres x 200k floats is 24 MB


class CandidateLibrary:
    """Candidate formulas and their latents (float32), with member lookup and nearest-member search."""

    def __init__(self, formulas: np.ndarray, latents: np.ndarray, digest: str) -> None:
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        if latents.ndim != 2 or len(latents) != len(formulas):
            raise ValueError(f"{len(formulas)} formulas but latents of shape {latents.shape}")
        if not len(formulas):
            raise ValueError("the candidate library is empty")
        if not np.isfinite(latents).all():
            raise ValueError("the candidate library holds non-finite latents")
        self.formulas = np.asarray(formulas, dtype=object)
        self.latents = latents
        self.digest = digest
        self._sq = np.einsum("ij,ij->i", latents, latents)
        self._features: tuple[np.ndarray, np.ndarray] | None = None
        self._index: dict[int, int] = {}
        for i, row in enumerate(latents):
            self._index.setdefault(hash(row.tobytes()), i)

    def __len__(self) -> int:
        return len(self.formulas)

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """Magpie features of every member (float32, computed on first use and kept) and a mask of the
        members that could be featurised: what a forest surrogate ranks (:mod:`agd.active.surrogate`)."""
        if self._features is None:
            from agd.active.surrogate import magpie_rows

            features, ok = magpie_rows([str(f) for f in self.formulas])
            if not ok.all():
                log.warning("%d of %d library members cannot be featurised", int((~ok).sum()), len(ok))
            self._features = (features, ok)
        return self._features

    @property
    def dim(self) -> int:
        return self.latents.shape[1]

    def box(self) -> np.ndarray:
        """(d, 2) per-dimension [min, max] of the members' latents."""
        return np.stack([self.latents.min(axis=0), self.latents.max(axis=0)], axis=1).astype(np.float64)

    def lookup(self, latents: np.ndarray) -> np.ndarray:
        """The member index of each latent row, -1 where it is not exactly a member's latent."""
        rows = np.atleast_2d(np.asarray(latents, dtype=np.float64))
        as32 = rows.astype(np.float32)
        found = np.full(len(rows), -1, dtype=np.int64)
        for j, (row, row32) in enumerate(zip(rows, as32, strict=True)):
            i = self._index.get(hash(row32.tobytes()))
            if i is not None and np.array_equal(self.latents[i], row32) and np.array_equal(row32, row):
                found[j] = i
        return found

    def nearest(self, centres: np.ndarray, k: int) -> np.ndarray:
        """Indices of the ``k`` nearest members of each centre (Euclidean), centre by centre, without repeats."""
        centres = np.atleast_2d(np.asarray(centres, dtype=np.float32))
        k = min(k, len(self))
        if k < 1 or not len(centres):
            return np.empty(0, dtype=np.int64)
        best_d = np.full((len(centres), 0), np.inf, dtype=np.float32)
        best_i = np.empty((len(centres), 0), dtype=np.int64)
        c_sq = np.einsum("ij,ij->i", centres, centres)
        for start in range(0, len(self), _NEAREST_BLOCK):
            block = self.latents[start : start + _NEAREST_BLOCK]
            d2 = self._sq[start : start + len(block)][None, :] - 2.0 * (centres @ block.T) + c_sq[:, None]
            take = min(k, d2.shape[1])
            part = np.argpartition(d2, take - 1, axis=1)[:, :take]
            best_d = np.concatenate([best_d, np.take_along_axis(d2, part, axis=1)], axis=1)
            best_i = np.concatenate([best_i, part + start], axis=1)
            if best_d.shape[1] > k:
                keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
                best_d = np.take_along_axis(best_d, keep, axis=1)
                best_i = np.take_along_axis(best_i, keep, axis=1)
        order = np.lexsort((best_i, best_d), axis=1)  # nearest first; ties by index, so the order is stable
        ranked = np.take_along_axis(best_i, order, axis=1).ravel()
        return pd.unique(ranked)

    def random(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """``m`` distinct random member indices (all of them when the library is smaller)."""
        return rng.choice(len(self), size=min(m, len(self)), replace=False)


def autoencoder_digest(autoencoder: TrainedAutoencoder) -> str:
    """A hash of the autoencoder's weights and vocabulary: a library's latents belong to exactly these."""
    digest = hashlib.sha256()
    digest.update(",".join(autoencoder.vocab.elements).encode())
    for name, tensor in sorted(autoencoder.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file's bytes: the hash DVC records for it, so a tag made of it matches ``dvc.lock``."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_library(
    candidates: str | os.PathLike,
    autoencoder: TrainedAutoencoder,
    *,
    valid_only: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> CandidateLibrary:
    """The candidate table's formulas (the valid ones by default), encoded by ``autoencoder``.

    ``candidates`` is a table with a ``reduced_formula`` column (``agd generate`` writes one, with
    ``valid``). Formulas the autoencoder cannot encode are left out and counted in the log. With
    ``cache_dir``, the encoded library is kept there under a name that hashes the table, the
    autoencoder and ``valid_only``, so each process of a run encodes it at most once.
    """
    path = Path(candidates)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no candidate table; run `agd generate` (DVC stage generate) first, or give another table"
        )
    digest = hashlib.sha256(
        f"{file_md5(path)}:{autoencoder_digest(autoencoder)}:{valid_only}".encode()
    ).hexdigest()[:16]
    cached = Path(cache_dir) / f"library-{digest}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as saved:
            return CandidateLibrary(saved["formulas"].astype(object), saved["latents"], digest)

    columns = pq.read_schema(path).names
    if "reduced_formula" not in columns:
        raise ValueError(f"{path}: a candidate table needs a 'reduced_formula' column (it has {columns})")
    if valid_only and "valid" not in columns:
        raise ValueError(f"{path}: no 'valid' column to keep only valid candidates (valid_only)")
    frame = pd.read_parquet(path, columns=["reduced_formula", "valid"] if valid_only else ["reduced_formula"])
    if valid_only:
        frame = frame[frame["valid"].astype(bool)]
    formulas = pd.unique(frame["reduced_formula"].dropna().astype(str))
    latents = np.empty((len(formulas), autoencoder.model.latent_dim), dtype=np.float32)
    chunks = range(0, len(formulas), _ENCODE_CHUNK)
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="encoding candidates", unit="chunk")
    for start in chunks:
        part = formulas[start : start + _ENCODE_CHUNK]
        latents[start : start + len(part)] = autoencoder.encode_formulas(list(part))
    fits = np.isfinite(latents).all(axis=1)
    if not fits.all():
        log.warning(
            "%d of %d candidates do not fit the autoencoder and are left out", int((~fits).sum()), len(fits)
        )
    library = CandidateLibrary(formulas[fits], latents[fits], digest)
    log.info("candidate library: %d members from %s", len(library), path)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, formulas=library.formulas.astype(str), latents=library.latents)
        os.replace(tmp, cached)
        for stale in cached.parent.glob("library-*.npz"):  # other candidates or another autoencoder
            if stale != cached:
                stale.unlink(missing_ok=True)
    return library


class LibraryChemistry(LatentChemistry):
    """A campaign's chemistry when it searches a :class:`CandidateLibrary`: a latent's formula is its member's.

    The formula is still checked by ``checker`` (smact) like a decoded one, so the library's own
    validity flags are not trusted blindly. A latent that is not exactly a member is an error: the
    optimiser's pool only ever holds members.
    """

    def __init__(
        self,
        autoencoder: TrainedAutoencoder,
        checker: ValidityChecker,
        library: CandidateLibrary,
        max_elements: int | None = 8,
        max_atoms: int | None = None,
    ) -> None:
        super().__init__(autoencoder, checker, max_elements, max_atoms)
        if library.dim != autoencoder.model.latent_dim:
            raise ValueError(
                f"the library's latents have {library.dim} dimensions, the autoencoder's {autoencoder.model.latent_dim}"
            )
        self.library = library
        self._source = LibrarySource(library)

    def source(self) -> LibrarySource:
        return self._source

    def formulas_of(self, latents: np.ndarray) -> list[str]:
        index = self.library.lookup(latents)
        missing = np.flatnonzero(index < 0)
        if len(missing):
            raise ValueError(
                f"{len(missing)} of {len(index)} latents (first: row {missing[0]}) are not members of the "
                "candidate library; a library campaign suggests members only"
            )
        return [str(f) for f in self.library.formulas[index]]

    def assess(self, latents: np.ndarray) -> pd.DataFrame:
        formulas = self.formulas_of(latents)
        checked = self.checker.check(formulas)
        return pd.DataFrame(
            {
                "formula": formulas,
                "reduced_formula": checked["reduced_formula"].to_numpy(dtype=object),
                "decodable": np.ones(len(formulas), dtype=bool),
                "valid": checked["valid"].to_numpy(dtype=bool),
                "reason": checked["reason"].to_numpy(dtype=object),
            }
        )


class LibrarySource:
    """The optimiser's candidate pool drawn from a library: ``n_random`` random members, and the
    ``n_local // local_centres`` nearest members of each of the ``local_centres`` best registered points."""

    def __init__(self, library: CandidateLibrary) -> None:
        self.library = library

    def candidates(
        self,
        config: AcquisitionConfig,
        registered_x: np.ndarray,
        registered_y: np.ndarray,
        rng: np.random.Generator,
        local: bool,
    ) -> np.ndarray:
        picked = [self.library.random(rng, config.n_random)]
        if local and config.n_local and len(registered_y):
            best = np.argsort(-registered_y, kind="stable")[: config.local_centres]
            per_centre = max(1, config.n_local // len(best))
            picked.append(self.library.nearest(registered_x[best], per_centre))
        index = pd.unique(np.concatenate(picked))
        return self.library.latents[index].astype(np.float64)
