"""Run tile jobs in-process or on a Dask cluster; results identical either way.

This module owns the Dask cluster: `dask_cluster` starts a local one (or names an existing
scheduler) for `segment_slide` and for the BIDS App's participant level alike.
"""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from nuclei_app.config import SegmentConfig
from nuclei_app.errors import InputOutputError
from nuclei_app.segment.tiles import TileJob, run_tile_job


@dataclass(frozen=True)
class DaskCluster:
    """Where tile jobs go when they leave this process.

    Attributes
    ----------
    address : str
        Scheduler address (``tcp://HOST:PORT``).
    local_workers : int or None
        Worker processes of a local cluster started by `dask_cluster` (they share this
        machine's cores); None for an existing scheduler, whose workers keep their settings.
    """

    address: str
    local_workers: int | None = None

    @property
    def torch_threads(self) -> int | None:
        """Intra-op threads per worker: this machine's cores shared by the local workers
        (None: leave the workers' own setting)."""
        if self.local_workers is None:
            return None
        return max(1, (os.cpu_count() or 1) // self.local_workers)


@contextmanager
def dask_cluster(config: SegmentConfig) -> Iterator[DaskCluster | None]:
    """The cluster ``config`` asks for, for the duration of the block.

    ``dask_scheduler``: that scheduler (nothing is started); ``nprocs > 1``: a
    `distributed.LocalCluster` of ``nprocs`` single-threaded worker processes on the
    loopback interface, sharing ``mem`` evenly (closed at the end); otherwise None (run
    in this process).
    """
    if config.dask_scheduler:
        yield DaskCluster(config.dask_scheduler)
        return
    if config.nprocs <= 1:
        yield None
        return
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    limit = config.memory_limit_bytes
    cluster = LocalCluster(
        n_workers=config.nprocs,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=(limit // config.nprocs) if limit else "auto",
    )
    try:
        yield DaskCluster(cluster.scheduler_address, local_workers=config.nprocs)
    finally:
        cluster.close()


def run_jobs(jobs: list[TileJob], on_result: Callable[[list], None], cluster: DaskCluster | None) -> None:
    """Run every job, in this process (``cluster`` None) or on the cluster; ``on_result`` gets
    each job's results in this process as they finish."""
    if cluster is None or not jobs:
        for job in jobs:
            on_result(run_tile_job(job))
    else:
        run_on_dask(jobs, on_result, cluster)


def run_on_dask(jobs: list[TileJob], on_result: Callable[[list], None], cluster: DaskCluster) -> None:
    """Run jobs on the cluster's Dask scheduler.

    At most two jobs per worker are in flight, so finished results never pile up in memory.

    Raises
    ------
    InputOutputError (74)
        The scheduler cannot be reached.
    """
    from distributed import Client, as_completed

    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        # Waits up to dask's `distributed.comm.timeouts.connect` (30 s by default).
        client = Client(cluster.address)
    except (OSError, TimeoutError) as error:
        raise InputOutputError(
            f"cannot reach the Dask scheduler at {cluster.address} ({error}); check the address and that it runs"
        ) from None
    with client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or cluster.local_workers or 1)
        run_token = uuid.uuid4().hex[:12]  # task keys must not collide with other runs on a shared scheduler
        in_flight = as_completed()
        pending = iter(enumerate(jobs))

        def submit_next() -> None:
            entry = next(pending, None)
            if entry is not None:
                index, job = entry
                in_flight.add(client.submit(run_tile_job, job, key=f"nuclei-app-tiles-{run_token}-{index}"))

        for _ in range(2 * n_workers):
            submit_next()
        for future in in_flight:
            on_result(future.result())
            future.release()
            submit_next()
