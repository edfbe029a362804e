"""Element vocabulary and the one-hot composition matrix.

A composition is a matrix of shape (n_elements, max_count + 1): row ``i`` is the one-hot code of the
count of element ``i`` (column 0 means the element is absent). This is the representation of the
paper's autoencoder and of MATGAN. The vocabulary (element order and ``max_count``) is a saved
artefact: every model that uses the encoding stores it beside its weights.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Element

from agd.chem.formula import counts_to_formula


def _electronegativity_key(symbol: str) -> tuple[float, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # noble gases have no Pauling electronegativity
        x = Element(symbol).X
    return (x if math.isfinite(x) else math.inf, symbol)


class EncodingError(ValueError):
    """A composition that does not fit the vocabulary, or a malformed vocabulary."""


@dataclass(frozen=True)
class DecodeResult:
    """Decoded formulas (None where a matrix is not a formula) and the reason for each failure."""

    formulas: list[str | None]
    counts: np.ndarray  # (n, n_elements) integer counts; all zero where decoding failed
    reasons: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of matrices that decoded into a formula."""
        return np.array([f is not None for f in self.formulas], dtype=bool)


@dataclass(frozen=True)
class Vocabulary:
    """Element order and largest count of the one-hot composition matrix."""

    elements: tuple[str, ...]
    max_count: int
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _display_order: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise EncodingError(f"max_count must be >= 1, got {self.max_count}")
        if not self.elements:
            raise EncodingError("vocabulary has no elements")
        if len(set(self.elements)) != len(self.elements):
            raise EncodingError("vocabulary lists an element twice")
        bad = [e for e in self.elements if not Element.is_valid_symbol(e)]
        if bad:
            raise EncodingError(f"vocabulary has unknown element symbols: {bad}")
        object.__setattr__(self, "_index", {e: i for i, e in enumerate(self.elements)})
        # decoded formulas list elements the way pymatgen writes them: by electronegativity
        order = sorted(range(len(self.elements)), key=lambda i: _electronegativity_key(self.elements[i]))
        object.__setattr__(self, "_display_order", np.array(order, dtype=np.int64))

    # construction -----------------------------------------------------------------------------
    @classmethod
    def from_compositions(cls, compositions: Iterable[Mapping[str, int]], max_count: int) -> Vocabulary:
        """The elements that occur in ``compositions``, in order of atomic number."""
        present: set[str] = set()
        for counts in compositions:
            present.update(counts)
        return cls(tuple(sorted(present, key=lambda s: Element(s).Z)), max_count)

    @classmethod
    def from_symbols(cls, symbols: Sequence[str], max_count: int) -> Vocabulary:
        """A fixed element list, kept in the given order."""
        return cls(tuple(symbols), max_count)

    # persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready description (element order and max count)."""
        return {
            "format": "agd-composition-vocabulary/1",
            "elements": list(self.elements),
            "max_count": self.max_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Vocabulary:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(tuple(data["elements"]), int(data["max_count"]))
        except KeyError as exc:
            raise EncodingError(f"vocabulary file lacks the field {exc.args[0]!r}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # encoding ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape: (number of elements, max_count + 1)."""
        return (len(self.elements), self.max_count + 1)

    def misfit(self, counts: Mapping[str, int]) -> str | None:
        """Why ``counts`` cannot be encoded (None when it fits)."""
        if not counts:
            return "no elements"
        for element, count in counts.items():
            if element not in self._index:
                return f"element {element} is not in the vocabulary"
            if not 1 <= count <= self.max_count:
                return f"count {count} of {element} is outside 1..{self.max_count}"
        return None

    def counts_matrix(self, compositions: Sequence[Mapping[str, int]]) -> np.ndarray:
        """Integer counts (n, n_elements); raise EncodingError naming the first misfit row."""
        out = np.zeros((len(compositions), len(self.elements)), dtype=np.int16)
        for row, counts in enumerate(compositions):
            reason = self.misfit(counts)
            if reason is not None:
                raise EncodingError(f"composition {row} ({counts_to_formula(counts)}): {reason}")
            for element, count in counts.items():
                out[row, self._index[element]] = count
        return out

    def encode(self, compositions: Sequence[Mapping[str, int]], dtype=np.float32) -> np.ndarray:
        """One-hot matrices (n, n_elements, max_count + 1) for compositions that all fit."""
        return self.one_hot(self.counts_matrix(compositions), dtype=dtype)

    def one_hot(self, counts: np.ndarray, dtype=np.float32) -> np.ndarray:
        """One-hot matrices from an integer count array (n, n_elements)."""
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != len(self.elements):
            raise EncodingError(f"expected counts of shape (n, {len(self.elements)}), got {counts.shape}")
        if counts.size and (counts.min() < 0 or counts.max() > self.max_count):
            raise EncodingError(f"counts outside 0..{self.max_count}")
        return np.eye(self.max_count + 1, dtype=dtype)[counts]

    # decoding ---------------------------------------------------------------------------------
    def _formulas(self, counts: np.ndarray, ok: np.ndarray) -> list[str | None]:
        symbols = self.elements
        order = self._display_order
        ordered = counts[:, order]
        formulas: list[str | None] = []
        for row, good in zip(ordered, ok, strict=True):
            if not good:
                formulas.append(None)
                continue
            idx = np.flatnonzero(row)
            formulas.append(counts_to_formula({symbols[order[i]]: int(row[i]) for i in idx}))
        return formulas

    def _check_shape(self, matrices: np.ndarray) -> np.ndarray:
        matrices = np.asarray(matrices)
        if matrices.ndim == 2:
            matrices = matrices[None]
        if matrices.ndim != 3 or matrices.shape[1:] != self.shape:
            raise EncodingError(
                f"expected matrices of shape (n, {self.shape[0]}, {self.shape[1]}), got {matrices.shape}"
            )
        return matrices

    def decode(self, matrices: np.ndarray, threshold: float = 0.5) -> DecodeResult:
        """Strict decoding: each element row must hold exactly one entry >= threshold.

        A matrix is not a formula when a value is outside [0, 1] or not finite, when an element row
        has no entry set or several, or when every element has count 0.
        """
        matrices = self._check_shape(matrices)
        n = matrices.shape[0]
        finite = np.isfinite(matrices).all(axis=(1, 2))
        in_range = finite & ((matrices >= 0) & (matrices <= 1)).all(axis=(1, 2), where=np.isfinite(matrices))
        hot = matrices >= threshold
        n_hot = hot.sum(axis=2)  # (n, elements)
        counts = np.argmax(hot, axis=2).astype(np.int16)
        several = (n_hot > 1).any(axis=1)
        missing = (n_hot == 0).any(axis=1)
        empty = (counts == 0).all(axis=1)
        reasons: list[str | None] = [None] * n
        for i in range(n):
            if not in_range[i]:
                reasons[i] = "values outside [0, 1] or not finite"
            elif several[i]:
                j = int(np.argmax(n_hot[i] > 1))
                reasons[i] = f"several counts set for {self.elements[j]}"
            elif missing[i]:
                j = int(np.argmax(n_hot[i] == 0))
                reasons[i] = f"no count set for {self.elements[j]}"
            elif empty[i]:
                reasons[i] = "no element present"
        ok = np.array([r is None for r in reasons], dtype=bool)
        counts[~ok] = 0
        return DecodeResult(self._formulas(counts, ok), counts, reasons)

    def decode_probabilities(self, probabilities: np.ndarray) -> DecodeResult:
        """Decoding of a model's output: the most probable count of each element (argmax per row).

        Every matrix gives counts; the only failure is a matrix whose most probable counts are all 0.
        """
        probabilities = self._check_shape(probabilities)
        counts = np.argmax(probabilities, axis=2).astype(np.int16)
        ok = (counts > 0).any(axis=1)
        reasons = [None if good else "no element present" for good in ok]
        return DecodeResult(self._formulas(counts, ok), counts, reasons)
