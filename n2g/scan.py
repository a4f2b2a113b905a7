"""One-pass scan: every neuron of the requested layers over the whole corpus.

A single forward pass per batch of excerpts (stopping after the deepest requested layer) feeds,
for every neuron of every requested layer, a running top-K of excerpts by maximum activation and
a bottom-K by minimum (for the negative side), kept on the model's device, and writes every
token's activations into the layer's on-disk activation store (:mod:`n2g.activations`), so memory
stays flat however long the corpus. Quantiles and firing rates come from the stored rows of a
seeded random pool of excerpts. Whole layers are scanned (one neuron costs the same forward as 1,536),
and each layer's scan is cached per model and corpus (safetensors, JSON and a 16-bit ``.npy``; nothing
is unpickled) so later runs reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .activations import DEFAULT_STORE_TOKENS, ActivationStore, store_exponents, stored_excerpts
from .errors import N2GError
from .examples import random_pool
from .fileio import FILE_MODE, replacing, write_json_atomic, writer_gone, writer_tag
from .models import _first_line, _sha256, config_key_of, content_key_of, forget_weight_keys, model_location, weights_key_of
from .progress import Progress
from .records import NeuronStats, Sign, plural

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99, 0.999)
SCAN_VERSION = 5
"""5: a neuron beyond float16's range or below its resolution is stored scaled by a power of two (4 kept it at
+-65,504 or as 0). 4: equal maxima rank by excerpt index (3 ranked them as topk happened to, which moved with the
scan batch)."""


def peak_exponents(top_val: torch.Tensor, bot_val: torch.Tensor) -> np.ndarray:
    """``[d_mlp]`` the activation store's exponents (:func:`n2g.activations.store_exponents`) from a scan's
    maxima and minima (``[k, d_mlp]``): each neuron's largest absolute value over the corpus."""
    return store_exponents(torch.maximum(top_val[0].float(), -bot_val[0].float())).numpy()


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
    store: ActivationStore | None = None
    """Per-token activations of every neuron on the stored excerpts (see :mod:`n2g.activations`)."""

    def scale(self, index: int, sign: Sign) -> float:
        """The neuron's maximum on the distilled side (<= 0 means dead on this corpus)."""
        return float(self.top_val[0, index]) if sign == Sign.POSITIVE else -float(self.bot_val[0, index])

    def ranked(self, index: int, sign: Sign) -> list[int]:
        return (self.top_idx if sign == Sign.POSITIVE else self.bot_idx)[:, index].tolist()

    def stats(self, index: int, sign: Sign) -> NeuronStats:
        qs = self.quantiles[:, index]
        if sign == Sign.NEGATIVE:  # quantile q of -x is -(quantile 1-q of x), and the scan keeps only upper ones
            # (0.5 ... 0.999): the negated pool tokens' own, from the store as the scan computed the positive ones
            pool = torch.from_numpy(-self.store.neuron(index, self.pool).reshape(1, -1))
            qs = _quantiles(pool, torch.tensor(QUANTILES))[:, 0]
        rate = self.pos_rate if sign == Sign.POSITIVE else self.neg_rate
        return NeuronStats(
            max_activation=max(self.scale(index, sign), 0.0),
            quantiles={str(q): float(v) for q, v in zip(QUANTILES, qs)},
            firing_rate=float(rate[index]),
            n_sampled_tokens=self.n_pool_tokens,
        )

    def activations(self, index: int, sign: Sign, excerpts=None) -> np.ndarray:
        """``[n, length]`` signed raw activations of one neuron on stored excerpts (all when None)."""
        values = self.store.neuron(index, excerpts)
        return values if sign == Sign.POSITIVE else -values


def _exists(path: Path) -> bool:
    """``path.exists()``, False where the path cannot even be looked up (a name too long, no permission)."""
    try:
        return path.exists()
    except OSError as exc:
        log.warning("cannot use the scan cache at %s (%s); scanning without it", path.parent, exc.strerror or exc)
        return False


POOL_VALUES_AT_ONCE = 1 << 25
"""Pool activations (neurons x pool tokens) turned into quantiles and firing rates at a time: 128 MB in float32."""


def _model_key(model) -> tuple[str, str]:
    """The scan cache's key for ``model`` and a readable label for its file names. A model whose weights have
    a key is named by where it was loaded from spelled one way (:func:`n2g.models.model_location`), that key,
    its configuration and the BOS token the scan puts first, so the same model reached another way (``./m``
    and ``/abs/m``) shares its scans. The weights key samples each tensor; the content key reads every value,
    so weights changed anywhere behind the same path (one value edited and the folder saved again) are never
    served the scans of the old ones."""
    weights = weights_key_of(model)
    if not weights:
        return str(model.spec), str(model.spec)
    return (f"location:{model_location(model)}|weights:{weights}|bos:{getattr(model, 'bos_token_id', None)}"
            f"|config:{config_key_of(model)}|content:{content_key_of(model)}",
            str(getattr(model, "model_type", "model")))


def _cache_stem(cache_dir: Path, model_key: str, label: str, corpus_key: str, layer: int, k: int, pool_size: int,
                seed: int, store_key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[-60:]
    digest = hashlib.sha256(f"{model_key}|{corpus_key}|{store_key}".encode()).hexdigest()[:12]
    return cache_dir / "scans" / f"{safe}-{digest}-L{layer}-k{k}-p{pool_size}-s{seed}-v{SCAN_VERSION}"


_TENSORS = ("top_idx", "top_val", "bot_idx", "bot_val", "quantiles", "pos_rate", "neg_rate")


def _save(scan: LayerScan, stem: Path) -> None:
    """Tensors as safetensors, plain fields as JSON (written last: it marks the entry complete)."""
    from safetensors.torch import save_file

    tensors = {name: getattr(scan, name).contiguous() for name in _TENSORS}
    tensors["stored"] = torch.as_tensor(scan.store.excerpts, dtype=torch.long)
    with replacing(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
        os.chmod(tmp, FILE_MODE)  # safetensors writes a file of its own, 0600
    meta = {"layer": scan.layer, "pool": list(map(int, scan.pool)), "n_pool_tokens": scan.n_pool_tokens,
            "fire_threshold": scan.fire_threshold, "version": SCAN_VERSION,
            # checked on every load: a store damaged on disk (a zeroed region) would load and change every fit
            "store_sha256": _sha256(stem.with_suffix(".acts.npy")), "tensors_sha256": _sha256(stem.with_suffix(".safetensors"))}
    write_json_atomic(stem.with_suffix(".json"), meta)


def _load(stem: Path, layer: int | None = None, n: int | None = None, pool: list[int] | None = None) -> LayerScan:
    """A cached scan; only tensors and JSON are read, nothing is unpickled. With ``layer``, ``n`` (the corpus's
    excerpts) and ``pool`` (the random pool this run draws), an entry that disagrees (another layer, an excerpt
    index out of range, another pool) is refused as a damaged one is."""
    from safetensors.torch import load_file

    meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    if meta.get("version") != SCAN_VERSION:
        raise ValueError(f"scan cache version {meta.get('version')} is not {SCAN_VERSION}")
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    for name in ("top_val", "bot_val", "quantiles"):
        if not bool(torch.isfinite(tensors[name]).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    store = ActivationStore.open(stem.with_suffix(".acts.npy"), tensors.pop("stored").numpy(),
                                 peak_exponents(tensors["top_val"], tensors["bot_val"]))
    step = max(1, (1 << 26) // max(1, int(np.prod(store.values.shape[1:]))))  # about 128 MB at a time
    for start in range(0, store.values.shape[0], step):
        if not np.isfinite(store.values[start: start + step]).all():
            raise ValueError("the activation store holds NaN or infinite values")
    for name, suffix in (("tensors_sha256", ".safetensors"), ("store_sha256", ".acts.npy")):  # (older entries have none)
        if name in meta and _sha256(stem.with_suffix(suffix)) != meta[name]:
            raise ValueError(f"its {suffix} file does not match its recorded SHA-256")
    scan = LayerScan(layer=int(meta["layer"]), pool=[int(i) for i in meta["pool"]], n_pool_tokens=int(meta["n_pool_tokens"]),
                     fire_threshold=float(meta["fire_threshold"]), store=store, **{name: tensors[name] for name in _TENSORS})
    if layer is not None and scan.layer != layer:
        raise ValueError(f"it holds layer {scan.layer}")
    if pool is not None and scan.pool != [int(i) for i in pool]:
        raise ValueError("its random pool is not this run's")
    if n is not None:
        for name, idx in (("top_idx", scan.top_idx), ("bot_idx", scan.bot_idx),
                          ("stored", torch.from_numpy(np.asarray(store.excerpts)))):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{name} names an excerpt outside the corpus's {n}")
    return scan


def _remove_stale(stem: Path) -> None:
    """Delete this entry's half-written stores left by scans that were killed (their process is gone; in a cache
    machines share, another machine's only once old: :func:`n2g.fileio.writer_gone`)."""
    for tmp in stem.parent.glob(f".{stem.name}.*.acts.npy.tmp"):
        with contextlib.suppress(OSError):
            if writer_gone(tmp.name[len(stem.name) + 2 :].split(".", 1)[0], tmp):
                tmp.unlink(missing_ok=True)


def cache_bytes(scans: dict[int, "LayerScan"]) -> int:
    """Disk used by the activation stores of these scans."""
    return sum(s.store.nbytes for s in scans.values() if s.store is not None)


def scan_layers(model, excerpts: torch.Tensor, layers: list[int], *, k: int = 64, pool_size: int = 64,
                seed: int = 0, batch_size: int = 32, fire_threshold: float = 0.5,
                cache_dir: str | Path | None = None, corpus_key: str = "", progress: bool = True,
                store_tokens: int | None = DEFAULT_STORE_TOKENS, reread_weights: bool = True) -> dict[int, LayerScan]:
    """Scan the requested layers (all their neurons) in one pass; cached layers are loaded instead.

    The same pass fills each layer's activation store (``store_tokens`` tokens at most: the whole
    corpus when it fits, else a seeded subset that contains the random pool); pool quantiles and
    firing rates are computed from the stored pool rows, so no excerpt is run twice.
    """
    n, length = excerpts.shape
    if n == 0:
        raise N2GError("the corpus has no excerpts to scan; give more text or a shorter --excerpt-length")
    for layer in layers:
        model.check_neuron(layer, 0)
    k = min(k, n)
    stored = stored_excerpts(n, length, store_tokens, seed)
    pool = random_pool(n, pool_size, seed)
    if not set(pool) <= set(stored.tolist()):  # a budget smaller than the pool: keep the pool anyway
        stored = np.union1d(stored, np.asarray(pool, np.int64))
    results: dict[int, LayerScan] = {}
    stems: dict[int, Path] = {}
    if cache_dir is not None:
        if reread_weights:  # the weights as they are now, not as an earlier scan found them (a caller that
            forget_weight_keys(model)  # has just keyed them, as a run has, passes reread_weights=False)
        for layer in layers:
            stems[layer] = _cache_stem(Path(cache_dir), *_model_key(model), corpus_key, layer, k, pool_size, seed,
                                       f"{store_tokens}|{weights_key_of(model) or ''}")
            if _exists(stems[layer].with_suffix(".json")):
                try:
                    results[layer] = _load(stems[layer], layer, n, pool)
                    log.info("layer %d: scan loaded from cache %s", layer, stems[layer])
                except Exception as exc:  # a damaged cache entry is rescanned, not trusted
                    log.warning("layer %d: ignoring unreadable scan cache %s (%s)", layer, stems[layer], exc)
    todo = sorted(l for l in layers if l not in results)
    if not todo:
        return _thresholds(results, fire_threshold, model)
    with contextlib.ExitStack() as held:  # one process scans a cache entry; another waits, then loads it
        for l in todo:
            if l not in stems:
                continue
            try:
                stems[l].parent.mkdir(parents=True, exist_ok=True)  # the lock file lives there
            except OSError:
                pass
            held.enter_context(_scan_lock(stems[l], l))
            if _exists(stems[l].with_suffix(".json")):  # made while this process waited, or just before
                try:
                    results[l] = _load(stems[l], l, n, pool)
                    log.info("layer %d: scan loaded from cache %s (another n2g process made it)", l, stems[l])
                except Exception:  # that process failed or was stopped: scan it here
                    pass
        todo = [l for l in todo if l not in results]
        if todo:
            _scan_into(results, model, excerpts, todo, stems, stored=stored, pool=pool, k=k, batch_size=batch_size,
                       fire_threshold=fire_threshold, progress=progress)
    return _thresholds(results, fire_threshold, model)


def _thresholds(results: dict[int, LayerScan], fire_threshold: float, model) -> dict[int, LayerScan]:
    """Every scan in ``results`` with its firing rates at ``fire_threshold`` (a cached one may have counted another)."""
    device = getattr(model, "device", "cpu")
    return {l: _with_threshold(scan, fire_threshold, device) for l, scan in results.items()}


@contextlib.contextmanager
def _scan_lock(stem: Path, layer: int | None, busy: str | None = None):
    """Hold the lock of one scan cache entry while it is scanned (``stem.lock``, an flock, removed by its
    holder before release). The context's value says whether another process held it first (its entry
    may now be in the cache). Without a writable cache folder there is no lock and nothing to wait for.
    ``busy``: what to log while waiting, for a cache entry that is not a layer's scan."""
    import fcntl

    path = stem.with_suffix(".lock")
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info(busy or f"layer {layer}: another n2g process is scanning it; waiting for its scan")
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            now, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass  # its holder removed that file before releasing it: lock the one there now
        except OSError:  # a file system without locks: scan without one
            os.close(fd)
            yield False
            return
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield waited
    finally:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


MEMORY_SHARE = 0.75
"""The share of the memory available when a scan starts that its in-memory activation stores may take."""


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable; None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_room(d_mlp: int, rows: int, pool_rows: int, length: int, layers: list[int], stems: dict) -> None:
    """Refuse, before anything is written, a scan whose activation stores fit neither the cache's disk
    nor memory: each store is ``d_mlp x rows x length`` float16 values; stores that the disk cannot hold
    are kept in memory, and a store larger than the memory would be killed mid-scan, not refused
    (a million-latent SAE over the default budget is about 260 GB a layer). The message names a
    ``--store-tokens`` that fits."""
    per_layer = 2 * d_mlp * rows * length
    if not layers or not per_layer:
        return
    on_disk = [l for l in layers if l in stems]
    free = (_free_bytes(stems[on_disk[0]].parent) or 0) if on_disk else 0
    disk_layers = min(len(on_disk), free // per_layer)
    in_memory = (len(layers) - disk_layers) * per_layer
    memory = _available_memory()
    if memory is None or in_memory <= MEMORY_SHARE * memory:
        return
    unit, share = 2 * d_mlp * length, int(MEMORY_SHARE * memory)  # bytes of one stored excerpt of one layer
    fit_rows = 0  # the most rows a layer may keep: j stores on disk, the others in memory
    for j in range(len(on_disk) + 1):
        rows_fit = min(free // (j * unit) if j else rows, share // ((len(layers) - j) * unit) if j < len(layers) else rows)
        fit_rows = max(fit_rows, rows_fit)
    where = (f"{_gb(free)} of disk is free in {stems[on_disk[0]].parent} and " if on_disk else "no scan cache is "
             "writable (N2G_CACHE) and ")
    span = f"layer {layers[0]}" if len(layers) == 1 else f"each of the {len(layers)} layers scanned together"
    if fit_rows > pool_rows:
        advice = f"pass --store-tokens {fit_rows * length} or less (store_tokens= in n2g.fit_neuron), or free space"
    else:
        advice = "scan fewer layers per run (--layers), or free space"
    raise N2GError(f"the activation store of {span} needs {_gb(per_layer)} ({d_mlp:,} neurons x {rows * length:,} "
                   f"tokens x 2 bytes), but {where}{_gb(memory)} of memory is available; {advice}")


def _scan_into(results: dict, model, excerpts: torch.Tensor, todo: list[int], stems: dict, *, stored, pool, k: int,
               batch_size: int, fire_threshold: float, progress: bool) -> None:
    """Scan the layers in ``todo`` in one pass over ``excerpts`` into ``results`` (and the cache, where a
    layer has a stem)."""
    n, length = excerpts.shape
    device = getattr(model, "device", "cpu")
    d = model.d_mlp
    check_room(d, len(stored), len(pool), length, todo, stems)
    stores: dict[int, ActivationStore] = {}
    tmp_paths: dict[int, Path] = {}
    for l in todo:
        path = None
        if l in stems:
            try:
                stems[l].parent.mkdir(parents=True, exist_ok=True)
                _remove_stale(stems[l])
                # A name of its own: two runs scanning the same layer at once never share a file.
                fd, name = tempfile.mkstemp(prefix=f".{stems[l].name}.{writer_tag()}.", suffix=".acts.npy.tmp",
                                            dir=stems[l].parent)
                os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would keep a shared cache from other users
                os.close(fd)
                path = Path(name)
                stores[l] = ActivationStore.create(d, stored, length, path)
                tmp_paths[l] = path
                continue
            except OSError as exc:
                if path is not None:
                    path.unlink(missing_ok=True)
                log.warning("layer %d: cannot write the activation store in %s (%s); keeping it in memory",
                            l, stems[l].parent, exc)
                stems.pop(l)
        stores[l] = ActivationStore.create(d, stored, length, None)
    try:
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
                if not bool(torch.isfinite(a).all()):  # checked on the device: one scalar comes back
                    bad = int(torch.nonzero(~torch.isfinite(a).all(1).all(0))[0])
                    hint = "try --dtype float32" if getattr(model, "dtype", a.dtype) in (torch.float16, torch.bfloat16) else \
                        "the model computes them in full precision too: check its config.json and weights"
                    raise N2GError(f"neuron L{l}.N{bad} has NaN or infinite activations; {hint}")
                mx, mn = a.amax(1), a.amin(1)  # [B, d]
                idx = rows[:, None].expand_as(mx)
                # A stable sort, not topk: the kept rows come first and hold lower excerpt indices than this
                # batch's, so equal maxima (the same first token after BOS) rank by excerpt index whatever the
                # scan batch (topk orders ties as it likes, and which excerpts a batch holds moved them).
                v = torch.cat([top_val[l], mx]); i = torch.cat([top_idx[l], idx])
                kk = min(k, v.shape[0])
                ti = torch.sort(v, dim=0, descending=True, stable=True).indices[:kk]
                top_val[l], top_idx[l] = v.gather(0, ti), i.gather(0, ti)
                v = torch.cat([bot_val[l], mn]); i = torch.cat([bot_idx[l], idx])
                bi = torch.sort(v, dim=0, stable=True).indices[:kk]
                bot_val[l], bot_idx[l] = v.gather(0, bi), i.gather(0, bi)
                # float16, neuron-major, made on the device; the batch's peaks from its maxima and minima above
                stores[l].write(np.arange(start, start + ids.shape[0]), a, torch.maximum(mx.amax(0), -mn.amin(0)))
            bar.update(ids.numel())
            start += ids.shape[0]
        bar.close()
        qs = torch.tensor(QUANTILES)
        for l in todo:
            store = stores[l]
            store.flush()
            # The pool's stored rows, neuron-major [d, tokens] as the store keeps them, on the model's
            # device: sorting each neuron's row there is milliseconds on a GPU. A slice of neurons at a
            # time, so a layer of a million SAE latents never needs its whole pool in float32 at once.
            rows = store.rows(pool)
            n_tokens = len(rows) * length
            step = max(1, POOL_VALUES_AT_ONCE // max(1, n_tokens))
            mx_all, mn_all = top_val[l][0].float(), bot_val[l][0].float()
            scaled = np.flatnonzero(store.exponents)
            if len(scaled):  # (an SAE's latents can be that large; a neuron's weights may be scaled far down)
                log.info("layer %d: %d %s beyond float16's range or resolution (L%d.N%d: %.6g) stored scaled by a "
                         "power of two", l, len(scaled), plural(len(scaled), "neuron"), l, int(scaled[0]),
                         float(torch.maximum(mx_all[int(scaled[0])], -mn_all[int(scaled[0])])))
            quantiles, pos_rate, neg_rate = _pool_stats(store, rows, step, mx_all, mn_all, fire_threshold, device, qs)
            scan = LayerScan(
                layer=l, top_idx=top_idx[l].cpu(), top_val=top_val[l].float().cpu(), bot_idx=bot_idx[l].cpu(),
                bot_val=bot_val[l].float().cpu(), quantiles=quantiles,
                pos_rate=pos_rate, neg_rate=neg_rate, pool=pool, n_pool_tokens=n_tokens,
                fire_threshold=fire_threshold, store=store,
            )
            if l in stems:
                final = stems[l].with_suffix(".acts.npy")
                try:
                    os.replace(tmp_paths[l], final)  # the open map stays valid: same file, new name
                    scan.store = ActivationStore.open(final, stored, store.exponents)
                    _save(scan, stems[l])
                except Exception as exc:  # a full disk: an OSError, or safetensors' own error
                    log.warning("layer %d: cannot save the scan cache in %s (%s); going on without it", l,
                                stems[l].parent, _first_line(exc, 200))
                    tmp_paths[l].unlink(missing_ok=True)
                    if not stems[l].with_suffix(".json").exists():  # no entry without its JSON: free the disk
                        final.unlink(missing_ok=True)  # (the open map of it stays readable)
            results[l] = scan
    except BaseException:  # interrupted or failed: no half-written store is left in the cache
        for tmp in tmp_paths.values():
            tmp.unlink(missing_ok=True)  # a store already renamed into place is no longer there
        raise


def _pool_stats(store: ActivationStore, rows: np.ndarray, step: int, mx_all: torch.Tensor, mn_all: torch.Tensor,
                fire_threshold: float, device, qs: torch.Tensor | None) -> tuple:
    """``(quantiles, pos_rate, neg_rate)`` of every neuron over the store's ``rows`` (the pool), ``step`` neurons
    at a time on ``device``; quantiles None without ``qs``."""
    d = store.values.shape[0]
    quantiles, pos_rate, neg_rate = [], [], []
    for a in range(0, d, step):
        b = min(d, a + step)
        sample = torch.from_numpy(np.ascontiguousarray(store.values[a:b, rows, :]).reshape(b - a, -1))
        sample = sample.to(device).float()
        if store.exponents[a:b].any():  # neurons stored scaled (:func:`n2g.activations.store_exponents`)
            sample *= torch.exp2(torch.from_numpy(store.exponents[a:b]).float()).to(sample.device)[:, None]
        mx, mn = mx_all[a:b], mn_all[a:b]
        zero = torch.zeros(b - a, device=sample.device)
        pos_rate.append(torch.where(mx > 0, (sample >= fire_threshold * mx[:, None]).float().mean(1), zero).cpu())
        neg_rate.append(torch.where(mn < 0, (sample <= fire_threshold * mn[:, None]).float().mean(1), zero).cpu())
        if qs is not None:
            quantiles.append(_quantiles(sample, qs).cpu())
        del sample
    return (torch.cat(quantiles, 1) if qs is not None else None), torch.cat(pos_rate), torch.cat(neg_rate)


def _with_threshold(scan: LayerScan, fire_threshold: float, device) -> LayerScan:
    """A cached scan made with another fire threshold, its firing rates counted again at ``fire_threshold``
    from the stored pool rows (the rest of a scan does not depend on it)."""
    if scan.fire_threshold == fire_threshold or scan.store is None:
        return scan
    rows = scan.store.rows(scan.pool)
    step = max(1, POOL_VALUES_AT_ONCE // max(1, scan.n_pool_tokens))
    _, scan.pos_rate, scan.neg_rate = _pool_stats(scan.store, rows, step, scan.top_val[0].float().to(device),
                                                  scan.bot_val[0].float().to(device), fire_threshold, device, None)
    scan.fire_threshold = fire_threshold
    return scan


def _quantiles(sample: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles ``[len(qs), d]`` of each neuron's row of ``sample`` (``[d, tokens]``);
    torch.quantile refuses inputs over 16M values."""
    if sample.device.type == "cpu":  # numpy sorts contiguous rows about 3x faster than torch on a CPU
        ordered = torch.from_numpy(np.sort(sample.numpy(), axis=1))
    else:
        ordered = sample.sort(1).values
    pos = qs.to(sample.device) * (ordered.shape[1] - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo.float())[None, :]
    return (ordered[:, lo] * (1 - frac) + ordered[:, hi] * frac).T.contiguous()


def _span(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]} ({len(layers)})"
