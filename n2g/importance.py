"""Importance by occlusion.

For a sequence of length L, L copies each have one token replaced by a neutral occlusion token;
one batch gives the activation of every later token under every occlusion, hence the whole
``L x L`` matrix ``importance[k, j] = clip(1 - act_occluded_k(j) / act(j), 0, 1)`` for ``k <= j``.
Tokens that do not activate (``act(j) <= 0``) have no importance row to speak of and get zeros.
"""

from __future__ import annotations

import numpy as np

from .features import Evaluate, Steps


def occluded_copies(ids: list[int], occlusion_id: int) -> list[list[int]]:
    """The L copies of ``ids`` with token k replaced by ``occlusion_id``."""
    copies = []
    for k in range(len(ids)):
        copy = list(ids)
        copy[k] = occlusion_id
        copies.append(copy)
    return copies


def importance_matrix(acts: np.ndarray, occluded: list[np.ndarray]) -> np.ndarray:
    """``[k, j]`` importance of token k for token j from the clean and occluded activations."""
    acts = np.asarray(acts, np.float64)
    occ = np.stack([np.asarray(o, np.float64) for o in occluded]) if occluded else np.zeros((0, len(acts)))
    with np.errstate(divide="ignore", invalid="ignore"):
        imp = 1.0 - occ / acts[None, :]
    imp = np.where(acts[None, :] > 0, imp, 0.0)
    imp = np.nan_to_num(np.clip(imp, 0.0, 1.0))
    return np.triu(imp).astype(np.float32)  # a causal feature: k > j cannot matter


def importance_steps(seqs: list[list[int]], acts: list[np.ndarray], occlusion_id: int,
                     diagonal_last: bool = True) -> Steps:
    """Generator stage: importance matrices of many sequences from one batch of occluded copies.

    With ``diagonal_last=False`` the copy that occludes a sequence's last token is not run: it
    changes only that token's own activation, and ``[L-1, L-1]`` (a token's importance for itself)
    is never a context edge. That entry is then 0.
    """
    requests: list[list[int]] = []
    for ids in seqs:
        copies = occluded_copies(ids, occlusion_id)
        requests.extend(copies if diagonal_last or len(ids) < 2 else copies[:-1])
    answers = (yield Evaluate(requests, "importance")) if requests else []
    out, at = [], 0
    for ids, a in zip(seqs, acts):
        n = len(ids) if diagonal_last or len(ids) < 2 else len(ids) - 1
        rows = list(answers[at : at + n])
        if n < len(ids):
            rows.append(np.asarray(a, np.float64))  # not occluded: importance 0 for the last token itself
        out.append(importance_matrix(a, rows))
        at += n
    return out
