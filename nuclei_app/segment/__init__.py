"""Whole-slide segmentation: predictors, tile jobs, executors, the run record, the pipeline.

Implementation lives in the submodules; the names a user calls are re-exported here.
"""
from __future__ import annotations

from nuclei_app.segment.executors import DaskCluster, dask_cluster
from nuclei_app.segment.pipeline import resolve_channels, segment_slide
from nuclei_app.segment.predictors import PredictorSpec
from nuclei_app.segment.record import RUN_RECORD_NAME, SegmentationResult, read_run_record

__all__ = [
    "DaskCluster",
    "PredictorSpec",
    "RUN_RECORD_NAME",
    "SegmentationResult",
    "dask_cluster",
    "read_run_record",
    "resolve_channels",
    "segment_slide",
]
