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
"""The largest value the float16 store holds; a larger activation is kept at it (the scan warns)."""
FLOAT16_FAINT = 2.0 ** -18
"""A neuron whose largest value (either sign) is below this spans fewer than 64 of the float16 store's smallest
steps (2^-24, about 6e-8), and below that step is kept as 0 (the scan warns)."""


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

    def __post_init__(self) -> None:
        self._row = {int(e): r for r, e in enumerate(self.excerpts)}

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
        if excerpts is None:
            return np.asarray(column, np.float32)
        return np.asarray(column[self.rows(excerpts)], np.float32)

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
    def open(cls, path: Path, excerpts: np.ndarray) -> "ActivationStore":
        values = np.load(path, mmap_mode="r", allow_pickle=False)
        if values.dtype != np.float16 or values.ndim != 3 or values.shape[1] != len(excerpts):
            raise ValueError(f"unexpected store shape {values.shape} / dtype {values.dtype}")
        return cls(values, np.asarray(excerpts, np.int64), path)

    def write(self, excerpts: np.ndarray, acts: torch.Tensor) -> None:
        """Write ``acts`` (``[B, length, d_mlp]``, raw, on any device) of the stored ones among ``excerpts``.

        The rows are picked, clipped to the float16 range, converted and laid out neuron-major on the
        tensor's own device (a GPU does it in milliseconds), so the host only copies half the bytes
        into the store: no per-layer float32 copy, transpose or conversion in numpy.
        """
        keep = [b for b, e in enumerate(excerpts) if int(e) in self._row]
        if not keep:
            return
        rows = self.rows([excerpts[b] for b in keep])
        if len(keep) < acts.shape[0]:
            acts = acts[torch.as_tensor(keep, device=acts.device)]
        block = acts.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).permute(2, 0, 1).contiguous().cpu().numpy()
        if rows[-1] - rows[0] + 1 == len(rows):  # consecutive rows: one slice write
            self.values[:, rows[0] : rows[-1] + 1, :] = block
        else:
            self.values[:, rows, :] = block

    def flush(self) -> None:
        if isinstance(self.values, np.memmap):
            self.values.flush()
