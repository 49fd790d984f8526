"""Write images as pyramidal OME-TIFF or OME-Zarr, atomically.

Every writer writes to a temporary ``*.partial-<pid>`` name and renames it when complete
(see `nuclei_app.atomic`), so a file under its final name is always whole.

Image writers
-------------
- `write_ome_tiff`: tiled, compressed, pyramid levels in SubIFDs, OME-XML with channel
  names and pixel size. Accepts a (C, Y, X) array or a tile function, so that a slide
  larger than memory can be written tile by tile.
- `write_ome_zarr_image`: OME-NGFF multiscale image via ome-zarr-py, with ``omero``
  channel labels and the physical scale of each level.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence
import numpy as np
from nuclei_app.atomic import raise_for_os_error, partial_name
from nuclei_app.errors import UsageError
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

from typing import TYPE_CHECKING  # noqa: E402  (kept beside the writers that need it)
if TYPE_CHECKING:
    pass




#: A tile function returns channel ``c`` of the level-0 region (y0, x0, height, width)
#: as a 2-D array of shape (height, width) in the slide's dtype.
TileFunction = Callable[[int, int, int, int, int], np.ndarray]


#: Above this many uncompressed bytes a classic TIFF cannot hold the image (4 GiB offsets
#: with room for the pyramid and compression overhead): BigTIFF is used.
_CLASSIC_TIFF_LIMIT = 2**31




def pyramid_level_count(shape_yx: Sequence[int], tile: Sequence[int]) -> int:
    """Number of 2x levels until the smallest level fits in one tile (at least 1)."""
    size = max(int(shape_yx[0]), int(shape_yx[1]))
    edge = max(1, min(int(tile[0]), int(tile[1])))
    return 1 + max(0, math.ceil(math.log2(size / edge))) if size > edge else 1


def downsample_mean2(image: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2 x 2 block means (odd edges repeat the last row/column).

    Parameters
    ----------
    image : ndarray, shape (..., Y, X)

    Returns
    -------
    ndarray, shape (..., ceil(Y / 2), ceil(X / 2)), same dtype (integers rounded)
    """
    size_y, size_x = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, size_y % 2), (0, size_x % 2)]
    padded = np.pad(image, pad, mode="edge") if (size_y % 2 or size_x % 2) else image
    quarters = (padded[..., 0::2, 0::2], padded[..., 1::2, 0::2], padded[..., 0::2, 1::2], padded[..., 1::2, 1::2])
    if np.issubdtype(image.dtype, np.integer):
        # exact integer sums (no float round trip); (sum + 2) // 4 rounds halves up
        wide = np.uint32 if image.dtype.kind == "u" and image.dtype.itemsize <= 2 else np.int64
        total = quarters[0].astype(wide)
        for quarter in quarters[1:]:
            total += quarter
        return ((total + 2) // 4).astype(image.dtype)
    accumulator = np.float64 if image.dtype.itemsize > 4 else np.float32
    total = quarters[0].astype(accumulator)
    for quarter in quarters[1:]:
        total += quarter
    return (total / 4).astype(image.dtype)


def _ome_metadata(channel_names: Sequence[str], pixel_size_um: tuple[float, float] | None) -> dict:
    metadata: dict = {"axes": "CYX", "Channel": {"Name": [str(name) for name in channel_names]}}
    if pixel_size_um is not None:
        metadata.update(
            PhysicalSizeY=float(pixel_size_um[0]),
            PhysicalSizeYUnit="µm",
            PhysicalSizeX=float(pixel_size_um[1]),
            PhysicalSizeXUnit="µm",
        )
    return metadata


def _tiles_from_array(level: np.ndarray, tile: tuple[int, int]) -> Iterator[np.ndarray]:
    for plane in level:
        for y in range(0, plane.shape[0], tile[0]):
            for x in range(0, plane.shape[1], tile[1]):
                yield plane[y : y + tile[0], x : x + tile[1]]


def _tiles_from_function(
    tile_function: TileFunction, shape: tuple[int, int, int], level: int, tile: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Tiles of pyramid ``level`` in TIFF order, each computed from its level-0 footprint."""
    channels, size_y, size_x = shape
    factor = 2**level
    level_y, level_x = math.ceil(size_y / factor), math.ceil(size_x / factor)
    for channel in range(channels):
        for y in range(0, level_y, tile[0]):
            for x in range(0, level_x, tile[1]):
                y0, x0 = y * factor, x * factor
                height = min(tile[0] * factor, size_y - y0)
                width = min(tile[1] * factor, size_x - x0)
                block = np.asarray(tile_function(channel, y0, x0, height, width))
                if block.shape != (height, width):
                    raise ValueError(
                        f"tile function returned shape {block.shape} for a ({height}, {width}) region"
                    )
                if level and block.size and block.min() == block.max():
                    # constant (background) tile: its downsampled version is the same constant
                    yield np.full((math.ceil(height / factor), math.ceil(width / factor)), block.flat[0], block.dtype)
                    continue
                for _ in range(level):
                    block = downsample_mean2(block)
                yield block


def _checked_source(
    path: Path,
    image: np.ndarray | TileFunction,
    channel_names: Sequence[str],
    tile: tuple[int, int],
    n_levels: int | None,
    shape: tuple[int, int, int] | None,
    dtype: np.dtype | str | None,
) -> tuple[np.ndarray | None, tuple[int, int, int], np.dtype, int]:
    """The array (None for a tile function), its (C, Y, X) shape, pixel type and pyramid level
    count, after checking them against the channel names (`UsageError` naming ``path``)."""
    if callable(image):
        if shape is None or dtype is None:
            raise UsageError("writing from a tile function needs shape=(C, Y, X) and dtype", path)
        full_shape = tuple(int(s) for s in shape)
        pixel_type = np.dtype(dtype)
        levels = 1 if n_levels is None else int(n_levels)
        array = None
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.ndim != 3:
            raise UsageError(f"image must be (C, Y, X), got shape {array.shape}", path)
        full_shape, pixel_type = tuple(array.shape), array.dtype
        levels = pyramid_level_count(full_shape[1:], tile) if n_levels is None else int(n_levels)
    if len(full_shape) != 3 or min(full_shape) <= 0:
        raise UsageError(f"image shape {full_shape} must be (C, Y, X) with no empty axis", path)
    if len(channel_names) != full_shape[0]:
        raise UsageError(f"{len(channel_names)} channel names for {full_shape[0]} channels", path)
    return array, full_shape, pixel_type, max(1, levels)


def write_ome_tiff(
    path: str | Path,
    image: np.ndarray | TileFunction,
    channel_names: Sequence[str],
    pixel_size_um: tuple[float, float] | None = None,
    tile: tuple[int, int] = (256, 256),
    n_levels: int | None = None,
    compression: str | None = "zlib",
    *,
    shape: tuple[int, int, int] | None = None,
    dtype: np.dtype | str | None = None,
) -> Path:
    """Write a tiled, pyramidal OME-TIFF (levels in SubIFDs) atomically.

    Parameters
    ----------
    path : str or Path
        Output file; ``.ome.btf`` (or an image over 2 GiB uncompressed) is written as BigTIFF.
    image : ndarray of shape (C, Y, X) (or (Y, X)), or a tile function
        A tile function ``f(c, y0, x0, height, width) -> ndarray (height, width)`` is called
        for every tile, so the full image is never held in memory; ``shape`` and
        ``dtype`` are then required. Pyramid levels of a tile function are computed from
        each tile's level-0 footprint (level k costs one more pass over the image), so
        the default for tile functions is level 0 only.
    channel_names : sequence of str
        One name per channel, stored in the OME-XML.
    pixel_size_um : (float, float), optional
        (y, x) pixel size of level 0 in micrometres.
    tile : (int, int)
        Tile height and width (multiples of 16).
    n_levels : int, optional
        Pyramid levels including level 0; default: halve until one tile holds the level
        (arrays) or 1 (tile functions).
    compression : str or None
        TIFF compression (``"zlib"``, ``"zstd"``, ``None``...).

    Returns
    -------
    Path
        The written file.
    """
    import tifffile

    path = Path(path)
    tile = (int(tile[0]), int(tile[1]))
    if tile[0] % 16 or tile[1] % 16 or min(tile) <= 0:
        raise UsageError(f"tile size {tile} must be positive multiples of 16", path)
    array, full_shape, pixel_type, levels = _checked_source(path, image, channel_names, tile, n_levels, shape, dtype)
    raw_bytes = int(np.prod(full_shape)) * pixel_type.itemsize
    bigtiff = path.name.lower().endswith(".ome.btf") or raw_bytes > _CLASSIC_TIFF_LIMIT
    options = dict(
        tile=tile,
        compression=compression,
        photometric="minisblack",
        dtype=pixel_type,
    )
    temporary = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tifffile.TiffWriter(temporary, bigtiff=bigtiff, ome=True) as writer:
            level_array = array
            for level in range(levels):
                factor = 2**level
                level_shape = (full_shape[0], math.ceil(full_shape[1] / factor), math.ceil(full_shape[2] / factor))
                if array is not None:
                    if level > 0:
                        level_array = downsample_mean2(level_array)
                    tiles = _tiles_from_array(level_array, tile)
                else:
                    tiles = _tiles_from_function(image, full_shape, level, tile)  # type: ignore[arg-type]
                if level == 0:
                    writer.write(
                        tiles,
                        shape=level_shape,
                        subifds=levels - 1,
                        metadata=_ome_metadata(channel_names, pixel_size_um),
                        **options,
                    )
                else:
                    writer.write(tiles, shape=level_shape, subfiletype=1, metadata=None, **options)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise_for_os_error(error, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
