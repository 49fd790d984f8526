"""Run tile jobs in-process or on a Dask cluster; results identical either way."""
from __future__ import annotations

import uuid
from typing import Callable
from nuclei_app.errors import (
    InputOutputError,
)
from nuclei_app.segment.tiles import TileJob, run_tile_job


# ======================================================================================
# Execution back ends
# ======================================================================================


def run_in_process(jobs: list[TileJob], on_result: Callable[[list], None]) -> None:
    for job in jobs:
        on_result(run_tile_job(job))


def run_on_dask(
    jobs: list[TileJob], on_result: Callable[[list], None], nprocs: int, scheduler: str | None
) -> None:
    """Run jobs on a LocalCluster (``nprocs`` worker processes, loopback) or an existing scheduler.

    At most two jobs per worker are in flight, so finished results never pile up in memory.
    """
    import logging

    from distributed import Client, LocalCluster, as_completed

    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    try:
        if scheduler:
            try:
                # Waits up to dask's `distributed.comm.timeouts.connect` (30 s by default).
                client = Client(scheduler)
            except (OSError, TimeoutError) as error:
                raise InputOutputError(
                    f"cannot reach the Dask scheduler at {scheduler} ({error}); check the address and that it runs"
                ) from None
        else:
            cluster = LocalCluster(
                n_workers=nprocs,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            )
            client = Client(cluster)
        with client:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})) or nprocs)
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
    finally:
        if cluster is not None:
            cluster.close()

