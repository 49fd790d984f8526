"""Pipelines the CLI and the BIDS App share: weak-label a file, segment then QC."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence
import numpy as np
from nuclei_app.core.weak import METHODS, WeakLabels, weak_labels
from nuclei_app.errors import UsageError
from nuclei_app.io.labels import write_label_tiff
from nuclei_app.io.ome_zarr import write_labels_ome_zarr
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.core.channels import select_nuclear_channels


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

