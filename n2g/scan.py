"""One-pass scan: every neuron of the requested layers over the whole corpus.

A single forward pass per batch of excerpts (stopping after the deepest requested layer) feeds,
for every neuron of every requested layer, a running top-K of excerpts by maximum activation and
a bottom-K by minimum (for the negative side), kept on the model's device, so memory stays flat
however long the corpus. A second, small pass over a seeded random pool of excerpts gives
quantiles and firing rates. Whole layers are scanned (one neuron costs the same forward as 1,536),
and each layer's scan is cached per model and corpus so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import N2GError
from .examples import random_pool
from .fileio import replacing
from .progress import Progress
from .records import NeuronStats, Sign

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99, 0.999)
SCAN_VERSION = 2


@dataclass
class LayerScan:
    """Scan results for every neuron of one layer (tensors on the CPU)."""

    layer: int
    top_idx: torch.Tensor
    """``[K, d_mlp]`` excerpt indices by maximum activation, highest first."""
    top_val: torch.Tensor
    """``[K, d_mlp]`` those maxima."""
    bot_idx: torch.Tensor
    """``[K, d_mlp]`` excerpt indices by minimum activation, lowest first."""
    bot_val: torch.Tensor
    quantiles: torch.Tensor
    """``[len(QUANTILES), d_mlp]`` raw activation quantiles over the pool's tokens."""
    pos_rate: torch.Tensor
    """``[d_mlp]`` fraction of pool tokens >= fire threshold x max."""
    neg_rate: torch.Tensor
    """``[d_mlp]`` fraction of pool tokens <= fire threshold x min."""
    pool: list[int]
    """The seeded random excerpt indices (shared by every neuron)."""
    n_pool_tokens: int
    fire_threshold: float = 0.5

    def scale(self, index: int, sign: Sign) -> float:
        """The neuron's maximum on the distilled side (<= 0 means dead on this corpus)."""
        return float(self.top_val[0, index]) if sign == Sign.POSITIVE else -float(self.bot_val[0, index])

    def ranked(self, index: int, sign: Sign) -> list[int]:
        return (self.top_idx if sign == Sign.POSITIVE else self.bot_idx)[:, index].tolist()

    def stats(self, index: int, sign: Sign) -> NeuronStats:
        factor = 1.0 if sign == Sign.POSITIVE else -1.0
        qs = self.quantiles[:, index] * factor
        if sign == Sign.NEGATIVE:
            qs = qs.flip(0)  # quantile q of -x is -(quantile 1-q of x)
        rate = self.pos_rate if sign == Sign.POSITIVE else self.neg_rate
        return NeuronStats(
            max_activation=max(self.scale(index, sign), 0.0),
            quantiles={str(q): float(v) for q, v in zip(QUANTILES, qs)},
            firing_rate=float(rate[index]),
            n_sampled_tokens=self.n_pool_tokens,
        )

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _cache_path(cache_dir: Path, model_key: str, corpus_key: str, layer: int, k: int, pool_size: int, seed: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_key)[-60:]
    digest = hashlib.sha256(f"{model_key}|{corpus_key}".encode()).hexdigest()[:12]
    return cache_dir / "scans" / f"{safe}-{digest}-L{layer}-k{k}-p{pool_size}-s{seed}-v{SCAN_VERSION}.pt"


def _save_atomic(obj, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def scan_layers(model, excerpts: torch.Tensor, layers: list[int], *, k: int = 64, pool_size: int = 64,
                seed: int = 0, batch_size: int = 32, fire_threshold: float = 0.5,
                cache_dir: str | Path | None = None, corpus_key: str = "", progress: bool = True) -> dict[int, LayerScan]:
    """Scan the requested layers (all their neurons) in one pass; cached layers are loaded instead."""
    n, length = excerpts.shape
    if n == 0:
        raise N2GError("the corpus has no excerpts to scan; give more text or a shorter --excerpt-length")
    for layer in layers:
        model.check_neuron(layer, 0)
    k = min(k, n)
    results: dict[int, LayerScan] = {}
    paths = {}
    if cache_dir is not None:
        for layer in layers:
            paths[layer] = _cache_path(Path(cache_dir), str(model.spec), corpus_key, layer, k, pool_size, seed)
            if paths[layer].exists():
                try:
                    results[layer] = LayerScan(**torch.load(paths[layer], weights_only=False))
                    log.info("layer %d: scan loaded from cache %s", layer, paths[layer])
                except Exception as exc:  # a damaged cache file is rescanned, not trusted
                    log.warning("layer %d: ignoring unreadable scan cache %s (%s)", layer, paths[layer], exc)
    todo = sorted(l for l in layers if l not in results)
    if not todo:
        return results
    device = getattr(model, "device", "cpu")
    d = model.d_mlp
    top_val = {l: torch.full((0, d), -float("inf"), device=device) for l in todo}
    top_idx = {l: torch.zeros((0, d), dtype=torch.long, device=device) for l in todo}
    bot_val = {l: torch.full((0, d), float("inf"), device=device) for l in todo}
    bot_idx = {l: torch.zeros((0, d), dtype=torch.long, device=device) for l in todo}
    bar = Progress(n * length, f"scan layers {_span(todo)}", "tok", enabled=progress)
    start = 0
    while start < n:
        ids = excerpts[start : start + batch_size]
        try:
            acts = model.layer_activations(ids, None, todo)
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower() or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(batch_size // 2, 1)
            log.warning("out of memory: scan batch backed off to %d excerpts", batch_size)
            continue
        rows = torch.arange(start, start + ids.shape[0], device=device)
        for l in todo:
            a = acts[l]
            if not torch.isfinite(a).all():
                bad = int((~torch.isfinite(a)).any(0).any(0).nonzero()[0])
                raise N2GError(f"neuron L{l}.N{bad} has NaN or infinite activations; try --dtype float32")
            mx, mn = a.amax(1), a.amin(1)  # [B, d]
            idx = rows[:, None].expand_as(mx)
            v = torch.cat([top_val[l], mx]); i = torch.cat([top_idx[l], idx])
            kk = min(k, v.shape[0])
            tv, ti = v.topk(kk, dim=0)
            top_val[l], top_idx[l] = tv, i.gather(0, ti)
            v = torch.cat([bot_val[l], mn]); i = torch.cat([bot_idx[l], idx])
            bv, bi = (-v).topk(kk, dim=0)
            bot_val[l], bot_idx[l] = -bv, i.gather(0, bi)
        bar.update(ids.numel())
        start += ids.shape[0]
    bar.close()
    pool = random_pool(n, pool_size, seed)
    pool_acts = {l: [] for l in todo}
    for start in range(0, len(pool), batch_size):
        ids = excerpts[pool[start : start + batch_size]]
        acts = model.layer_activations(ids, None, todo)
        for l in todo:
            pool_acts[l].append(acts[l].reshape(-1, d).float().cpu())
    qs = torch.tensor(QUANTILES)
    for l in todo:
        sample = torch.cat(pool_acts[l])
        mx, mn = top_val[l][0].float().cpu(), bot_val[l][0].float().cpu()
        pos_rate = torch.where(mx > 0, (sample >= fire_threshold * mx).float().mean(0), torch.zeros(d))
        neg_rate = torch.where(mn < 0, (sample <= fire_threshold * mn).float().mean(0), torch.zeros(d))
        scan = LayerScan(
            layer=l, top_idx=top_idx[l].cpu(), top_val=top_val[l].float().cpu(), bot_idx=bot_idx[l].cpu(),
            bot_val=bot_val[l].float().cpu(), quantiles=_quantiles(sample, qs),
            pos_rate=pos_rate, neg_rate=neg_rate, pool=pool, n_pool_tokens=int(sample.shape[0]),
            fire_threshold=fire_threshold,
        )
        results[l] = scan
        if l in paths:
            _save_atomic(scan.to_dict(), paths[l])
    return results


def _quantiles(sample: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles per column (torch.quantile refuses inputs over 16M values)."""
    ordered = sample.sort(0).values
    pos = qs * (ordered.shape[0] - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo.float())[:, None]
    return ordered[lo] * (1 - frac) + ordered[hi] * frac


def _span(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]} ({len(layers)})"
