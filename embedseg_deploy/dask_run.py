"""Running on a dask.distributed cluster: network tiles and blocks of big images, and whole small files,
as tasks.

The cluster is dask's (a :class:`distributed.LocalCluster` of worker processes on this machine, or any
running scheduler: dask-jobqueue on SLURM/PBS, dask-gateway, Kubernetes); this module only decides what
a task is. Each worker builds the predictor once from :meth:`Predictor.spec` and keeps it for every
later task (model loading and ONNX Runtime's session setup happen once per worker, not per block).

Network tiles and blocks are computed on the workers and written here in plan order
(:mod:`embedseg_deploy.bigimage`), so the labels are those of a single-process run whatever the number of
workers, and ids stay unique without a second pass over the pixels. A worker that dies takes its running
tasks with it; the scheduler runs them again elsewhere, and since a task's result depends only on its
inputs the run's labels do not change. Needs the ``dask`` extra (the ``distributed`` package); inputs and
outputs must be on a file system that every worker sees.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .predict import Predictor

RETRIES = 2  # a task that raises is tried this many more times (worker deaths are handled by dask)
_PREDICTORS: dict[str, Predictor] = {}  # per worker process: the last predictor built, by its spec


def worker_predictor(spec: dict[str, Any]) -> Predictor:
    """The predictor of ``spec`` in this process, built on first use and kept."""
    from .predict import Predictor

    key = json.dumps(spec, sort_keys=True)
    if key not in _PREDICTORS:
        _PREDICTORS.clear()  # one model per worker: a new run's model replaces the old one
        _PREDICTORS[key] = Predictor(**spec)
    return _PREDICTORS[key]


def looks_like_address(text: str) -> bool:
    """A scheduler address (``tcp://host:8786``, ``host:8786``, ``tls://...``), not a file name."""
    return bool(re.fullmatch(r"([a-z]+://)?[\w.\-\[\]:]+:\d+/?", text)) or text.startswith(
        ("tcp://", "tls://", "ucx://", "inproc://")
    )


def _run(spec: dict[str, Any], fn: Callable[[Predictor, Any], Any], item: Any) -> Any:
    return fn(worker_predictor(spec), item)


class DaskExecutor:
    """Tasks ``fn(predictor, item)`` on a dask cluster, each worker with its own cached predictor.

    ``address`` is a scheduler address (``tcp://host:8786``) or None for a new local cluster of
    ``workers`` processes (default: one per two CPU cores, at least 2), each with ``threads`` CPU threads
    for the network and the clustering (default: the cores shared out). Use as a context manager.
    """

    def __init__(
        self,
        predictor: Predictor,
        address: str | None = None,
        workers: int | None = None,
        threads: int | None = None,
        connect_timeout: float = 20.0,
    ):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ImportError("--dask needs dask.distributed: pip install 'embedseg-deploy[dask]'") from None
        self.cluster = None
        if address is None:
            cores = os.cpu_count() or 1
            workers = workers or max(2, cores // 2)
            threads = threads or max(1, cores // workers)
            self.cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,  # one task at a time: the network uses ``threads`` itself
                processes=True,
                dashboard_address=":0",  # a free port: several runs may share a machine
                memory_limit=0,  # our memory budget sizes the blocks; no nanny restarts on RSS
            )
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(address, timeout=connect_timeout)
            except (OSError, TimeoutError) as exc:
                raise OSError(f"cannot reach the dask scheduler at {address}: {exc}") from None
        self.spec = predictor.spec(threads)
        self.address = self.client.scheduler.address

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def describe(self) -> str:
        kind = "local cluster" if self.cluster is not None else "cluster"
        threads = self.spec["threads"]
        return f"dask {kind} at {self.address}, {self.workers} worker(s), {threads} thread(s) each"

    def submit(self, fn: Callable[[Predictor, Any], Any], item: Any) -> Any:
        """A future of ``fn(predictor, item)`` computed on some worker."""
        return self.client.submit(_run, self.spec, fn, item, pure=False, retries=RETRIES)

    def ordered(
        self, fn: Callable[[Predictor, Any], Any], items: Iterable[Any], window: int | None = None
    ) -> Iterator[Any]:
        """``fn(predictor, item)`` for each item, computed on the workers, yielded in the items' order.

        At most ``window`` tasks (default: twice the workers, plus one) are submitted ahead of the one
        being waited for, so results wait for the writer in bounded memory.
        """
        items = iter(items)
        window = window or 2 * self.workers + 1
        pending = collections.deque(self.submit(fn, item) for item in itertools.islice(items, window))
        while pending:
            future = pending.popleft()
            result = future.result()
            future.release()
            pending.extend(self.submit(fn, item) for item in itertools.islice(items, 1))
            yield result
            del result  # not held while the next one is awaited

    def worker_budget(self) -> int:
        """Default memory budget of one worker: half its dask memory limit where it has one, else (a
        local cluster) half this machine's available memory shared out among the workers."""
        from .memory import parse_budget

        limits = [w.get("memory_limit") or 0 for w in self.client.scheduler_info()["workers"].values()]
        if limits and min(limits) > 0:
            return min(limits) // 2
        return math.floor(parse_budget(None).bytes / (self.workers if self.cluster is not None else 1))

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
