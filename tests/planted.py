"""Planted features for tests: token rules over a toy vocabulary, and text that contains them."""

from __future__ import annotations

import torch

NOISE_LOW, NOISE_HIGH = 30, 100
"""Background text is drawn from these ids, so no rule fires by accident."""


def text(seed: int, patterns, n: int = 160, length: int = 64, rate: float = 0.35,
         low: int = NOISE_LOW, high: int = NOISE_HIGH) -> torch.Tensor:
    """``n`` excerpts of random noise tokens (ids ``low`` to ``high - 1``) with each pattern planted at random places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(low, high, (n, length), generator=g)
    for pattern in patterns:
        for b in range(n):
            if torch.rand(1, generator=g).item() < rate:
                end = int(torch.randint(len(pattern) + 1, length, (1,), generator=g))
                x[b, end - len(pattern) + 1 : end + 1] = torch.tensor(pattern)
    return x


def shifted(x: torch.Tensor, d: int, fill: int = -1) -> torch.Tensor:
    """The token ``d`` positions earlier at every position (``fill`` before the start)."""
    out = torch.full_like(x, fill)
    if d < x.shape[1]:
        out[:, d:] = x[:, : x.shape[1] - d]
    return out


def single(x):  # token 7 fires
    return (x == 7).float() * 2.5


def after(x):  # token 8 only right after token 9
    return ((x == 8) & (shifted(x, 1) == 9)).float()


def gap(x):  # token 10 when token 11 is two back, anything in between
    return ((x == 10) & (shifted(x, 2) == 11)).float()


def either(x):  # token 12 or token 13
    return ((x == 12) | (x == 13)).float()


def strengths(x):  # token 14 strongly, token 15 at 60 %
    return (x == 14).float() * 4.0 + (x == 15).float() * 2.4


def two_context(x):  # token 16 only after 18 17
    return ((x == 16) & (shifted(x, 1) == 17) & (shifted(x, 2) == 18)).float()


def dead(x):
    return torch.zeros(x.shape)


def negative(x):  # fires negative on token 19
    return -(x == 19).float() * 1.5


def after_family(x):  # token 8 after any of 9, 21, 22 (but not 23)
    prev = shifted(x, 1)
    return ((x == 8) & ((prev == 9) | (prev == 21) | (prev == 22))).float()


RULES = {
    "single": (single, [[7]]),
    "after": (after, [[9, 8], [8], [9]]),
    "gap": (gap, [[11, 40, 10], [11, 55, 10], [10], [11, 10]]),
    "either": (either, [[12], [13]]),
    "strengths": (strengths, [[14], [15]]),
    "two_context": (two_context, [[18, 17, 16], [17, 16], [18, 16], [16]]),
    "negative": (negative, [[19]]),
}
"""name -> (feature, patterns planted in train and held-out text); negative is distilled with sign=negative."""
