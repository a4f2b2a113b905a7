"""Runs across processes and machines on Ray (the optional extra ``pip install 'n2g[ray]'``).

``n2g run ... --ray`` starts a local Ray cluster (``--ray ADDRESS`` joins an existing one) and splits
the neurons to fit into (layer, neuron range) units. Each Ray worker is an actor that loads the
model and corpus once, scans the layers of its units once (through the shared scan cache) and fits
and saves its neurons into the run directory through the same atomic, resumable store as a
single-process run, so results are identical. The driver hands out units as workers free up,
gives a dead worker's unit to a fresh worker (its finished neurons are on disk and are skipped, so
only the neurons in flight are lost) and, at the end, writes the tables, index and report.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections import deque
from dataclasses import replace
from pathlib import Path

from .errors import N2GError
from .records import NeuronId

log = logging.getLogger(__name__)

MAX_DEATHS = 8
"""Dead workers a run replaces before it stops and asks to be re-run."""


class Fitter:
    """One Ray worker: the model and corpus loaded once, then units of neurons fitted on request."""

    def __init__(self, opts, threads: int | None = None):
        import torch

        from .pipeline import load_inputs, open_store

        if threads:  # Ray gives a worker one thread; the driver's count keeps CPU arithmetic (and results) the same
            torch.set_num_threads(threads)
        self.opts = replace(opts, ray=None, progress=False, report=False)
        self.host = socket.gethostname()
        out = Path(opts.out)
        probe = out / f".n2g-write-probe-{self.host}-{os.getpid()}"
        try:  # every worker must be able to write the run directory
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise N2GError(f"a Ray worker on {self.host} cannot write {out} ({exc.strerror or exc}); "
                           "put --out on a filesystem every node of the cluster can write") from None
        self.model, self.corpus = load_inputs(self.opts)
        self.store, self.is_train = open_store(self.opts, self.model, self.corpus)

    def fit(self, unit: list[tuple[int, int, str]]) -> int:
        """Fit the unit's neurons that are not done yet; returns how many were fitted."""
        from .pipeline import fit_neurons
        from .records import Sign

        todo = [NeuronId(l, i, Sign(s)) for l, i, s in unit]
        todo = [n for n in todo if not self.store.is_done(n)]
        if not todo:
            return 0
        return fit_neurons(self.opts, todo, self.model, self.corpus, self.store, self.is_train, share=False)

    def pid(self) -> int:
        return os.getpid()


def units_of(todo: list[NeuronId], workers: int, group_size: int) -> list[list[NeuronId]]:
    """(layer, neuron range) units: whole layers when there are at least as many layers as workers,
    else each layer cut into enough ranges to keep every worker busy (a layer is then scanned by
    each worker that takes a range of it, once)."""
    by_layer: dict[int, list[NeuronId]] = {}
    for n in sorted(todo):
        by_layer.setdefault(n.layer, []).append(n)
    cuts = max(1, math.ceil(workers / max(len(by_layer), 1)))
    units = []
    for neurons in by_layer.values():
        size = max(group_size, math.ceil(len(neurons) / cuts))
        units.extend(neurons[i : i + size] for i in range(0, len(neurons), size))
    return units


def _ray():
    try:
        import ray
    except ImportError:
        raise N2GError("--ray needs Ray: install it with pip install 'n2g[ray]' (or pip install ray)") from None
    return ray


def _reachable(address: str, timeout: float = 5.0) -> str | None:
    """Why ``host:port`` (or ``ray://host:port``) cannot be reached over TCP; None when it can
    (or when the address is not of that form, such as ``auto``). Ray itself retries for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except (UnicodeError, ValueError, OverflowError):  # a host name no resolver takes ("a..b", a 64-letter label)
        return "not a valid host name"


def preflight(opts) -> None:
    """Before anything is loaded or written: Ray is installed and the cluster address answers."""
    _ray()
    if opts.ray not in ("local", "auto") and "://" not in opts.ray and not re.fullmatch(r"[^\s:]*(:[^\s:]*)*:\d+", opts.ray):
        raise N2GError(f"--ray address {opts.ray!r} is not host:port, ray://host:port or auto; "
                       "give the head node's address (`ray status` on it shows it), or --ray alone for a local cluster")
    if opts.ray != "local":
        why = _reachable(opts.ray)
        if why is not None:
            raise N2GError(f"cannot reach the Ray cluster at {opts.ray} ({why}); check the address "
                           "(`ray status` on the head node shows it) or run without --ray")


def _start(ray, opts) -> None:
    env = {k: os.environ[k] for k in ("N2G_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                  runtime_env={"env_vars": env} if env else None)
    try:
        if opts.ray == "local":
            ray.init(num_cpus=opts.ray_workers or os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=opts.ray, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ... for a bad address
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "a local Ray cluster" if opts.ray == "local" else f"the Ray cluster at {opts.ray}"
        raise N2GError(f"cannot start or reach {where} ({detail[:160]}); check the address "
                       "(`ray status` on the head node shows it) or run without --ray") from None


def _cause(ray, exc) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def fit_on_ray(opts, todo: list[NeuronId], store) -> int:
    """Fit ``todo`` on Ray workers writing into ``store``'s run directory; returns neurons fitted."""
    from .progress import Progress

    ray = _ray()
    opts = replace(opts, out=str(store.root.resolve()))
    _start(ray, opts)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        workers = opts.ray_workers or gpus or int(resources.get("CPU", 1))
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        if gpus and workers > gpus:
            raise N2GError(f"--ray-workers {workers} is more than the cluster's {gpus} GPU(s); ask for at most {gpus}")
        remote = ray.remote(Fitter).options(**options)
        units = deque(units_of(todo, workers, opts.group_size))
        log.info("Ray: %d worker(s) (%s), %d unit(s) of work", workers, f"{gpus} GPU(s)" if gpus else "CPU", len(units))
        import torch

        threads = None if gpus else torch.get_num_threads()
        actors = [remote.remote(opts, threads) for _ in range(min(workers, len(units)))]
        idle = list(range(len(actors)))
        running: dict = {}
        fitted, deaths = 0, 0
        bar = Progress(len(todo), "fit on Ray", "neurons", enabled=opts.progress)
        while units or running:
            while units and idle:
                a = idle.pop()
                unit = units.popleft()
                running[actors[a].fit.remote([(n.layer, n.index, n.sign.value) for n in unit])] = (a, unit)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                a, unit = running.pop(ref)
                try:
                    fitted += ray.get(ref)
                    bar.update(len(unit))
                    idle.append(a)
                except ray.exceptions.RayActorError:
                    deaths += 1
                    if deaths > MAX_DEATHS:
                        raise N2GError(f"{deaths} Ray workers died (out of memory?); finished neurons are saved: "
                                       "re-run the same command to fit the rest") from None
                    log.warning("a Ray worker died; its unit of %d neuron(s) goes to a fresh worker "
                                "(neurons it finished are kept)", len(unit))
                    actors[a] = remote.remote(opts, threads)
                    units.appendleft(unit)
                    idle.append(a)
                except ray.exceptions.RayTaskError as exc:
                    cause = _cause(ray, exc)
                    if isinstance(cause, N2GError):
                        raise N2GError(str(cause)) from None
                    raise N2GError(f"a Ray worker failed: {type(cause).__name__}: {str(cause)[:200]}; "
                                   "run without --ray to see the full error") from None
        bar.close()
        return fitted
    finally:
        ray.shutdown()
