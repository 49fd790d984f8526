"""Pipelines the CLI and the BIDS App share: weak-label a file, segment then QC."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nuclei_app.config import SegmentConfig
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.core.weak import METHODS, WeakLabels, weak_labels
from nuclei_app.errors import UsageError
from nuclei_app.io.label_source import find_segmentation_scores
from nuclei_app.io.labels import write_label_tiff
from nuclei_app.io.ome_zarr import write_labels_ome_zarr
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.qc.slide import QCResult, write_qc_report
from nuclei_app.segment.executors import DaskCluster
from nuclei_app.segment.pipeline import segment_slide
from nuclei_app.segment.predictors import PredictorSpec
from nuclei_app.segment.record import SegmentationResult


# --------------------------------------------------------------------------- files

OUTPUT_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif")


def weak_label_file(
    image_path: str | Path,
    output_path: str | Path,
    method: str = "log",
    nuclear_channels: str | Sequence[str] | None = None,
    diameter: float | None = None,
) -> WeakLabels:
    """Weak-label a whole image file and write the labels.

    The whole level 0 of the image is read into memory: this is meant for scoring the
    teacher on tiles and images (whole slides are segmented tile by tile by `segment`).

    Parameters
    ----------
    image_path : path
        OME-TIFF / TIFF file or OME-Zarr folder (read with `nuclei_app.read.open_slide`).
    output_path : path
        ``.tif``/``.tiff`` (``.ome.tif``): a ``uint32`` label TIFF; ``.ome.zarr``: an NGFF
        image of the nuclear channels with the label image ``labels/nuclei``.
    method : {"log", "otsu"}
        The labeler.
    nuclear_channels : str or sequence of str, optional
        Nuclear channel names (``"DAPI,Histone"``); default: chosen by name.
    diameter : float, optional
        Nucleus diameter in pixels; estimated when absent.

    Returns
    -------
    WeakLabels

    Raises
    ------
    UsageError
        Unknown method, output suffix, or a non-positive diameter.
    MissingInputError, BadDataError
        From reading the image.
    """

    output_path = Path(output_path)
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not output_path.name.lower().endswith(OUTPUT_SUFFIXES):
        raise UsageError("output must end in .tif, .tiff or .ome.zarr", output_path)
    if diameter is not None and not (np.isfinite(diameter) and diameter > 0):
        raise UsageError(f"--diameter must be a positive number of pixels, got {diameter}")
    with open_slide(image_path) as slide:
        channels = select_nuclear_channels(slide.channel_names, nuclear_channels, path=image_path)
        percentiles = channel_percentiles(slide, channels)
        image = slide.read_level(0, channels=channels)
        names = [slide.channel_names[index] for index in channels]
        pixel_size = slide.pixel_size_um
    result = weak_labels(image, method=method, pixel_size_um=pixel_size, diameter=diameter, percentiles=percentiles)
    if output_path.name.lower().endswith(".ome.zarr"):
        write_labels_ome_zarr(output_path, result.labels, image=image, channel_names=names, pixel_size_um=pixel_size)
    else:
        write_label_tiff(output_path, result.labels, pixel_size_um=pixel_size)
    return result


# --------------------------------------------------------------------------- slides


@dataclass
class SegmentedSlide:
    """What `segment_then_qc` produced.

    Attributes
    ----------
    segmentation : SegmentationResult
    qc : QCResult or None
        The self-diagnosis (None when it was not asked for).
    """

    segmentation: SegmentationResult
    qc: QCResult | None


def default_qc_path(output_path: str | Path) -> Path:
    """``OUT_qc.json`` beside ``OUT.ome.zarr``: where `segment` writes its self-diagnosis by default."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name.removesuffix(".ome.zarr").removesuffix(".zarr") + "_qc.json")


def segment_then_qc(
    image_path: str | Path,
    output_path: str | Path,
    predictor: PredictorSpec,
    config: SegmentConfig = SegmentConfig(),
    *,
    table_path: str | Path | None = None,
    geojson_path: str | Path | None = None,
    qc_path: str | Path | None = None,
    write_qc: bool = True,
    qc_config: str | Path | None = None,
    cluster: DaskCluster | None = None,
    progress: bool = True,
) -> SegmentedSlide:
    """Segment a slide (`nuclei_app.segment.segment_slide`), then write its self-diagnosis.

    The pipeline of `nuclei-app segment` and of each slide of `nuclei-app run ... participant`.
    QC judges the nuclear channels the segmentation used, with the same device and score
    cut-off. The model runs once: QC reads each nucleus's score and head agreement from the
    scores sidecar the segmentation wrote into its store (or from ``table_path``). Only a
    store that has neither (one resumed from a run of an older version) makes QC rerun the
    model's heads over the slide.

    Parameters
    ----------
    image_path, output_path, predictor, config, table_path, geojson_path, cluster, progress
        As `nuclei_app.segment.segment_slide`.
    qc_path : str or Path, optional
        The QC report to write (default: `default_qc_path`).
    write_qc : bool
        Write the QC report at all.
    qc_config : str or Path, optional
        QC thresholds file (JSON/TOML, schema ``qc_config``; default: the documented thresholds).

    Returns
    -------
    SegmentedSlide

    Raises
    ------
    The errors of `segment_slide` and `nuclei_app.qc.slide.write_qc_report`.
    """
    segmentation = segment_slide(
        image_path, output_path, predictor, config, table_path=table_path, geojson_path=geojson_path,
        cluster=cluster, progress=progress,
    )
    if not write_qc:
        return SegmentedSlide(segmentation, None)
    scores_known = table_path is not None or find_segmentation_scores(segmentation.output_path) is not None
    qc = write_qc_report(
        segmentation.output_path, image_path, qc_path if qc_path is not None else default_qc_path(output_path),
        model_dir=None if scores_known else predictor.model_dir, config_path=qc_config,
        table_path=table_path, nuclear_channels=segmentation.nuclear_channels, device=config.device,
        score_threshold=config.score_threshold,
    )
    return SegmentedSlide(segmentation, qc)
