"""MATGAN-style composition generator: a WGAN-GP on one-hot composition matrices.

Dan et al. (npj Comput. Mater. 6, 84, 2020) train a Wasserstein GAN on known compositions encoded as
elements x counts one-hot matrices, then sample about a million hypothetical formulas from it. Here:

* the generator maps Gaussian noise to logits of shape (elements, max_count + 1) and takes a softmax
  over the count axis, so each element row is a distribution over the counts 0..max_count;
* the critic is an MLP on the flattened matrix; training is WGAN-GP (Gulrajani et al. 2017): a
  gradient penalty on random interpolates, ``n_critic`` critic steps per generator step, Adam;
* a sample is exactly what the critic is shown during training (:meth:`Generator.fake`): by default
  one count drawn per element from its row (Gumbel-max, straight-through gradient), decoded with
  :meth:`~agd.chem.encoding.Vocabulary.decode_probabilities`.

Two options aim at the per-element independence of the draws (measured trade-offs in issue 3's notes):
``entropy_weight`` adds the mean entropy of the generator's element rows to its loss, so that the input
noise rather than the draws decides which elements are present; ``sample_temperature`` sharpens the
draws when sampling (``probs ** (1 / T)``, 0: the most probable count), leaving training untouched.
``generator_design: slots`` (:class:`SlotGenerator`) removes the independence instead: the generator
picks up to ``slots`` elements one after another, each pick and its count conditioned on the noise and
on the earlier picks, and assembles the same one-hot matrix for the critic. ``generator_ema`` samples
and saves a running average of the generator's weights (its quality swings from epoch to epoch with
``n_critic`` 2 without it). bench/studies/gan_study.py measures these designs.

An epoch is one pass of the real data through the critic (``len(data) / batch_size / n_critic``
generator steps). Sampling streams in chunks whose noise is seeded by (seed, chunk index), so any chunk
can be drawn again on its own; that is what makes :func:`generate_candidates` resumable.

The paper's trims (atoms <= 20, elements <= 5, atoms per element <= 7) apply to the *reduced*
composition, the identity of a candidate: a reduced formula is in or out whichever multiple was sampled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from agd.chem.encoding import Vocabulary
from agd.chem.formula import FormulaError, formula_key, parse_formula, reduce_counts, reduced_formula
from agd.chem.validity import ValidityChecker
from agd.config import GanConfig, GenerateConfig, ValidityConfig

log = logging.getLogger(__name__)

#: ``GanConfig.training_data = "prepared"`` means this table (relative to the project root).
PREPARED_DATASET = Path("data/prepared/dataset.parquet")
#: Formula columns looked for in a training table, in this order.
FORMULA_COLUMNS = ("formula", "reduced_formula", "composition")
#: Columns of the candidate table written by :func:`generate_candidates`.
CANDIDATE_COLUMNS = [
    "run_id",
    "formula",
    "reduced_formula",
    "n_elements",
    "n_atoms",
    "max_count",
    "charge_neutral",
    "electronegativity_balanced",
    "valid",
    "novel",
    "reason",
    "source",
    "n_sampled",
    "first_sample",
]
SAMPLE_COLUMNS = ["sample", "formula", "reason", "n_elements", "n_atoms", "max_count", "divisor"]

_FORMAT = "agd-gan/1"
_PARTS_FORMAT = "agd-gan-candidates/1"
_PART_META_KEY = b"agd_gan_chunk"
#: Rows per generator forward pass while sampling (bounds memory; fixed so samples never depend on it).
_FORWARD_BATCH = 8192

EpochCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------
# trims
@dataclass(frozen=True)
class Trims:
    """Size limits on a composition; None switches a limit off."""

    max_atoms: int | None = 20
    max_elements: int | None = 5
    max_atoms_per_element: int | None = 7

    @classmethod
    def from_generate_config(cls, cfg: GenerateConfig) -> Trims:
        """The trims of the ``generate`` stage."""
        return cls(cfg.max_atoms, cfg.max_elements, cfg.max_atoms_per_element)

    @classmethod
    def from_gan_config(cls, cfg: GanConfig) -> Trims:
        """The trims applied to the GAN's training formulas."""
        return cls(cfg.max_atoms, cfg.max_elements, cfg.max_count)

    def mask(self, n_atoms: np.ndarray, n_elements: np.ndarray, max_count: np.ndarray) -> np.ndarray:
        """True where a composition with these statistics passes every trim."""
        ok = np.asarray(n_elements) > 0
        for limit, values in (
            (self.max_atoms, n_atoms),
            (self.max_elements, n_elements),
            (self.max_atoms_per_element, max_count),
        ):
            if limit is not None:
                ok &= np.asarray(values) <= limit
        return ok

    def misfit(self, counts: Mapping[str, int]) -> str | None:
        """Which trim ``counts`` breaks (None when it passes all)."""
        if self.max_atoms_per_element is not None and max(counts.values()) > self.max_atoms_per_element:
            return "max_atoms_per_element"
        if self.max_elements is not None and len(counts) > self.max_elements:
            return "max_elements"
        if self.max_atoms is not None and sum(counts.values()) > self.max_atoms:
            return "max_atoms"
        return None


# ---------------------------------------------------------------------------------------------
# networks
def _mlp(width: int, hidden: Sequence[int], out: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """Noise -> one distribution over counts 0..max_count per element (softmax over the count axis).

    What the critic is shown (:meth:`fake`) depends on ``output``:

    * ``"gumbel"``: one-hot counts drawn from each row's distribution (Gumbel-max), with the softmax's
      gradient (straight-through). Independent draws per element break a composition's correlations
      unless the rows are confident. In practice they are not: the 90-epoch default generator gives
      about 22 elements per sample a presence probability between 5 and 95 %, and its most probable
      counts decode to no element at all, so sampling must draw (see ``entropy_weight``).
    * ``"argmax"``: one-hot of the most probable counts, straight-through. Nothing asks for confidence:
      rows stay near uniform and small changes flip many elements at once (unstable in our runs).
    * ``"soft"``: the probabilities themselves (MATGAN). The critic tells them from one-hot data by
      their softness, and a generator close in Wasserstein distance can still decode to nothing (every
      count-0 cell just above the others).
    """

    def __init__(
        self,
        noise_dim: int,
        n_elements: int,
        n_counts: int,
        hidden: Sequence[int] = (256, 512),
        output: str = "gumbel",
        sample_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if output not in ("gumbel", "argmax", "soft"):
            raise ValueError(f"unknown generator output {output!r}: choose gumbel, argmax or soft")
        if sample_temperature < 0:
            raise ValueError(f"sample_temperature must be >= 0, got {sample_temperature}")
        self.noise_dim, self.n_elements, self.n_counts = noise_dim, n_elements, n_counts
        self.output = output
        #: temperature of the count draws when sampling formulas (training always draws at 1)
        self.sample_temperature = sample_temperature
        self.net = _mlp(noise_dim, hidden, n_elements * n_counts, nn.ReLU)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """Probabilities of shape (batch, n_elements, n_counts); each element row sums to 1."""
        logits = self.net(noise).view(-1, self.n_elements, self.n_counts)
        return torch.softmax(logits, dim=-1)

    def fake(
        self, noise: torch.Tensor, rng: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """What the critic is shown: one-hot counts (straight-through gradient) or the probabilities.

        ``temperature`` (gumbel only) draws each row's count from ``probs ** (1 / temperature)``
        renormalised; 0 takes the most probable count. The noise drawn does not depend on it.
        """
        return self.draw(self(noise), rng, temperature)

    def draw(
        self, probs: torch.Tensor, rng: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """:meth:`fake` from probabilities already computed by :meth:`forward`."""
        if self.output == "soft":
            return probs
        scores = probs
        if self.output == "gumbel":
            uniform = torch.rand(probs.shape, generator=rng).to(probs.device).clamp_(1e-12, 1 - 1e-7)
            if temperature > 0:
                log_p = probs.clamp_min(1e-12).log()
                scores = (log_p if temperature == 1.0 else log_p / temperature) - (-uniform.log()).log()
        return _StraightThrough.apply(probs, scores.detach())

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal input noise (batch, noise_dim) on the module's device."""
        device = next(self.parameters()).device
        return torch.randn(n, self.noise_dim, generator=generator).to(device)


class _StraightThrough(torch.autograd.Function):
    """Forward: one-hot of the best-scoring count; backward: the gradient goes to the probabilities."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(scores.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Critic(nn.Module):
    """Composition matrix -> unbounded score; no normalisation layers (the gradient penalty is per sample)."""

    def __init__(self, n_elements: int, n_counts: int, hidden: Sequence[int] = (512, 256)) -> None:
        super().__init__()
        self.net = _mlp(n_elements * n_counts, hidden, 1, lambda: nn.LeakyReLU(0.2))

    def forward(self, matrices: torch.Tensor) -> torch.Tensor:
        """Scores of shape (batch,)."""
        return self.net(matrices.flatten(1)).squeeze(-1)


class SlotGenerator(nn.Module):
    """Noise -> a composition built one element at a time (``generator_design: slots``).

    An MLP maps the noise to the state of a GRU cell. At each of ``slots`` steps the state gives logits
    over the elements not yet picked plus "stop"; one is drawn, then the count 1..max_count of the
    picked element is drawn from logits of the state and that element; the one-hot pick and count
    update the state. "Stop" cannot be drawn before ``min_slots`` elements are picked, and after it
    nothing more is added, so a sample holds ``min_slots``..``slots`` distinct elements. Every draw is
    conditioned on the noise and on the earlier draws, so which elements go together, and in what
    amounts, is learnt rather than drawn element by element.

    The critic sees the same one-hot matrix as with :class:`Generator`. Every draw is Gumbel-max with a
    straight-through gradient (one-hot forward, the gradient goes to the softmax it was drawn from).
    (Drawing the number of elements first, from its own head, with each pick weighted by a
    straight-through "k > t", collapsed to one or ``slots`` elements in our runs.)
    """

    output = "gumbel"

    def __init__(
        self,
        noise_dim: int,
        n_elements: int,
        n_counts: int,
        hidden: Sequence[int] = (256, 512),
        slots: int = 5,
        min_slots: int = 1,
        sample_temperature: float = 1.0,
        relaxation: float = 0.0,
        charge_guide: str = "off",
        oxidation_states: Sequence[Sequence[int] | None] | None = None,
        electronegativities: Sequence[float | None] | None = None,
    ) -> None:
        super().__init__()
        if sample_temperature < 0:
            raise ValueError(f"sample_temperature must be >= 0, got {sample_temperature}")
        if charge_guide not in _GUIDES:
            raise ValueError(f"unknown charge_guide {charge_guide!r}: choose one of {', '.join(_GUIDES)}")
        if not 1 <= min_slots <= slots <= n_elements or n_counts < 2:
            raise ValueError(
                f"need 1 <= min_slots <= slots <= n_elements and n_counts >= 2, "
                f"got {min_slots}, {slots}, {n_elements}, {n_counts}"
            )
        self.noise_dim, self.n_elements, self.n_counts = noise_dim, n_elements, n_counts
        self.slots, self.min_slots = slots, min_slots
        self.sample_temperature = sample_temperature
        if relaxation < 0:
            raise ValueError(f"relaxation must be >= 0, got {relaxation}")
        #: > 0: the straight-through gradient goes to the Gumbel-softmax at this temperature instead
        self.relaxation = relaxation
        #: "input": the GRU sees which total charges the picks so far can reach, and each pick and count
        #: head gets a learnt bonus for the choices that would make the composition charge neutral;
        #: "mask": that too, and the composition must be neutral to stop (:class:`_ChargeTracker`);
        #: "valid": as mask, with neutral meaning neutral with electronegativity-balanced ions
        self.charge_guide = charge_guide
        width = hidden[-1]
        guide_inputs = 0
        if charge_guide != "off":
            if oxidation_states is None or len(oxidation_states) != n_elements:
                raise ValueError(
                    f"charge_guide {charge_guide!r} needs the oxidation states of all {n_elements} elements"
                )
            states, known = _state_table(oxidation_states)
            if charge_guide == "valid":
                if electronegativities is None or len(electronegativities) != n_elements:
                    raise ValueError(
                        f"charge_guide 'valid' needs the electronegativities of all {n_elements} elements"
                    )
                rank, has_eneg = _eneg_ranks(electronegativities)
                known &= has_eneg.unsqueeze(-1)  # smact's Pauling test fails any pair with such an element
                self.register_buffer("eneg_rank", rank)
            # saved with the weights, so a loaded generator keeps the chemistry it was trained with
            self.register_buffer("oxidation_states", states)
            self.register_buffer("has_state", known)
            guide_inputs = 2 * _CHARGE_WINDOW + 1
            self.completion_weight = nn.Parameter(torch.zeros(2))  # pick bonus, count bonus
        self.start = nn.Sequential(_mlp(noise_dim, hidden[:-1], width, nn.ReLU), nn.Tanh())
        self.cell = nn.GRUCell(n_elements + 1 + n_counts - 1 + guide_inputs, width)
        self.pick = nn.Linear(width, n_elements + 1)  # last column: stop
        self.pick_embedding = nn.Linear(n_elements, width, bias=False)
        self.count = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_counts - 1))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        """Not defined: a slot generator's draws and probabilities cannot be separated; use :meth:`fake`."""
        raise TypeError("a slot generator has no per-row probabilities; call fake(noise, rng)")

    def fake(
        self, noise: torch.Tensor, rng: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """One-hot composition matrices (batch, n_elements, n_counts), straight-through.

        ``temperature`` scales every draw's log-probabilities by ``1 / temperature`` (0: the most
        probable pick and count at each step). The uniforms drawn do not depend on it.
        """
        batch, device = noise.shape[0], noise.device
        n_el, n_c, slots = self.n_elements, self.n_counts, self.slots
        uniform = torch.rand((batch, slots * (n_el + 1 + n_c - 1)), generator=rng).to(device)
        gumbel = -(-uniform.clamp(1e-12, 1 - 1e-7).log()).log()
        g_pick, g_count = gumbel.split([slots * (n_el + 1), slots * (n_c - 1)], dim=1)
        g_pick, g_count = g_pick.view(batch, slots, n_el + 1), g_count.view(batch, slots, n_c - 1)
        state = self.start(noise)
        taken = torch.zeros(batch, n_el + 1, dtype=torch.bool, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        present = noise.new_zeros(batch, n_el, n_c - 1)
        guide = (
            _ChargeTracker(
                self.oxidation_states,
                self.has_state,
                n_c - 1,
                slots,
                batch,
                self.eneg_rank if self.charge_guide == "valid" else None,
            )  # fmt: skip
            if self.charge_guide != "off"
            else None
        )
        for step in range(slots):
            # stopped rows may only stop again; the others pick an element not taken yet, or stop
            closed = taken.clone()
            closed[:, n_el] = step < self.min_slots
            pick_logits = self.pick(state)
            if guide is not None:
                completes = guide.completions()  # (batch, n_el, n_c - 1): that element and count neutralise
                pick_logits = pick_logits + self.completion_weight[0] * nn.functional.pad(
                    completes.any(-1).to(pick_logits.dtype), (0, 1)
                )
                if self.charge_guide in _MASKS:
                    # stop only when neutral; the last pick must make it neutral where some pick can
                    closed[:, n_el] |= ~guide.neutral()
                    if step == slots - 1:
                        fixable = completes.any(-1) & ~taken[:, :n_el]
                        closed[:, :n_el] |= ~fixable & fixable.any(-1, keepdim=True)
            closed[stopped] = True
            closed[stopped, n_el] = False
            pick = self._draw(pick_logits.masked_fill(closed, -1e9), g_pick[:, step], temperature)
            element = pick[:, :n_el]
            count_logits = self.count(state + self.pick_embedding(element))
            if guide is not None:
                picked = element.detach().argmax(-1)
                completing = completes[torch.arange(batch, device=device), picked]  # (batch, n_c - 1)
                count_logits = count_logits + self.completion_weight[1] * completing.to(count_logits.dtype)
                if self.charge_guide in _MASKS and step == slots - 1:
                    count_logits = count_logits.masked_fill(
                        ~completing & completing.any(-1, keepdim=True), -1e9
                    )
            count = self._draw(count_logits, g_count[:, step], temperature)
            present = present + element.unsqueeze(-1) * count.unsqueeze(1)
            hard = pick.detach() > 0.5
            if guide is not None:
                adds = hard[:, :n_el].any(-1)
                guide.add(picked, count.detach().argmax(-1) + 1, adds)
            stopped = stopped | hard[:, n_el]
            taken = taken | hard
            if step + 1 < slots:
                inputs = [pick, count] if guide is None else [pick, count, guide.window(_CHARGE_WINDOW)]
                state = self.cell(torch.cat(inputs, dim=1), state)
        absent = 1 - present.sum(-1, keepdim=True)
        return torch.cat([absent, present], dim=-1)

    def _draw(self, logits: torch.Tensor, gumbel: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=-1)
        if temperature > 0:
            scores = (log_p if temperature == 1.0 else log_p / temperature) + gumbel
        else:
            scores = log_p
        if self.relaxation > 0:
            soft = torch.softmax((log_p + gumbel) / self.relaxation, dim=-1)
        else:
            soft = log_p.exp()
        return _StraightThrough.apply(soft, scores.detach())

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal input noise (batch, noise_dim) on the module's device."""
        device = next(self.parameters()).device
        return torch.randn(n, self.noise_dim, generator=generator).to(device)


#: A slot generator's charge guides (:class:`SlotGenerator`); the masks decide when it may stop.
_GUIDES = ("off", "input", "mask", "valid")
_MASKS = ("mask", "valid")
#: Oxidation states kept per element by a charge-guided generator (smact's sets list at most 10).
_MAX_STATES = 12
#: Total charges -W..W of the picks so far are part of a charge-guided GRU's input.
_CHARGE_WINDOW = 12


def _state_table(oxidation_states: Sequence[Sequence[int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element its oxidation states, padded to :data:`_MAX_STATES`, and which entries are real."""
    states = torch.zeros(len(oxidation_states), _MAX_STATES, dtype=torch.long)
    known = torch.zeros(len(oxidation_states), _MAX_STATES, dtype=torch.bool)
    for i, options in enumerate(oxidation_states):
        options = sorted(set(options or ()))
        if len(options) > _MAX_STATES:
            raise ValueError(
                f"element {i} has {len(options)} oxidation states; at most {_MAX_STATES} are kept"
            )
        states[i, : len(options)] = torch.as_tensor(options, dtype=torch.long)
        known[i, : len(options)] = True
    return states, known


def _eneg_ranks(electronegativities: Sequence[float | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element its rank 1..m among the distinct electronegativities, and whether it has one."""
    has = torch.tensor([e is not None for e in electronegativities], dtype=torch.bool)
    values = sorted({float(e) for e in electronegativities if e is not None})
    position = {v: i + 1 for i, v in enumerate(values)}
    rank = [position[float(e)] if e is not None else 1 for e in electronegativities]
    return torch.tensor(rank, dtype=torch.long), has


class _ChargeTracker:
    """The total charges a partial composition can reach, one oxidation state per element (smact's rule).

    Charge only (``rank`` None): ``reach[b, 0, Q + q]`` is True when some choice of one listed oxidation
    state per picked element gives the picks of row ``b`` the total charge ``q``; an element without
    states empties the set, so that row can never be neutral. A composition is charge neutral in smact's
    sense exactly when 0 is reachable (``neutral_ratios`` with one stoichiometry per element is the sum
    rule).

    With ``rank`` (each element's electronegativity rank, 1..m, equal for equal values) the states must
    also pass smact's Pauling test: every cation (state > 0) less electronegative than every anion
    (state < 0). That holds exactly when some cut c in 0..m puts every cation at rank <= c and every anion
    above it, so the tracker keeps the reachable charges per cut. The picked elements' ranks split the
    cuts into at most ``slots + 1`` segments within which every cut reaches the same charges, so
    ``reach[b, s]`` is kept per segment: segment s holds the cuts ``lo[s] <= c < hi[s]`` and an element
    of rank r is on the cation side (states >= 0) of the segments with ``lo >= r``, on the anion side
    (states <= 0) of the others. Everything here follows the hard draws, so it carries no gradient.
    """

    def __init__(
        self,
        states: torch.Tensor,
        known: torch.Tensor,
        max_count: int,
        slots: int,
        batch: int,
        rank: torch.Tensor | None = None,
    ) -> None:
        device = states.device
        width = int(known.sum(-1).max()) if known.any() else 1  # states beyond this are padding everywhere
        self.states, self.known = states[:, :width], known[:, :width]
        self.q = int(states.abs().max()) * max_count * slots
        self.rank = rank
        segments = 1 if rank is None else slots + 1
        self.reach = torch.zeros(batch, segments, 2 * self.q + 1, dtype=torch.bool, device=device)
        self.reach[:, 0, self.q] = True
        if rank is not None:
            self.n_cuts = int(rank.max()) + 1  # cuts 0..m
            # segment boundaries, sorted; unused ones sit at n_cuts (empty segments)
            self.bounds = torch.full((batch, slots), self.n_cuts, dtype=torch.long, device=device)
        self.used = 1  # segments that can be non-empty so far
        # charge state * count for every (element, state, count)
        counts = torch.arange(1, max_count + 1, device=device)
        self.shift = self.states.unsqueeze(-1) * counts  # (n_el, K, max_count)
        self.as_cation = self.known & (self.states >= 0)  # a state an element may take below / above a cut
        self.as_anion = self.known & (self.states <= 0)

    def _segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, used) lower and upper cut of each segment in use, and whether it holds any cut."""
        bounds = self.bounds
        lo = torch.cat([torch.zeros_like(bounds[:, :1]), bounds], dim=1)[:, : self.used]
        hi = torch.cat([bounds, torch.full_like(bounds[:, :1], self.n_cuts)], dim=1)[:, : self.used]
        return lo, hi, lo < hi

    def _reachable(self) -> torch.Tensor:
        """(batch, 2Q + 1): charges reachable in some segment that holds a cut."""
        reach = self.reach[:, : self.used]
        if self.rank is None:
            return reach[:, 0]
        _, _, filled = self._segments()
        return (reach & filled.unsqueeze(-1)).any(1)

    def neutral(self) -> torch.Tensor:
        """(batch,) True where the picks so far can be charge neutral (and balanced, with ``rank``)."""
        return self._reachable()[:, self.q]

    def window(self, width: int) -> torch.Tensor:
        """(batch, 2 width + 1) float: which total charges -width..width are reachable."""
        return self._reachable()[:, self.q - width : self.q + width + 1].float()

    def completions(self) -> torch.Tensor:
        """(batch, n_el, max_count) True where adding that element with that count makes 0 reachable."""
        index = (self.q - self.shift).clamp(0, 2 * self.q)  # the charge the picks so far must reach
        reach = self.reach[:, : self.used]
        got = reach[:, :, index.flatten()].view(*reach.shape[:2], *self.shift.shape)  # (b, seg, el, K, c)
        if self.rank is None:
            return (got[:, 0] & self.known.unsqueeze(-1)).any(-2)
        as_cation = (got & self.as_cation.unsqueeze(-1)).any(-2)  # (b, seg, el, c)
        as_anion = (got & self.as_anion.unsqueeze(-1)).any(-2)
        lo, hi, filled = self._segments()
        # a segment lends the new element a cut at or above its rank (cation side) or below it (anion side)
        cation_ok = filled.unsqueeze(-1) & (hi.unsqueeze(-1) > self.rank)
        anion_ok = filled.unsqueeze(-1) & (lo.unsqueeze(-1) < self.rank)
        hit = (as_cation & cation_ok.unsqueeze(-1)) | (as_anion & anion_ok.unsqueeze(-1))
        return hit.any(1)

    def add(self, element: torch.Tensor, count: torch.Tensor, rows: torch.Tensor) -> None:
        """Add ``count`` atoms of ``element`` (per row; only where ``rows``) to the picks."""
        reach = self.reach
        if self.rank is None:
            allowed = self.known[element].unsqueeze(1)  # (batch, 1, K)
        else:
            # the new element's rank splits the segment that holds it in two
            r = self.rank[element]
            at = (self.bounds <= r.unsqueeze(-1)).sum(-1)  # the segment whose cuts include r
            seg = torch.arange(reach.shape[1], device=reach.device)
            source = (seg - (seg > at.unsqueeze(-1)).long()).unsqueeze(-1).expand(-1, -1, reach.shape[2])
            reach = torch.gather(reach, 1, source)
            slot = torch.arange(self.bounds.shape[1], device=reach.device)
            after = self.bounds.gather(1, (slot - 1).clamp(min=0).expand_as(self.bounds))
            bounds = torch.where(
                slot < at.unsqueeze(-1),
                self.bounds,
                torch.where(slot == at.unsqueeze(-1), r.unsqueeze(-1), after),
            )
            self.bounds = torch.where(rows.unsqueeze(-1), bounds, self.bounds)
            self.used = min(self.used + 1, reach.shape[1])
            lo = torch.cat([torch.zeros_like(bounds[:, :1]), bounds], dim=1)  # (batch, slots + 1)
            cation = (lo >= r.unsqueeze(-1)).unsqueeze(-1)  # (batch, seg, 1)
            allowed = torch.where(
                cation, self.as_cation[element].unsqueeze(1), self.as_anion[element].unsqueeze(1)
            )
        shifts = self.states[element] * count.unsqueeze(-1)  # (batch, K)
        width = reach.shape[-1]
        positions = torch.arange(width, device=reach.device)
        grown = torch.zeros_like(reach)
        for k in range(shifts.shape[1]):
            source = positions - shifts[:, k : k + 1]  # reach'[q] |= reach[q - shift]
            inside = ((source >= 0) & (source < width)).unsqueeze(1) & allowed[:, :, k : k + 1]
            index = source.clamp(0, width - 1).unsqueeze(1).expand_as(reach)
            grown |= torch.gather(reach, 2, index) & inside
        self.reach = torch.where(rows.view(-1, 1, 1), grown, self.reach)


def build_networks(
    cfg: GanConfig, vocab: Vocabulary, validity_cfg: ValidityConfig | None = None
) -> tuple[Generator | SlotGenerator, Critic]:
    """Untrained generator and critic for ``vocab``'s matrix shape (a charge guide takes its oxidation
    states from ``validity_cfg``'s set, the one candidates are checked with)."""
    n_elements, n_counts = vocab.shape
    if cfg.generator_design == "slots":
        states = enegs = None
        guide = cfg.charge_guide
        if guide != "off":
            checker = ValidityChecker(validity_cfg)
            data = [checker.element(symbol) for symbol in vocab.elements]
            states = [el.oxidation_states for el in data]
            if guide == "valid" and not checker.config.use_pauling_test:
                raise ValueError(
                    "charge_guide 'valid' guides towards the Pauling test, which validity.use_pauling_test "
                    "turns off: use charge_guide 'mask'"
                )
            enegs = [el.electronegativity for el in data] if guide == "valid" else None
        generator: Generator | SlotGenerator = SlotGenerator(
            cfg.noise_dim,
            n_elements,
            n_counts,
            cfg.generator_hidden,
            cfg.slots,
            cfg.min_slots,
            cfg.sample_temperature,
            cfg.relaxation,
            guide,
            states,
            enegs,
        )
    else:
        generator = Generator(
            cfg.noise_dim, n_elements, n_counts, cfg.generator_hidden, cfg.output, cfg.sample_temperature
        )
    return generator, Critic(n_elements, n_counts, cfg.critic_hidden)


# ---------------------------------------------------------------------------------------------
# training data
def read_training_compositions(
    source: str | os.PathLike | pd.DataFrame,
    cfg: GanConfig,
    validity_cfg: ValidityConfig | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[list[dict[str, int]], dict]:
    """Reduced, de-duplicated, trimmed compositions of a formula table, and a summary of what was dropped.

    ``source`` is a CSV/parquet path, ``"prepared"`` (the prepared dataset under ``root``) or a DataFrame.
    The summary's ``known_formulas`` lists the reduced formula of every parsable row (before the trims
    and the validity filter): the reference set for novelty.
    """
    frame = _read_table(source, root)
    column = next((c for c in FORMULA_COLUMNS if c in frame.columns), None)
    if column is None:
        raise ValueError(
            f"training data has none of the formula columns {FORMULA_COLUMNS}: {list(frame.columns)}"
        )
    trims = Trims.from_gan_config(cfg)
    seen: set[tuple[tuple[str, int], ...]] = set()
    compositions: list[dict[str, int]] = []
    dropped = {"unparsable": 0, "duplicate": 0, "max_atoms_per_element": 0, "max_elements": 0, "max_atoms": 0}
    known: list[dict[str, int]] = []
    for text in frame[column].to_numpy(dtype=object):
        try:
            counts = reduce_counts(parse_formula(text))
        except FormulaError:
            dropped["unparsable"] += 1
            continue
        item = tuple(sorted(counts.items()))
        if item in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(item)
        known.append(counts)
        why = trims.misfit(counts)
        if why is not None:
            dropped[why] += 1
            continue
        compositions.append(counts)
    dropped["invalid"] = 0
    if cfg.valid_only and compositions:
        valid = ValidityChecker(validity_cfg).check_counts(compositions)["valid"].to_numpy()
        dropped["invalid"] = int((~valid).sum())
        compositions = [c for c, ok in zip(compositions, valid, strict=True) if ok]
    if not compositions:
        raise ValueError(f"no training compositions left after the trims and filters (dropped: {dropped})")
    summary = {
        "rows": len(frame),
        "column": column,
        "dropped": dropped,
        "compositions": len(compositions),
        "known_formulas": [reduced_formula(c) for c in known],
    }
    return compositions, summary


def _read_table(source: str | os.PathLike | pd.DataFrame, root: str | os.PathLike | None) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    base = Path(root) if root is not None else Path.cwd()
    path = base / PREPARED_DATASET if str(source) == "prepared" else base / Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such training table")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    # keep_default_na=False: the formula "NaN" (sodium nitride) must stay text
    return pd.read_csv(path, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# training
def _critic_terms(
    critic: Critic, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator, gp_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(critic loss, Wasserstein estimate, gradient penalty) for one batch."""
    wasserstein = critic(real).mean() - critic(fake).mean()
    eps = torch.rand(real.shape[0], 1, 1, generator=rng).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    return -wasserstein + gp_weight * penalty, wasserstein, penalty


def train_gan(
    compositions: Sequence[Mapping[str, int]],
    vocab: Vocabulary,
    cfg: GanConfig,
    on_epoch: EpochCallback | None = None,
    *,
    validity_cfg: ValidityConfig | None = None,
    known_formulas: Iterable[str] | None = None,
    progress: bool = True,
) -> tuple[Generator, Critic, list[dict[str, float]]]:
    """Train a WGAN-GP on ``compositions``; deterministic for a seed on CPU; history has one row per epoch.

    Epoch 0 is the untrained baseline (losses on one batch, no update). Each row holds critic_loss,
    generator_loss, wasserstein (critic score gap real - fake), gradient_penalty, seconds and, when
    ``cfg.quality_samples`` > 0, the :func:`sample_quality` figures of that many fixed-noise samples
    (novelty against ``known_formulas``, default the training compositions).
    """
    slots = cfg.generator_design == "slots"
    if slots and (cfg.entropy_weight > 0 or cfg.diversity_weight > 0):
        raise ValueError(
            "entropy_weight and diversity_weight act on element rows: not with generator_design slots"
        )
    device = torch.device(cfg.device)
    counts = torch.as_tensor(vocab.counts_matrix(compositions), dtype=torch.long)
    n = len(counts)
    batch_size = min(cfg.batch_size, n)
    n_batches = n // batch_size
    n_counts = vocab.shape[1]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(cfg.seed)
        generator, critic = build_networks(cfg, vocab, validity_cfg)
    generator.to(device)
    critic.to(device)
    rng = torch.Generator().manual_seed(cfg.seed)
    # generator_ema: a running average of the generator's weights, what is sampled and returned
    average = copy.deepcopy(generator).requires_grad_(False) if cfg.generator_ema > 0 else None
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.learning_rate, betas=cfg.betas)
    keys = set(known_formulas) if known_formulas is not None else {reduced_formula(c) for c in compositions}
    checker = ValidityChecker(validity_cfg)
    trims = Trims.from_gan_config(cfg)

    def one_hot(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(counts[idx], n_counts).float().to(device)

    def quality() -> dict[str, float]:
        if cfg.quality_samples <= 0:
            return {}
        q = sample_quality(
            average if average is not None else generator,
            vocab,
            cfg.quality_samples,
            seed=cfg.seed,
            known_formulas=keys,
            checker=checker,
            trims=trims,
        )
        generator.train()
        return {k: v for k, v in q.items() if k not in ("n", "seconds")}

    history: list[dict[str, float]] = []

    def record(epoch: int, metrics: dict[str, float]) -> None:
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    # epoch 0: the untrained baseline, on a batch drawn from a separate RNG so training is unaffected
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:batch_size]
    real = one_hot(probe)
    with torch.no_grad():
        probe_rng = torch.Generator().manual_seed(cfg.seed + 1)
        fake = generator.fake(generator.noise(batch_size, probe_rng), probe_rng)
        g_loss0 = -critic(fake).mean().item()
    loss0, w0, gp0 = _critic_terms(
        critic, real, fake, torch.Generator().manual_seed(cfg.seed + 1), cfg.gp_weight
    )
    record(
        0,
        {
            "critic_loss": loss0.item(),
            "generator_loss": g_loss0,
            "wasserstein": w0.item(),
            "gradient_penalty": gp0.item(),
            "seconds": 0.0,
            **quality(),
        },
    )

    bar = tqdm(range(1, cfg.epochs + 1), desc="gan", unit="epoch", disable=not progress)
    for epoch in bar:
        start = time.perf_counter()
        generator.train()
        critic.train()
        order = torch.randperm(n, generator=rng)
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "gradient_penalty": 0.0, "generator_loss": 0.0}
        if cfg.entropy_weight > 0:
            sums["row_entropy"] = 0.0
        if cfg.diversity_weight > 0:
            sums["diversity"] = 0.0
        c_steps = g_steps = 0
        for b in range(n_batches):
            real = one_hot(order[b * batch_size : (b + 1) * batch_size])
            with torch.no_grad():
                fake = generator.fake(generator.noise(batch_size, rng), rng)
            loss, w, gp = _critic_terms(critic, real, fake, rng, cfg.gp_weight)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            sums["critic_loss"] += loss.item()
            sums["wasserstein"] += w.item()
            sums["gradient_penalty"] += gp.item()
            c_steps += 1
            if (b + 1) % cfg.n_critic == 0:
                noise = generator.noise(batch_size, rng)
                if slots:
                    g_loss = -critic(generator.fake(noise, rng)).mean()
                else:
                    probs = generator(noise)
                    g_loss = -critic(generator.draw(probs, rng)).mean()
                if cfg.entropy_weight > 0:
                    # confident rows make the input noise, not the per-element draws, carry the
                    # diversity, so an element's presence and count stay consistent with the rest
                    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
                    g_loss = g_loss + cfg.entropy_weight * entropy
                    sums["row_entropy"] += entropy.item()
                if cfg.diversity_weight > 0 and batch_size > 1:
                    # mode seeking (Mao et al. 2019): distant noise should give distant outputs
                    half = batch_size // 2
                    spread = (probs[:half] - probs[half : 2 * half]).abs().flatten(1).mean(1)
                    gap = (noise[:half] - noise[half : 2 * half]).abs().mean(1)
                    diversity = (spread / gap).mean()
                    g_loss = g_loss - cfg.diversity_weight * diversity
                    sums["diversity"] += diversity.item()
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                if average is not None:
                    with torch.no_grad():
                        for mean, current in zip(average.parameters(), generator.parameters(), strict=True):
                            mean.lerp_(current, 1 - cfg.generator_ema)
                sums["generator_loss"] += g_loss.item()
                g_steps += 1
        per_g_step = ("generator_loss", "row_entropy", "diversity")
        metrics = {k: v / max(c_steps, 1) for k, v in sums.items() if k not in per_g_step}
        for key in per_g_step:
            if key in sums:
                metrics[key] = sums[key] / g_steps if g_steps else float("nan")
        metrics["seconds"] = time.perf_counter() - start
        metrics.update(quality())
        record(epoch, metrics)
        bar.set_postfix(
            w=f"{metrics['wasserstein']:.3f}",
            valid=f"{metrics.get('validity_rate', float('nan')):.2f}",
            refresh=False,
        )
    if average is not None:
        generator.load_state_dict(average.state_dict())
    generator.eval()
    critic.eval()
    return generator, critic, history


# ---------------------------------------------------------------------------------------------
# persistence
@dataclass(frozen=True)
class GanBundle:
    """A trained GAN as saved by :func:`save_gan`."""

    generator: Generator | SlotGenerator
    critic: Critic
    vocab: Vocabulary
    config: GanConfig
    history: list[dict[str, float]]
    known_formulas: list[str] | None


def save_gan(
    directory: str | os.PathLike,
    generator: Generator | SlotGenerator,
    critic: Critic,
    vocab: Vocabulary,
    cfg: GanConfig,
    history: Sequence[Mapping[str, float]] = (),
    known_formulas: Iterable[str] | None = None,
) -> Path:
    """Write generator.pt, critic.pt, vocab.json, config.json, history.json (and known_formulas.txt)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(generator.state_dict(), out / "generator.pt")
    torch.save(critic.state_dict(), out / "critic.pt")
    vocab.save(out / "vocab.json")
    meta = {"format": _FORMAT, "gan": cfg.model_dump(mode="json"), "torch": torch.__version__}
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    (out / "history.json").write_text(json.dumps([_finite(row) for row in history], indent=1))
    if known_formulas is not None:
        (out / "known_formulas.txt").write_text("\n".join(sorted(set(known_formulas))) + "\n")
    return out


def _finite(row: Mapping[str, float]) -> dict[str, float | None]:
    """A metrics row with NaN written as null, so the JSON is strict."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def load_gan(directory: str | os.PathLike, device: str = "cpu") -> GanBundle:
    """Read a GAN written by :func:`save_gan` (networks in eval mode)."""
    src = Path(directory)
    meta = json.loads((src / "config.json").read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{src}: not a GAN folder written by save_gan (format {meta.get('format')!r})")
    cfg = GanConfig.model_validate(meta["gan"])
    vocab = Vocabulary.load(src / "vocab.json")
    generator, critic = build_networks(cfg, vocab)
    generator.load_state_dict(torch.load(src / "generator.pt", map_location=device, weights_only=True))
    critic.load_state_dict(torch.load(src / "critic.pt", map_location=device, weights_only=True))
    history_path = src / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    known_path = src / "known_formulas.txt"
    known = known_path.read_text().split() if known_path.exists() else None
    return GanBundle(generator.to(device).eval(), critic.to(device).eval(), vocab, cfg, history, known)


def train_gan_to_dir(
    cfg: GanConfig,
    out_dir: str | os.PathLike,
    validity_cfg: ValidityConfig | None = None,
    on_epoch: EpochCallback | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """The ``train gan`` stage: read ``cfg.training_data``, train, save to ``out_dir``; return a summary."""
    compositions, data = read_training_compositions(cfg.training_data, cfg, validity_cfg, root)
    vocab = Vocabulary.from_compositions(compositions, cfg.max_count)
    known = data.pop("known_formulas")
    start = time.perf_counter()
    generator, critic, history = train_gan(
        compositions, vocab, cfg, on_epoch, validity_cfg=validity_cfg, known_formulas=known, progress=progress
    )
    seconds = time.perf_counter() - start
    save_gan(out_dir, generator, critic, vocab, cfg, history, known)
    epochs = [row for row in history if row["epoch"] > 0]
    summary = {
        "data": data,
        "n_elements_vocab": len(vocab.elements),
        "train_seconds": seconds,
        "seconds_per_epoch": float(np.mean([row["seconds"] for row in epochs])) if epochs else 0.0,
        "final": _finite(history[-1]),
    }
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------
# sampling
def _chunk_rng(seed: int, chunk: int) -> torch.Generator:
    """The noise RNG of one chunk: depends on (seed, chunk index) only."""
    state = np.random.SeedSequence([seed % 2**64, chunk]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _sample_chunk(
    generator: Generator | SlotGenerator,
    vocab: Vocabulary,
    seed: int,
    chunk: int,
    start: int,
    size: int,
    temperature: float | None = None,
) -> pd.DataFrame:
    """Decoded samples ``start .. start + size - 1`` (chunk number ``chunk``); temperature None: the generator's."""
    rng = _chunk_rng(seed, chunk)
    temperature = generator.sample_temperature if temperature is None else temperature
    was_training = generator.training
    generator.eval()
    counts_parts, formulas, reasons = [], [], []
    with torch.no_grad():
        for lo in range(0, size, _FORWARD_BATCH):
            m = min(_FORWARD_BATCH, size - lo)
            probs = generator.fake(generator.noise(m, rng), rng, temperature).cpu().numpy()
            decoded = vocab.decode_probabilities(probs)
            counts_parts.append(decoded.counts)
            formulas += decoded.formulas
            reasons += decoded.reasons
    generator.train(was_training)
    counts = np.concatenate(counts_parts) if counts_parts else np.zeros((0, vocab.shape[0]), dtype=np.int16)
    divisor = np.gcd.reduce(counts.astype(np.int64), axis=1) if len(counts) else np.zeros(0, dtype=np.int64)
    formula_col = np.empty(size, dtype=object)
    formula_col[:] = formulas
    reason_col = np.empty(size, dtype=object)
    reason_col[:] = reasons
    return pd.DataFrame(
        {
            "sample": np.arange(start, start + size, dtype=np.int64),
            "formula": formula_col,
            "reason": reason_col,
            "n_elements": (counts > 0).sum(axis=1).astype(np.int16),
            "n_atoms": counts.sum(axis=1, dtype=np.int64).astype(np.int32),
            "max_count": counts.max(axis=1, initial=0).astype(np.int16),
            "divisor": np.maximum(divisor, 1).astype(np.int16),
        },
        columns=SAMPLE_COLUMNS,
    )


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(chunk_size, n - start)) for start in range(0, n, chunk_size)]


def sample_formulas(
    generator: Generator | SlotGenerator,
    vocab: Vocabulary,
    n: int,
    seed: int = 0,
    chunk_size: int = 100_000,
    temperature: float | None = None,
) -> Iterator[pd.DataFrame]:
    """Stream ``n`` decoded samples in chunks: sample index, formula (None + reason when not a formula),
    n_elements, n_atoms, max_count (of the sampled counts) and divisor (their gcd: reduced = counts / divisor).
    ``temperature`` None uses the generator's ``sample_temperature``.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    for chunk, (start, size) in enumerate(_chunks(n, chunk_size)):
        yield _sample_chunk(generator, vocab, seed, chunk, start, size, temperature)


def _reduced_stats(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_atoms, n_elements, max_count) of the reduced compositions of a sample frame."""
    divisor = frame["divisor"].to_numpy()
    return (
        frame["n_atoms"].to_numpy() // divisor,
        frame["n_elements"].to_numpy(),
        frame["max_count"].to_numpy() // divisor,
    )


def sample_quality(
    generator: Generator | SlotGenerator,
    vocab: Vocabulary,
    n: int,
    seed: int = 0,
    chunk_size: int = 100_000,
    *,
    known_formulas: Iterable[str] | None = None,
    checker: ValidityChecker | None = None,
    validity_cfg: ValidityConfig | None = None,
    trims: Trims | None = None,
    temperature: float | None = None,
) -> dict[str, float]:
    """Quality of ``n`` samples: decodable, within-trims, valid, unique and novel rates.

    decodable_rate: share of samples that decode to a formula; within_trims_rate: share whose reduced
    composition passes ``trims``; validity_rate: valid / decodable, where only compositions within the
    trims are checked (smact's search grows exponentially with the number of elements) and the others
    count as invalid; uniqueness: distinct reduced formulas / decodable; novelty: distinct reduced
    formulas not in ``known_formulas`` / distinct reduced formulas. The valid_* figures are the same
    restricted to valid samples; validity_rate_within_trims is valid / within trims; valid_unique_novel
    counts distinct valid novel formulas. Rates are NaN when their denominator is 0 (novelty also when
    nothing is known).
    """
    start = time.perf_counter()
    checker = checker if checker is not None else ValidityChecker(validity_cfg)
    trims = trims if trims is not None else Trims()
    known = set(known_formulas) if known_formulas is not None else None
    keys_parts, valid_parts = [], []
    n_decodable = n_trimmed = 0
    for frame in sample_formulas(generator, vocab, n, seed, chunk_size, temperature):
        formulas = frame["formula"].to_numpy()
        decodable = frame["formula"].notna().to_numpy()
        inside = decodable & trims.mask(*_reduced_stats(frame))
        n_decodable += int(decodable.sum())
        n_trimmed += int(inside.sum())
        checked = checker.check(formulas[inside])
        outside = [formula_key(f) for f in formulas[decodable & ~inside]]
        keys_parts += [checked["reduced_formula"].to_numpy(dtype=object), np.array(outside, dtype=object)]
        valid_parts += [checked["valid"].to_numpy(), np.zeros(len(outside), dtype=bool)]
    keys = np.concatenate(keys_parts) if keys_parts else np.zeros(0, dtype=object)
    valid = np.concatenate(valid_parts) if valid_parts else np.zeros(0, dtype=bool)
    unique = set(keys.tolist())
    unique_valid = set(keys[valid].tolist())
    n_valid = int(valid.sum())

    def rate(a: float, b: float) -> float:
        return a / b if b else math.nan

    novel = len(unique - known) if known is not None else 0
    novel_valid = len(unique_valid - known) if known is not None else 0
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "decodable_rate": rate(n_decodable, n),
        "within_trims_rate": rate(n_trimmed, n),
        "validity_rate": rate(n_valid, n_decodable),
        "validity_rate_within_trims": rate(n_valid, n_trimmed),
        "uniqueness": rate(len(unique), n_decodable),
        "novelty": rate(novel, len(unique)) if known is not None else math.nan,
        "valid_uniqueness": rate(len(unique_valid), n_valid),
        "valid_novelty": rate(novel_valid, len(unique_valid)) if known is not None else math.nan,
        "valid_unique_novel": float(novel_valid),
        "seconds": seconds,
        "valid_unique_per_second": rate(len(unique_valid), seconds),
    }


# ---------------------------------------------------------------------------------------------
# the generate stage
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunk_candidates(
    frame: pd.DataFrame, checker: ValidityChecker, trims: Trims
) -> tuple[pd.DataFrame, dict]:
    """Unique reduced formulas of one sample chunk that pass the trims, with validity, and chunk counts."""
    n_atoms, n_elements, max_count = _reduced_stats(frame)
    decodable = frame["formula"].notna().to_numpy()
    keep = decodable & trims.mask(n_atoms, n_elements, max_count)
    checked = checker.check(frame["formula"].to_numpy()[keep])
    rows = pd.DataFrame(
        {
            "formula": checked["formula"].to_numpy(),
            "reduced_formula": checked["reduced_formula"].to_numpy(),
            "n_elements": n_elements[keep].astype(np.int16),
            "n_atoms": n_atoms[keep].astype(np.int16),
            "max_count": max_count[keep].astype(np.int16),
            "charge_neutral": checked["charge_neutral"].to_numpy(),
            "electronegativity_balanced": checked["electronegativity_balanced"].to_numpy(),
            "valid": checked["valid"].to_numpy(),
            "reason": checked["reason"].to_numpy(dtype=object),
            "first_sample": frame["sample"].to_numpy()[keep],
        }
    )
    stats = {
        "samples": len(frame),
        "decodable": int(decodable.sum()),
        "within_trims": int(keep.sum()),
        "valid": int(rows["valid"].sum()),
    }
    return _merge_candidates(rows.assign(n_sampled=np.ones(len(rows), dtype=np.int64))), stats


def _merge_candidates(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per reduced formula: the earliest sample's formula and checks, and the total count."""
    rows = rows.sort_values("first_sample", kind="stable")
    totals = rows.groupby("reduced_formula", sort=False)["n_sampled"].sum()
    merged = rows.drop_duplicates("reduced_formula", keep="first").reset_index(drop=True)
    merged["n_sampled"] = merged["reduced_formula"].map(totals).to_numpy(dtype=np.int64)
    return merged


def merge_candidate_parts(
    parts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    known: Iterable[str],
    run_id: str,
    *,
    memory_mib: int = 256,
    temp_dir: str | os.PathLike | None = None,
    threads: int = 2,
) -> dict[str, int]:
    """Merge chunk files into the candidate table, out of core; returns the table's counts.

    Same rows as :func:`_merge_candidates` over all parts at once (one row per reduced formula, the
    earliest sample's formula and checks, ``n_sampled`` summed, in order of first sample), plus
    ``novel`` (reduced formula not in ``known``), ``run_id`` and ``source``. DuckDB does the grouping,
    the join and the sort within ``memory_mib`` and spills to ``temp_dir`` beyond it, so memory stays
    flat however many candidates there are (``tests/models/test_gan_merge.py`` has the measured figures).
    The table is written to a temporary file and renamed: a killed merge leaves no partial output.
    """
    import duckdb
    import pyarrow as pa

    paths = [str(Path(p)) for p in parts]
    if not paths:
        raise ValueError("no candidate parts to merge")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    spill = Path(temp_dir) if temp_dir is not None else out.with_name(f".{out.name}.spill")
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": f"{int(memory_mib)}MB", "threads": int(threads)})
    try:
        con.execute("SET temp_directory = ?", [str(spill)])
        con.execute("SET preserve_insertion_order = false")
        known_keys = pa.table({"key": pa.array(sorted(set(known)), type=pa.string())})
        con.register("known_keys", known_keys)
        # Pass 1 groups only the key and two integers (spillable); pass 2 joins the parts back on
        # first_sample, which is a row id: every sample index yields one formula, in one part.
        columns = ", ".join(
            {
                "run_id": "$run_id::VARCHAR AS run_id",
                "novel": "(k.key IS NULL) AS novel",
                "source": "'gan' AS source",
                "n_sampled": "g.n_sampled",
            }.get(c, f"r.{c}")
            for c in CANDIDATE_COLUMNS
        )
        query = f"""
            COPY (
                WITH g AS (
                    SELECT min(first_sample) AS first_sample, CAST(sum(n_sampled) AS BIGINT) AS n_sampled
                    FROM read_parquet($paths)
                    GROUP BY reduced_formula
                )
                SELECT {columns}
                FROM read_parquet($paths) r
                JOIN g ON r.first_sample = g.first_sample
                LEFT JOIN known_keys k ON k.key = r.reduced_formula
                ORDER BY r.first_sample
            ) TO '{_sql_path(tmp)}' (FORMAT parquet, COMPRESSION snappy)
        """
        con.execute(query, {"run_id": run_id, "paths": paths})
        counts = con.execute(
            "SELECT count(*), count(*) FILTER (valid), count(*) FILTER (novel), "
            "count(*) FILTER (valid AND novel) FROM read_parquet(?)",
            [str(tmp)],
        ).fetchone()
    finally:
        con.close()
        shutil.rmtree(
            spill, onerror=lambda _f, path, exc: log.warning("could not remove %s: %s", path, exc[1])
        )
    os.replace(tmp, out)
    return dict(zip(("unique", "valid", "novel", "valid_novel"), map(int, counts), strict=True))


def _sql_path(path: Path) -> str:
    """A file path as a single-quoted SQL literal's body (COPY ... TO does not take parameters)."""
    return str(path).replace("'", "''")


def _write_part(path: Path, table: pd.DataFrame, stats: dict) -> None:
    """Write one chunk's candidates atomically, with the chunk's counts in the parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(arrow.schema.metadata or {})
    meta[_PART_META_KEY] = json.dumps(stats).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)


def _read_part_stats(path: Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[_PART_META_KEY])


def _prepare_parts_dir(parts_dir: Path, manifest: dict) -> None:
    """Keep finished parts only when they were made with the same generator and settings."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = parts_dir / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if old != manifest:
        stale = sorted(parts_dir.glob("part-*.parquet")) + sorted(parts_dir.glob(".part-*.tmp"))
        if stale:
            log.info("removing %d stale candidate parts in %s (settings changed)", len(stale), parts_dir)
        for path in stale:
            path.unlink()
        manifest_path.write_text(json.dumps(manifest, indent=1))


def generate_candidates(
    gen_dir: str | os.PathLike,
    out_parquet: str | os.PathLike,
    gen_cfg: GenerateConfig,
    validity_cfg: ValidityConfig | None,
    training_formulas: Iterable[str] | None,
    run_id: str,
    *,
    parts_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """The ``generate`` stage: sample, trim, check, de-duplicate, mark novelty; write unique candidates.

    Chunk results go to ``parts_dir`` (default ``<out>.parts`` beside the output) as they finish; a
    re-run with the same generator and settings skips finished chunks, and the same seed gives the same
    table. Novelty is against ``training_formulas`` (None: the known formulas saved with the GAN).
    Returns JSON-ready metrics, including the :func:`sample_quality` report on ``metrics_samples``.
    """
    gen_path = Path(gen_dir)
    out = Path(out_parquet)
    bundle = load_gan(gen_path)
    trims = Trims.from_generate_config(gen_cfg)
    validity_cfg = validity_cfg if validity_cfg is not None else ValidityConfig()
    if training_formulas is None:
        if bundle.known_formulas is None:
            raise ValueError(f"{gen_path}: no known_formulas.txt; pass training_formulas for novelty")
        training_formulas = bundle.known_formulas
    known = _formula_keys(training_formulas)
    manifest = {
        "format": _PARTS_FORMAT,
        "generator_sha256": _file_sha256(gen_path / "generator.pt"),
        "vocab_sha256": _file_sha256(gen_path / "vocab.json"),
        "n_samples": gen_cfg.n_samples,
        "chunk_size": gen_cfg.chunk_size,
        "seed": gen_cfg.seed,
        "sample_temperature": bundle.generator.sample_temperature,
        "trims": asdict(trims),
        "validity": validity_cfg.model_dump(mode="json"),
        "smact": version("smact"),
    }
    parts = Path(parts_dir) if parts_dir is not None else out.with_name(f"{out.stem}.parts")
    _prepare_parts_dir(parts, manifest)
    checker = ValidityChecker(validity_cfg, n_jobs=gen_cfg.n_jobs)
    chunks = _chunks(gen_cfg.n_samples, gen_cfg.chunk_size)
    resumed = 0
    start = time.perf_counter()
    for chunk, (first, size) in enumerate(tqdm(chunks, desc="generate", unit="chunk", disable=not progress)):
        path = parts / f"part-{chunk:05d}.parquet"
        if path.exists():
            resumed += 1
            continue
        t0 = time.perf_counter()
        frame = _sample_chunk(bundle.generator, bundle.vocab, gen_cfg.seed, chunk, first, size)
        table, stats = _chunk_candidates(frame, checker, trims)
        stats["seconds"] = time.perf_counter() - t0
        _write_part(path, table, stats)
    paths = [parts / f"part-{chunk:05d}.parquet" for chunk in range(len(chunks))]
    totals = {"samples": 0, "decodable": 0, "within_trims": 0, "valid": 0, "seconds": 0.0}
    for path in paths:
        for key, value in _read_part_stats(path).items():
            totals[key] += value
    counts = merge_candidate_parts(
        paths, out, known, run_id, memory_mib=gen_cfg.merge_memory_mib, temp_dir=parts / "merge.tmp"
    )
    n_valid_unique = counts["valid"]
    metrics: dict = {
        "n_samples": totals["samples"],
        "n_decodable": totals["decodable"],
        "n_within_trims": totals["within_trims"],
        "n_valid_samples": totals["valid"],
        "n_unique": counts["unique"],
        "n_unique_valid": n_valid_unique,
        "n_unique_novel": counts["novel"],
        "n_unique_valid_novel": counts["valid_novel"],
        "chunks": len(chunks),
        "chunks_resumed": resumed,
        "sampling_seconds": totals["seconds"],
        "wall_seconds": time.perf_counter() - start,
        "valid_unique_per_second": n_valid_unique / totals["seconds"] if totals["seconds"] else math.nan,
    }
    if gen_cfg.metrics_samples > 0:
        metrics["quality"] = sample_quality(
            bundle.generator,
            bundle.vocab,
            gen_cfg.metrics_samples,
            seed=gen_cfg.seed,
            chunk_size=gen_cfg.chunk_size,
            known_formulas=known,
            checker=checker,
            trims=trims,
        )
    return metrics


def _formula_keys(formulas: Iterable[str]) -> set[str]:
    """Composition keys of formulas; unparsable ones are skipped."""
    keys = set()
    for text in formulas:
        try:
            keys.add(formula_key(text))
        except FormulaError:
            continue
    return keys
