"""Scale-out: the same tile jobs on a real dask.distributed LocalCluster give identical labels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import zarr

from nuclei_app.config import SegmentConfig
from nuclei_app.sample_data import synthesize_slide
from nuclei_app.segment.predictors import PredictorSpec
from nuclei_app.segment.pipeline import segment_slide
from nuclei_app.io.ome_tiff import write_ome_tiff

pytest.importorskip("distributed")


def _labels(store) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {
        f"{name}/{level}": np.asarray(group[f"labels/{name}/{level}"])
        for name in group["labels"].attrs["labels"]
        for level in range(len(group[f"labels/{name}"].attrs["multiscales"][0]["datasets"]))
    }


def test_local_cluster_and_existing_scheduler_match_the_single_process_run(tmp_path):
    from distributed import LocalCluster

    synthetic = synthesize_slide(np.random.default_rng(21), (520, 600))
    slide = write_ome_tiff(tmp_path / "slide.ome.tif", synthetic.image, ["DAPI", "Histone H3", "NeuN", "GFAP"],
                           (0.5, 0.5), tile=(128, 128), n_levels=2)
    config = SegmentConfig(tile=256, overlap=48, batch_size=2)
    single = segment_slide(slide, tmp_path / "single.ome.zarr", PredictorSpec("weak"), config,
                           table_path=tmp_path / "single.tsv", progress=False)
    # --nprocs: segment_slide starts (and stops) its own LocalCluster
    local = segment_slide(slide, tmp_path / "local.ome.zarr", PredictorSpec("weak"), replace(config, nprocs=2),
                          table_path=tmp_path / "local.tsv", progress=False)
    # --dask-scheduler: an existing cluster on loopback, 2 worker processes
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        remote = segment_slide(slide, tmp_path / "remote.ome.zarr", PredictorSpec("weak"),
                               replace(config, dask_scheduler=cluster.scheduler_address),
                               table_path=tmp_path / "remote.tsv", progress=False)
    assert single.n_nuclei > 300
    expected = _labels(single.output_path)
    for result in (local, remote):
        assert result.n_nuclei == single.n_nuclei
        got = _labels(result.output_path)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
        assert result.table_path.read_text() == single.table_path.read_text()


def test_unreachable_scheduler_is_a_one_line_io_error(run_cli, tmp_path):
    synthetic = synthesize_slide(np.random.default_rng(3), (200, 200))
    slide = write_ome_tiff(tmp_path / "s.ome.tif", synthetic.image, ["DAPI", "Histone H3", "NeuN", "GFAP"],
                           (0.5, 0.5), tile=(128, 128), n_levels=1)
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):  # nothing listens on port 9
        result = run_cli("segment", slide, "--method", "weak", "-o", tmp_path / "o.ome.zarr", "--tile", 128,
                         "--overlap", 32, "--dask-scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 74
    errors = [line for line in result.stderr.splitlines() if line.startswith("nuclei-app: error:")]
    assert len(errors) == 1 and "Dask scheduler" in errors[0]
    assert not (tmp_path / "o.ome.zarr").exists()


def test_the_participant_level_and_segment_share_one_cluster_builder(tmp_path):
    """`dask_cluster` is the one place a LocalCluster is started: in-process, existing scheduler, local."""
    from nuclei_app.segment.executors import dask_cluster

    with dask_cluster(SegmentConfig()) as none:
        assert none is None
    with dask_cluster(SegmentConfig(dask_scheduler="tcp://127.0.0.1:9")) as existing:
        assert existing.address == "tcp://127.0.0.1:9" and existing.local_workers is None
        assert existing.torch_threads is None
    with dask_cluster(SegmentConfig(nprocs=2, mem="2GB")) as local:
        from distributed import Client

        assert local.local_workers == 2 and local.torch_threads >= 1
        with Client(local.address) as client:
            workers = client.scheduler_info()["workers"].values()
            assert len(workers) == 2 and all(w["memory_limit"] == 10**9 for w in workers)
