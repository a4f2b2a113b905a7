"""The per-token activation store: what the scan measured, kept on disk for the later stages.

One store per scanned layer holds the activation of every neuron at every token of the stored
excerpts, in 16 bits, neuron-major (``[d_mlp, n_stored, length]``), so one neuron's evidence is
one contiguous read of a memory-mapped ``.npy`` file and memory stays flat however long the
corpus. Which excerpts are stored is decided by a token budget: all of them when the corpus fits,
otherwise a seeded subset (a prefix of the same permutation the random pool is drawn from, so the
pool is always stored). Fitting reads training evidence and held-out test activations from here
instead of running those excerpts through the model again.

The corpus-level partition lives here too: every excerpt is training or held-out, decided once per
run by a seeded draw, and every method learns only from the training side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import N2GError

DEFAULT_STORE_TOKENS = 1 << 17
"""Token budget of the store per layer (about 400 MB per layer for a 1,536-neuron MLP in 16 bits)."""
FLOAT16_MAX = 65504.0
"""The largest value float16 holds. A neuron that reaches beyond it is stored scaled down by a power of two."""
FLOAT16_FAINT = 2.0 ** -18
"""A neuron whose largest value (either sign) is below this would span fewer than 64 of float16's smallest steps
(2^-24, about 6e-8); it is stored scaled up by a power of two."""
SCALED_PEAK_BITS = 11
"""A neuron stored scaled has its largest value stored in [2^10, 2^11): room above it for text the scan did not
see (model-written text, tokens after other contexts) and float16's full relative precision below it."""


def store_exponents(peak) -> torch.Tensor:
    """``[d]`` int32 power-of-two exponents ``e`` a float16 store of activations divides each neuron by (stores
    ``x * 2**-e``; reads ``stored * 2**e``, exact: a power of two only moves float16's exponent), from each neuron's
    largest absolute value ``peak`` (a tensor or array). 0 for a neuron float16 holds as it is, so such a neuron is
    stored bit for bit as without it; beyond float16's range or below :data:`FLOAT16_FAINT`, the exponent that puts
    the peak at 2^10-2^11. Never lower for a larger peak, so a store that follows a growing peak only divides."""
    peak = torch.as_tensor(peak).float().abs()
    _, e = torch.frexp(peak)  # peak = m * 2**e, 0.5 <= m < 1
    out_of_range = (peak > FLOAT16_MAX) | ((peak > 0) & (peak < FLOAT16_FAINT))
    return torch.where(out_of_range, e - SCALED_PEAK_BITS, torch.zeros_like(e)).to(torch.int32)


def to_float16(acts: torch.Tensor, exponents: torch.Tensor | None) -> torch.Tensor:
    """``acts`` (neurons last) divided by ``2**exponents`` (one per neuron, None for none), clipped to float16's
    range and converted: how every float16 copy of activations is made (see :func:`store_exponents`)."""
    if exponents is not None and bool((exponents != 0).any()):
        acts = acts.float() * torch.exp2(-exponents.to(device=acts.device, dtype=torch.float32))
    return acts.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)


def from_float16(values: np.ndarray, exponents) -> np.ndarray:
    """float32 ``values * 2**exponents`` (broadcast; the inverse of :func:`to_float16`)."""
    values = np.asarray(values, np.float32)
    exponents = np.asarray(exponents, np.int32)
    return np.ldexp(values, exponents) if exponents.any() else values


def partition(n_excerpts: int, held_out: float, seed: int = 0, excerpts=None) -> np.ndarray:
    """Boolean ``[n_excerpts]``: True for training excerpts, False for held-out ones (seeded).

    Exactly ``round(held_out * n)`` excerpts are held out (at least one of each side when n >= 2): the first
    of a seeded draw. With ``excerpts`` (their token ids: a ``[n, length]`` array or tensor, or one sequence
    per excerpt) identical excerpts stay on one side, so held-out text never repeats training text (a corpus
    of repeated documents would score memorised text): the draw is walked as before, and the first copy of an
    excerpt drawn decides the side of all its copies, held out while fewer than that many are. A corpus
    without repeats is split as without ``excerpts``; should every distinct excerpt land on the held-out
    side, the one drawn last is trained on, so a corpus of one distinct excerpt is all training, as one
    excerpt is.
    """
    if not 0.0 < held_out < 1.0:
        raise N2GError(f"held_out must be between 0 and 1 (got {held_out})")
    n_out = int(round(held_out * n_excerpts))
    if n_excerpts >= 2:
        n_out = min(max(n_out, 1), n_excerpts - 1)
    rng = np.random.default_rng(seed + 104729)
    is_train = np.ones(n_excerpts, bool)
    order = rng.permutation(n_excerpts)
    if excerpts is None or n_excerpts < 2:
        is_train[order[:n_out]] = False
        return is_train
    import hashlib

    if isinstance(excerpts, torch.Tensor):
        excerpts = excerpts.numpy()
    if len(excerpts) != n_excerpts:
        raise N2GError(f"partition: {len(excerpts)} excerpts given for {n_excerpts}")
    first_of: dict[bytes, int] = {}  # a digest of an excerpt's ids -> its first copy in the draw
    first = np.empty(n_excerpts, np.int64)
    for i in order.tolist():
        key = hashlib.blake2b(np.ascontiguousarray(excerpts[i], dtype=np.int64).tobytes(), digest_size=16).digest()
        first[i] = first_of.setdefault(key, i)
    copies = np.bincount(first, minlength=n_excerpts)
    held = 0
    for f in first_of.values():  # the distinct excerpts in the order of the draw
        if held < n_out:
            is_train[f] = False
            held += int(copies[f])
    is_train = is_train[first]
    if not is_train.any():  # every distinct excerpt went to the held-out side: train on the one drawn last
        is_train[first == f] = True
    return is_train


def stored_excerpts(n_excerpts: int, length: int, budget_tokens: int | None, seed: int = 0) -> np.ndarray:
    """Sorted excerpt indices the store keeps: all when they fit the budget, else a seeded prefix."""
    from .examples import random_pool

    if budget_tokens is None or n_excerpts * length <= budget_tokens:
        return np.arange(n_excerpts)
    keep = max(1, budget_tokens // max(length, 1))
    return np.sort(np.asarray(random_pool(n_excerpts, keep, seed), dtype=np.int64))


@dataclass
class ActivationStore:
    """Per-token activations of every neuron of one layer on the stored excerpts (raw scale)."""

    values: np.ndarray
    """``[d_mlp, n_stored, length]`` float16 (a memory map when it lives on disk)."""
    excerpts: np.ndarray
    """``[n_stored]`` sorted excerpt indices of the stored rows."""
    path: Path | None = None
    exponents: np.ndarray | None = None
    """``[d_mlp]`` int32: neuron n is stored as ``activation * 2**-exponents[n]`` (see :func:`store_exponents`;
    all 0 unless a neuron reaches beyond float16's range or peaks below :data:`FLOAT16_FAINT`)."""

    def __post_init__(self) -> None:
        self._row = {int(e): r for r, e in enumerate(self.excerpts)}
        if self.exponents is None:
            self.exponents = np.zeros(self.values.shape[0], np.int32)
        self.exponents = np.asarray(self.exponents, np.int32)
        self._peak: torch.Tensor | None = None  # while written: each neuron's largest absolute value so far
        self._written: torch.Tensor | None = None  # while written: :attr:`exponents` on the activations' device

    @property
    def n_stored(self) -> int:
        return int(self.excerpts.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.values.size) * self.values.itemsize

    def has(self, excerpt: int) -> bool:
        return int(excerpt) in self._row

    def rows(self, excerpts: Sequence[int]) -> np.ndarray:
        """Store rows of excerpts (each must be stored)."""
        try:
            return np.fromiter((self._row[int(e)] for e in excerpts), np.int64, len(excerpts))
        except KeyError as exc:
            raise N2GError(f"excerpt {exc.args[0]} is not in the activation store") from None

    def neuron(self, index: int, excerpts: Sequence[int] | None = None) -> np.ndarray:
        """``[n, length]`` float32 activations of one neuron (all stored rows, or the given excerpts)."""
        column = self.values[index]
        return from_float16(column if excerpts is None else column[self.rows(excerpts)], self.exponents[index])

    @classmethod
    def create(cls, d_mlp: int, excerpts: np.ndarray, length: int, path: Path | None) -> "ActivationStore":
        """An empty store, in memory (``path`` None) or as a new ``.npy`` file at ``path``."""
        shape = (d_mlp, int(len(excerpts)), length)
        if path is None:
            values = np.zeros(shape, np.float16)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            values = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
            if hasattr(os, "posix_fallocate"):  # claim the disk now: a full disk is an OSError here, not a
                with open(path, "r+b") as f:     # SIGBUS on some page write of the map later
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return cls(values, np.asarray(excerpts, np.int64), path)

    @classmethod
    def open(cls, path: Path, excerpts: np.ndarray, exponents: np.ndarray | None = None) -> "ActivationStore":
        values = np.load(path, mmap_mode="r", allow_pickle=False)
        if values.dtype != np.float16 or values.ndim != 3 or values.shape[1] != len(excerpts):
            raise ValueError(f"unexpected store shape {values.shape} / dtype {values.dtype}")
        if exponents is not None and len(exponents) != values.shape[0]:
            raise ValueError(f"{len(exponents)} exponents for a store of {values.shape[0]} neurons")
        return cls(values, np.asarray(excerpts, np.int64), path, exponents)

    def write(self, excerpts: np.ndarray, acts: torch.Tensor, peak: torch.Tensor | None = None) -> None:
        """Write ``acts`` (``[B, length, d_mlp]``, raw, on any device) of the stored ones among ``excerpts``.

        The rows are picked, scaled (:func:`store_exponents`, from each neuron's largest value in every batch
        written so far, stored or not: the scan's own maximum), converted and laid out neuron-major on the
        tensor's own device (a GPU does it in milliseconds), so the host only copies half the bytes into the
        store: no per-layer float32 copy, transpose or conversion in numpy. When a batch takes a neuron's
        peak beyond what its exponent holds, the rows already written for it are divided to the new one.
        ``peak``: each neuron's largest absolute value in ``acts`` where the caller has it (the scan does).
        """
        if peak is None:
            peak = torch.maximum(acts.amax(dim=(0, 1)), -acts.amin(dim=(0, 1)))
        peak = peak.float()
        self._peak = peak if self._peak is None else torch.maximum(self._peak, peak)
        want = store_exponents(self._peak)
        if self._written is None or not torch.equal(want, self._written):  # (one scalar back from a GPU)
            self._rescale(want.cpu().numpy())
            self._written = want
        keep = [b for b, e in enumerate(excerpts) if int(e) in self._row]
        if not keep:
            return
        rows = self.rows([excerpts[b] for b in keep])
        if len(keep) < acts.shape[0]:
            acts = acts[torch.as_tensor(keep, device=acts.device)]
        block = to_float16(acts, want if self.exponents.any() else None).permute(2, 0, 1).contiguous().cpu().numpy()
        if rows[-1] - rows[0] + 1 == len(rows):  # consecutive rows: one slice write
            self.values[:, rows[0] : rows[-1] + 1, :] = block
        else:
            self.values[:, rows, :] = block

    def _rescale(self, exponents: np.ndarray) -> None:
        """Move the neurons whose exponent changed to ``exponents`` (the rows written so far, exactly: a power
        of two; values that fall below float16's smallest step relative to a new, larger peak become 0)."""
        for n in np.flatnonzero(exponents != self.exponents).tolist():
            shift = int(self.exponents[n]) - int(exponents[n])
            self.values[n] = np.ldexp(np.asarray(self.values[n], np.float32), shift).astype(np.float16)
        self.exponents = exponents.astype(np.int32)

    def flush(self) -> None:
        if isinstance(self.values, np.memmap):
            self.values.flush()
