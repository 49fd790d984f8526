"""Write images and segmentations as OME-Zarr (NGFF) stores, atomically."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from nuclei_app.atomic import atomic_directory
from nuclei_app.core.stitching import instance_layers
from nuclei_app.errors import BadDataError, UsageError
from nuclei_app.io.labels import as_uint32_labels
from nuclei_app.io.ngff import (FLAT_LABEL_NAME, NGFF_VERSION, ZARR_FORMATS, layer_label_name, ngff_format,
                                omero_metadata)
from nuclei_app.io.ome_tiff import downsample_mean2, pyramid_level_count

# ======================================================================================
# Segmentation stores: the nuclear image plus overlap-preserving label images
# ======================================================================================
#
# Layout (OME-NGFF 0.4 on Zarr v2, the version every current viewer reads: napari-ome-zarr,
# QuPath, Fiji/MoBIE, vizarr):
#
#   OUT.ome.zarr/                     multiscale image (c, y, x): the nuclear channel(s)
#   OUT.ome.zarr/0, 1, ...            pyramid levels (2x local mean)
#   OUT.ome.zarr/labels/nuclei        flattened view, uint32 (y, x); each pixel -> one nucleus
#   OUT.ome.zarr/labels/nuclei_layer-<k>   every nucleus's full mask, one layer per nucleus,
#                                     no two overlapping nuclei in the same layer
#
# Labels pyramids are nearest-neighbour; every array is written region by region so memory
# is bounded by a few chunks, never by the slide.

if TYPE_CHECKING:
    from nuclei_app.core.instances import Instances


def _data_omero(image: np.ndarray, channel_names: Sequence[str]) -> dict:
    """`omero` metadata from the data: value range and a 1-99.8 percentile window per channel."""
    step = max(1, int(math.sqrt(image.shape[1] * image.shape[2] / 1_000_000)))
    sample = np.asarray(image[:, ::step, ::step], dtype=np.float64)
    ranges, windows = [], []
    for index in range(len(channel_names)):
        values = sample[index][np.isfinite(sample[index])]
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        start, end = (np.percentile(values, [1.0, 99.8]).tolist() if values.size else (low, high))
        ranges.append((low, high))
        windows.append((start, end))
    return omero_metadata(channel_names, ranges, windows)


def _checked_cyx(image: np.ndarray, channel_names: Sequence[str], path: Path, yx_shape: tuple[int, ...] | None = None,
                 error: type[Exception] = UsageError) -> np.ndarray:
    """``image`` as a (C, Y, X) array after the writers' common checks, else ``error``.

    A (Y, X) image gets a channel axis; no axis may be empty; with ``yx_shape`` its plane must
    match it (the labels or instances it is stored with); one channel name per channel.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or min(array.shape) <= 0:
        raise error(f"image must be (C, Y, X) with no empty axis, got shape {array.shape}", path)
    if yx_shape is not None and array.shape[1:] != tuple(yx_shape):
        raise error(f"image shape {array.shape} does not match the labels' {tuple(yx_shape)}; "
                    "give the (C, H, W) image the labels were made from", path)
    if len(channel_names) != array.shape[0]:
        raise error(f"{len(channel_names)} channel names for {array.shape[0]} channels", path)
    return array


def write_ome_zarr_image(
    path: str | Path,
    image: np.ndarray,
    channel_names: Sequence[str],
    pixel_size_um: tuple[float, float] | None = None,
    chunks: tuple[int, int, int] = (1, 256, 256),
    n_levels: int | None = None,
    ngff_version: str = NGFF_VERSION,
) -> Path:
    """Write a (C, Y, X) image as an OME-NGFF multiscale image, atomically.

    Parameters
    ----------
    path : str or Path
        Output ``.ome.zarr`` folder (replaced if it exists).
    image : ndarray, shape (C, Y, X) or (Y, X)
    channel_names : sequence of str
        Stored as ``omero`` channel labels.
    pixel_size_um : (float, float), optional
        (y, x) pixel size of level 0 in micrometres; written as the ``scale`` of each
        level with axis unit ``micrometer`` (unit-less scale 1.0 when None).
    chunks : (int, int, int)
        Chunk shape (c, y, x) of every level.
    n_levels : int, optional
        Pyramid levels including level 0 (2x local-mean downsampling); default: halve
        until one chunk holds the level.
    ngff_version : "0.4" or "0.5"
        0.4 writes Zarr v2 (widest reader support), 0.5 writes Zarr v3.

    Returns
    -------
    Path
        The written folder.
    """
    import zarr
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    path = Path(path)
    array = _checked_cyx(image, channel_names, path)
    fmt, zarr_format = ngff_format(ngff_version)
    levels = pyramid_level_count(array.shape[1:], chunks[1:]) if n_levels is None else max(1, int(n_levels))
    scale = {"c": 1.0, "y": 1.0, "x": 1.0}
    axes_units = None
    if pixel_size_um is not None:
        scale.update(y=float(pixel_size_um[0]), x=float(pixel_size_um[1]))
        axes_units = {"y": "micrometer", "x": "micrometer"}
    chunk_shape = tuple(min(int(c), s) for c, s in zip(chunks, array.shape))
    with atomic_directory(path) as temporary:
        group = zarr.open_group(str(temporary), mode="w", zarr_format=zarr_format)
        write_image(
            array,
            group,
            scale_factors=[2**k for k in range(1, levels)],
            method=Methods.LOCAL_MEAN,
            fmt=fmt,
            axes=["c", "y", "x"],
            axes_units=axes_units,
            scale=scale,
            storage_options={"chunks": chunk_shape},
            name=path.name.split(".")[0],
            omero=_data_omero(array, channel_names),
        )
    return path


def downsample_nearest2(labels: np.ndarray) -> np.ndarray:
    """Halve the last two axes by taking every second pixel (label-safe: no new ids).

    Parameters
    ----------
    labels : ndarray, shape (..., Y, X)

    Returns
    -------
    ndarray, shape (..., ceil(Y / 2), ceil(X / 2)), same dtype
    """
    return np.ascontiguousarray(labels[..., ::2, ::2])


class SegmentationZarrWriter:
    """Stream a segmentation store (NGFF 0.4, Zarr v2) region by region.

    Create it on an empty folder (usually the temporary folder of
    `nuclei_app.atomic.atomic_directory`), write level-0 regions of the image and of each
    label image (chunk-aligned regions are cheapest: each chunk is then encoded once),
    then call `finish`, which builds every pyramid level from the level above it block by
    block and writes the NGFF metadata with ome-zarr-py.

    Parameters
    ----------
    path : str or Path
        Folder to create the store in (must not hold a store yet).
    shape_yx : (int, int)
        Level-0 size of the slide.
    image_dtype : numpy dtype
        Pixel type of the stored image.
    channel_names : sequence of str
        Names of the stored image channels (``omero`` labels).
    pixel_size_um : (float, float) or None
        (y, x) level-0 pixel size; written as ``scale`` with unit ``micrometer``.
    chunk : int
        Chunk side (y and x) of every array and level.
    n_levels : int, optional
        Pyramid levels, level 0 included; default halves until a level fits one chunk.
    """

    def __init__(
        self,
        path: str | Path,
        shape_yx: tuple[int, int],
        image_dtype: np.dtype,
        channel_names: Sequence[str],
        pixel_size_um: tuple[float, float] | None,
        chunk: int = 512,
        n_levels: int | None = None,
    ) -> None:
        import zarr

        self.path = Path(path)
        self.shape_yx = (int(shape_yx[0]), int(shape_yx[1]))
        self.channel_names = [str(name) for name in channel_names]
        self.pixel_size_um = None if pixel_size_um is None else (float(pixel_size_um[0]), float(pixel_size_um[1]))
        self.chunk = int(chunk)
        self.n_levels = pyramid_level_count(self.shape_yx, (self.chunk, self.chunk)) if n_levels is None else int(n_levels)
        self.n_levels = max(1, self.n_levels)
        self.root = zarr.open_group(str(self.path), mode="w", zarr_format=ZARR_FORMATS[NGFF_VERSION])
        self.image = self._create(self.root, "0", (len(self.channel_names), *self.shape_yx), np.dtype(image_dtype))
        self.labels_group = self.root.require_group("labels")
        self.label_arrays: dict[str, object] = {}

    # -- arrays --------------------------------------------------------------------------
    def _create(self, group, name: str, shape: tuple[int, ...], dtype: np.dtype):
        from numcodecs import Blosc

        chunks = tuple([1] * (len(shape) - 2) + [min(self.chunk, shape[-2]), min(self.chunk, shape[-1])])
        return group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=0,
            compressors=Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )

    def _level_shape(self, level: int) -> tuple[int, int]:
        factor = 2**level
        return math.ceil(self.shape_yx[0] / factor), math.ceil(self.shape_yx[1] / factor)

    def add_labels(self, names: Sequence[str]) -> None:
        """Create level 0 of the label images ``labels/<name>`` (uint32, all zero until written)."""
        for name in names:
            if name in self.label_arrays:
                continue
            group = self.labels_group.require_group(name)
            self.label_arrays[name] = self._create(group, "0", self.shape_yx, np.dtype(np.uint32))

    def write_image_region(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Write a level-0 image block of shape (C, h, w) at (y0, x0)."""
        _, height, width = block.shape
        self.image[:, y0 : y0 + height, x0 : x0 + width] = block

    def write_label_region(self, name: str, y0: int, x0: int, block: np.ndarray) -> None:
        """Write a level-0 block (h, w) of label image ``name`` at (y0, x0); all-zero blocks are skipped."""
        if not block.any():  # chunks never written read as the fill value 0
            return
        height, width = block.shape
        self.label_arrays[name][y0 : y0 + height, x0 : x0 + width] = block.astype(np.uint32, copy=False)

    # -- pyramids and metadata -----------------------------------------------------------
    def _build_pyramid(self, group, level0, is_label: bool) -> None:
        previous = level0
        for level in range(1, self.n_levels):
            shape_yx = self._level_shape(level)
            shape = (*level0.shape[:-2], *shape_yx)
            current = self._create(group, str(level), shape, level0.dtype)
            for y0 in range(0, shape_yx[0], self.chunk):
                for x0 in range(0, shape_yx[1], self.chunk):
                    y1, x1 = min(y0 + self.chunk, shape_yx[0]), min(x0 + self.chunk, shape_yx[1])
                    source = np.asarray(previous[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
                    if is_label:
                        if not source.any():
                            continue
                        block = downsample_nearest2(source)
                    else:
                        block = downsample_mean2(source)
                    current[..., y0 : y0 + block.shape[-2], x0 : x0 + block.shape[-1]] = block
            previous = current

    def _datasets(self, n_leading_axes: int) -> list[dict]:
        size_y, size_x = self.pixel_size_um if self.pixel_size_um is not None else (1.0, 1.0)
        return [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * n_leading_axes + [size_y * 2**level, size_x * 2**level]}
                ],
            }
            for level in range(self.n_levels)
        ]

    def _axes_units(self) -> dict[str, str] | None:
        return None if self.pixel_size_um is None else {"y": "micrometer", "x": "micrometer"}

    def finish(self, display_windows: Sequence[tuple[float, float]] | None = None) -> None:
        """Build all pyramids and write the NGFF metadata (image, ``labels`` and ``image-label``).

        Parameters
        ----------
        display_windows : sequence of (start, end), optional
            Contrast window per image channel for viewers (``omero.channels[].window``),
            e.g. the slide percentiles used for normalisation.
        """
        import warnings

        with warnings.catch_warnings():  # ome-zarr-py instantiates its own deprecated Scaler at import
            warnings.simplefilter("ignore", DeprecationWarning)
            from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

        fmt, _ = ngff_format(NGFF_VERSION)
        self._build_pyramid(self.root, self.image, is_label=False)
        if np.issubdtype(self.image.dtype, np.integer):
            info = np.iinfo(self.image.dtype)
            full_range = (float(info.min), float(info.max))
        else:
            full_range = (0.0, 1.0)
        windows = display_windows if display_windows is not None else [full_range] * len(self.channel_names)
        omero = omero_metadata(self.channel_names, [full_range] * len(self.channel_names), windows)
        write_multiscales_metadata(
            self.root,
            datasets=self._datasets(1),
            fmt=fmt,
            axes=["c", "y", "x"],
            axes_units=self._axes_units(),
            name=self.path.name.split(".")[0],
            metadata={"omero": omero},
        )
        for name in self.label_arrays:  # in creation order: the flattened view first
            group = self.labels_group[name]
            self._build_pyramid(group, self.label_arrays[name], is_label=True)
            write_multiscales_metadata(
                group,
                datasets=self._datasets(0),
                fmt=fmt,
                axes=["y", "x"],
                axes_units=self._axes_units(),
                name=name,
            )
            write_label_metadata(self.labels_group, name, fmt=fmt, source={"image": "../../"})


def write_segmentation_zarr(
    path: str | Path,
    image: np.ndarray,
    channel_names: Sequence[str],
    instances: Instances,
    pixel_size_um: tuple[float, float] | None = None,
    chunk: int = 256,
) -> Path:
    """Write an in-memory image and its (possibly overlapping) nuclei as a segmentation store, atomically.

    Ids are 1..N in instance order in every label image; ``labels/nuclei`` gives each pixel
    to the covering instance with the highest score; ``labels/nuclei_layer-<k>`` hold the
    full masks, coloured greedily so overlapping instances never share a layer. Whole
    slides are streamed by `nuclei_app.segment.segment_slide` through `SegmentationZarrWriter`.

    Parameters
    ----------
    path : str or Path
        Output ``.ome.zarr`` folder (replaced if it exists).
    image : ndarray, shape (C, Y, X) or (Y, X)
        The image the nuclei were found in (stored as the multiscale image).
    channel_names : sequence of str
        One name per image channel.
    instances : Instances
        Nuclei over the image, masks (N, Y, X).
    pixel_size_um : (float, float), optional
        (y, x) pixel size in micrometres.
    chunk : int
        Chunk side of every array.

    Returns
    -------
    Path
        The written store.
    """

    path = Path(path)
    array = _checked_cyx(image, channel_names, path, yx_shape=tuple(instances.shape))
    layers = instance_layers(instances)
    n_layers = max(1, int(layers.max()) + 1 if len(layers) else 1)
    with atomic_directory(path) as temporary:
        writer = SegmentationZarrWriter(temporary, array.shape[1:], array.dtype, channel_names, pixel_size_um, chunk)
        writer.add_labels([FLAT_LABEL_NAME, *(layer_label_name(k) for k in range(n_layers))])
        writer.write_image_region(0, 0, array)
        writer.write_label_region(FLAT_LABEL_NAME, 0, 0, instances.to_label_image())
        for layer in range(n_layers):
            layer_image = np.zeros(instances.shape, dtype=np.uint32)
            for index in np.flatnonzero(layers == layer):
                y0, x0, y1, x1 = instances.boxes[index]
                layer_image[y0:y1, x0:x1][instances.crops[index]] = index + 1
            writer.write_label_region(layer_label_name(layer), 0, 0, layer_image)
        writer.finish()
    return path


def write_labels_ome_zarr(
    path: str | Path,
    labels: np.ndarray,
    image: np.ndarray | None = None,
    channel_names: Sequence[str] | None = None,
    pixel_size_um: tuple[float, float] | None = None,
) -> Path:
    """Write an OME-Zarr image (NGFF `NGFF_VERSION`) with the label image ``labels/nuclei``, atomically.

    Written by the same streaming writer as whole-slide segmentations, so the two agree.

    The store is written under a temporary name and renamed when complete.

    Parameters
    ----------
    path : path
        Output folder, e.g. ``OUT.ome.zarr``.
    labels : ndarray of int, shape (H, W)
        Instance ids, 0 = background; stored as ``uint32``, pyramid by nearest neighbour.
    image : ndarray, shape (C, H, W) or (H, W), optional
        The image the labels belong to (e.g. the nuclear channels or their composite).
        When absent, the image is the nuclei foreground (``uint8``, 255 inside nuclei),
        so that the store remains a valid NGFF image with labels.
    channel_names : sequence of str, optional
        One name per channel of ``image`` (stored as ``omero`` channel labels).
    pixel_size_um : (float, float), optional
        (y, x) pixel size in micrometres, stored as the scale of level 0.

    Returns
    -------
    Path
        The written store.
    """
    path = Path(path)
    label_array = as_uint32_labels(labels, path)
    if image is None:
        image, channel_names = ((label_array > 0) * np.uint8(255))[None], ["nuclei_foreground"]
    if channel_names is None:
        channel_names = [f"channel_{index}" for index in range(np.asarray(image).shape[0] if np.ndim(image) == 3 else 1)]
    channel_names = [str(name) for name in channel_names]
    image_array = _checked_cyx(image, channel_names, path, yx_shape=label_array.shape, error=BadDataError)
    low = float(np.min(image_array)) if image_array.size else 0.0
    high = float(np.max(image_array)) if image_array.size else 1.0
    with atomic_directory(path) as temporary:
        writer = SegmentationZarrWriter(temporary, label_array.shape, image_array.dtype, channel_names, pixel_size_um,
                                        chunk=256)
        writer.add_labels([FLAT_LABEL_NAME])
        writer.write_image_region(0, 0, image_array)
        writer.write_label_region(FLAT_LABEL_NAME, 0, 0, label_array)
        writer.finish(display_windows=[(low, high)] * len(channel_names))
    return path
