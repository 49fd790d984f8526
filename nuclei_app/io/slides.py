"""Open microscopy slides lazily: OME-TIFF, plain TIFF and OME-Zarr behind one `Slide` object.

A `Slide` knows every pyramid level's shape, the dtype, channel names and the physical
pixel size, and reads any region of any level and channel subset by touching only the
TIFF tiles / Zarr chunks that intersect it (tifffile ``aszarr`` and zarr do the chunk
bookkeeping). Nothing is read at open time except metadata and, for float images, the
smallest pyramid level (to refuse NaN-only images early).

Axes beyond channel, y and x are fixed at open time: ``t=0`` and ``z=0`` unless
`open_slide` is given other indices. Samples-per-pixel (``S``, e.g. RGB or RGBA planes)
count as channels.

Supported inputs
----------------
- OME-TIFF (classic TIFF or BigTIFF, tiled or stripped, pyramids in SubIFDs,
  multi-series through ``series=``).
- Plain TIFF without OME-XML (pixel size unknown: ``pixel_size_um is None``).
  A multi-file OME-TIFF opens one file at a time: only the planes stored in that file
  are read (its companion ``.companion.ome`` itself is refused).
- OME-Zarr (NGFF 0.1 to 0.5, zarr v2 and v3), including the bioformats2raw layout
  (series subgroups) and ``omero`` channel labels.
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
import numpy as np
from nuclei_app.errors import BadDataError, MissingInputError, NucleiAppError, UsageError
from nuclei_app.io.ngff import is_zarr_store, bioformats2raw_series, ngff_axes, ngff_level0_scale, omero_names
from nuclei_app.core.intensity import normalise_intensities, nuclear_composite
from nuclei_app.core.weak import estimate_nucleus_diameter
from nuclei_app.core.tissue import tissue_level




#: Micrometres per unit, for OME-XML, NGFF and BIDS ``PixelSizeUnits`` spellings.
UNIT_TO_UM: dict[str, float] = {
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
}


_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def length_to_um(value: float, unit: str | None) -> float | None:
    """Convert ``value`` in ``unit`` to micrometres; None when the unit is unknown or absent."""
    if unit is None:
        return None
    factor = UNIT_TO_UM.get(str(unit).strip().lower()) or UNIT_TO_UM.get(str(unit).strip())
    if factor is None:
        return None
    return float(value) * factor


# --------------------------------------------------------------------------------------
# The Slide object
# --------------------------------------------------------------------------------------


@dataclass
class Slide:
    """A lazily opened slide: metadata in memory, pixels read on demand.

    Attributes
    ----------
    path : Path
        The file (TIFF) or folder (Zarr) that was opened.
    format : str
        ``"ome-tiff"``, ``"ome-zarr"`` or ``"tiff"`` (TIFF without OME-XML).
    level_shapes : list of (C, Y, X)
        Shape of every pyramid level, level 0 (full resolution) first.
    dtype : numpy.dtype
        Native pixel type; regions are returned in it.
    channel_names : list of str
        One name per channel; unnamed channels are ``"channel_<i>"``.
    pixel_size_um : (float, float) or None
        (y, x) pixel size of level 0 in micrometres; None when the file does not say.
    series : int
        The series (OME image) that was opened.
    """

    path: Path
    format: str
    level_shapes: list[tuple[int, int, int]]
    dtype: np.dtype
    channel_names: list[str]
    pixel_size_um: tuple[float, float] | None
    series: int = 0
    _arrays: list[Any] = field(default_factory=list, repr=False)
    _axes: list[str] = field(default_factory=list, repr=False)
    _fixed: dict[str, int] = field(default_factory=dict, repr=False)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    # -- shape helpers -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, Y, X) of level 0."""
        return self.level_shapes[0]

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def n_channels(self) -> int:
        return self.level_shapes[0][0]

    def downsample_factor(self, level: int) -> tuple[float, float]:
        """(y, x) factor by which ``level`` is smaller than level 0 (1.0 for level 0)."""
        self._check_level(level)
        _, y0, x0 = self.level_shapes[0]
        _, y, x = self.level_shapes[level]
        return y0 / y, x0 / x

    def level_pixel_size_um(self, level: int) -> tuple[float, float] | None:
        """(y, x) pixel size of ``level`` in micrometres, or None when unknown."""
        if self.pixel_size_um is None:
            return None
        fy, fx = self.downsample_factor(level)
        return self.pixel_size_um[0] * fy, self.pixel_size_um[1] * fx

    # -- reading -------------------------------------------------------------------------
    def read_region(
        self,
        y0: int,
        x0: int,
        height: int,
        width: int,
        level: int = 0,
        channels: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Read a (c, h, w) region in the native dtype, touching only the chunks it covers.

        Parameters
        ----------
        y0, x0 : int
            Top-left corner in pixels of ``level`` (may be negative or beyond the image;
            the region is clipped to the image bounds).
        height, width : int
            Requested size; the returned array is smaller where the region is clipped.
        level : int
            Pyramid level (0 = full resolution).
        channels : sequence of int, optional
            Channel indices in the order wanted; all channels when None.

        Returns
        -------
        ndarray, shape (c, h, w), dtype ``self.dtype``
        """
        self._check_level(level)
        channel_list = self._check_channels(channels)
        _, size_y, size_x = self.level_shapes[level]
        y_start, x_start = max(0, int(y0)), max(0, int(x0))
        y_stop = min(size_y, int(y0) + int(height))
        x_stop = min(size_x, int(x0) + int(width))
        if y_stop <= y_start or x_stop <= x_start:
            return np.zeros((len(channel_list), max(0, y_stop - y_start), max(0, x_stop - x_start)), self.dtype)
        rows, cols = slice(y_start, y_stop), slice(x_start, x_stop)
        array, axes = self._arrays[level], self._axes[level]
        try:
            if "S" in axes:  # interleaved samples: one read decodes every sample of a tile
                block = np.asarray(array[self._index(axes, rows, cols, None)])
                planes = np.moveaxis(block, -1, 0)  # remaining axes are (Y, X, S)
                return np.ascontiguousarray(planes[channel_list])
            out = np.empty((len(channel_list), y_stop - y_start, x_stop - x_start), dtype=self.dtype)
            for position, channel in enumerate(channel_list):
                out[position] = np.asarray(array[self._index(axes, rows, cols, channel)])
            return out
        except NucleiAppError:
            raise
        except Exception as error:  # decoder errors on damaged chunks
            raise BadDataError(
                f"cannot read level {level} region y={y_start}:{y_stop} x={x_start}:{x_stop} "
                f"({type(error).__name__}: {_first_line(error)}); the file is truncated or corrupt, "
                "re-export or re-copy it",
                self.path,
            ) from None

    def read_level(self, level: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """Read a whole pyramid level as (c, Y, X); meant for small levels (thumbnails, masks)."""
        self._check_level(level)
        _, size_y, size_x = self.level_shapes[level]
        return self.read_region(0, 0, size_y, size_x, level=level, channels=channels)

    def smallest_level(self) -> int:
        """Index of the lowest-resolution level."""
        return self.n_levels - 1

    def is_blank(self) -> bool:
        """True when the smallest level holds one constant value (or only NaN): an empty image.

        Stores without written chunks (sparse OME-Zarr) read as their fill value and are blank.
        """
        data = self.read_level(self.smallest_level())
        if data.size == 0:
            return True
        if np.issubdtype(data.dtype, np.floating):
            finite = data[np.isfinite(data)]
            return finite.size == 0 or bool(finite.min() == finite.max())
        return bool(data.min() == data.max())

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles (safe to call twice)."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # closing must never mask the caller's own error
                pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.n_levels:
            raise UsageError(f"pyramid level {level} does not exist (levels 0..{self.n_levels - 1})", self.path)

    def _check_channels(self, channels: Sequence[int] | None) -> list[int]:
        n_channels = self.n_channels
        if channels is None:
            return list(range(n_channels))
        chosen = [int(c) for c in channels]
        bad = [c for c in chosen if not 0 <= c < n_channels]
        if bad:
            raise UsageError(f"channel index {bad[0]} does not exist (channels 0..{n_channels - 1})", self.path)
        return chosen

    def _index(self, axes: str, rows: slice, cols: slice, channel: int | None) -> tuple:
        index: list[Any] = []
        for axis in axes:
            if axis == "Y":
                index.append(rows)
            elif axis == "X":
                index.append(cols)
            elif axis == "S":
                index.append(slice(None))
            elif axis == "C":
                index.append(channel if channel is not None else 0)
            else:  # T, Z and any other axis: the index fixed at open time
                index.append(self._fixed.get(axis, 0))
        return tuple(index)


# --------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------


def open_slide(path: str | Path, series: int = 0, *, z: int = 0, t: int = 0) -> Slide:
    """Open a slide lazily.

    Parameters
    ----------
    path : str or Path
        An OME-TIFF / TIFF file or an OME-Zarr folder.
    series : int
        Which image of a multi-series file (OME-TIFF images, bioformats2raw series).
    z, t : int
        Plane of the Z and T axes to expose (both 0 by default); slides are 2-D.

    Returns
    -------
    Slide
        Use as a context manager or call ``close()``.

    Raises
    ------
    MissingInputError
        The path does not exist.
    BadDataError
        Not a supported image, empty or truncated file, 0-sized axis, NaN-only image.
    UsageError
        ``series``, ``z`` or ``t`` out of range.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError("no such file or folder; check the path", path)
    if path.is_dir():
        if is_zarr_store(path):
            slide = _open_zarr(path, series, z, t)
        else:
            raise BadDataError(
                "is a folder but not an OME-Zarr store (no zarr.json or .zgroup); pass an image file "
                "or an .ome.zarr folder",
                path,
            )
    else:
        slide = _open_tiff(path, series, z, t)
    try:
        _check_slide(slide)
    except BaseException:
        slide.close()
        raise
    return slide


def read_image(path: str | Path, channels: Sequence[int] | None = None, series: int = 0) -> np.ndarray:
    """Read level 0 of a (small) image as (C, Y, X) in its native dtype."""
    with open_slide(path, series=series) as slide:
        return slide.read_level(0, channels=channels)


def _check_slide(slide: Slide) -> None:
    for level, shape in enumerate(slide.level_shapes):
        if min(shape) <= 0:
            raise BadDataError(
                f"level {level} has a 0-sized axis (C, Y, X = {shape}); the image holds no pixels, re-export it",
                slide.path,
            )
    if slide.dtype.kind not in "uif":
        raise BadDataError(f"pixel type {slide.dtype} is not supported; convert to uint8/uint16/float32", slide.path)
    if slide.dtype.kind == "f":
        smallest = slide.read_level(slide.smallest_level())
        if not np.isfinite(smallest).any():
            raise BadDataError("image contains only NaN or infinite values; re-export it with valid pixels", slide.path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


@contextmanager
def _quiet_tifffile() -> Iterator[list[str]]:
    """Collect tifffile's log messages instead of printing them (one-line errors only)."""
    messages: list[str] = []

    class _Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = _Collector(level=logging.DEBUG)
    previous = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


# -- TIFF --------------------------------------------------------------------------------


def _open_tiff(path: Path, series: int, z: int, t: int) -> Slide:
    import tifffile
    import zarr

    size = path.stat().st_size
    if size == 0:
        raise BadDataError("file is empty (0 bytes); re-copy or re-export it", path)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head[:4] not in _TIFF_MAGICS:
        lowered = head.lstrip().lower()
        if lowered.startswith(b"<?xml") or lowered.startswith(b"<ome"):
            raise BadDataError(
                "is OME-XML without pixels (e.g. a multi-file companion); open one of the .ome.tiff files it "
                "lists, or convert the set to one OME-TIFF with bfconvert",
                path,
            )
        raise BadDataError(
            "is not a TIFF file or OME-Zarr store (unrecognised file signature); convert it to OME-TIFF "
            "(e.g. with bfconvert) or OME-Zarr (bioformats2raw)",
            path,
        )
    with _quiet_tifffile() as messages:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as error:
            raise BadDataError(
                f"cannot parse TIFF ({_first_line(error)}); the file is truncated or corrupt, re-copy or re-export it",
                path,
            ) from None
        try:
            n_series = len(tif.series)
            if n_series == 0:
                raise BadDataError("TIFF holds no image; re-export it", path)
            if not 0 <= series < n_series:
                raise UsageError(f"series {series} does not exist (the file has {n_series}: 0..{n_series - 1})", path)
            image_series = tif.series[series]
            axes = image_series.axes.upper()
            _check_tiff_complete(image_series, size, path, messages)
            arrays, level_axes, shapes = [], [], []
            for level_index, level in enumerate(image_series.levels):
                level_axes_text = level.axes.upper()
                arrays.append(zarr.open(image_series.aszarr(level=level_index), mode="r"))
                level_axes.append(level_axes_text)
                shapes.append(_cyx_shape(level.shape, level_axes_text, path))
            fixed = _fixed_indices(axes, image_series.shape, z, t, path)
            is_ome = bool(tif.is_ome)
            names, pixel_size = None, None
            if is_ome:
                names, pixel_size = _ome_xml_pixels(tif.ome_metadata, series)
            n_channels = shapes[0][0]
            if not names or len(names) != n_channels:
                names = [f"channel_{i}" for i in range(n_channels)]
            slide = Slide(
                path=path,
                format="ome-tiff" if is_ome else "tiff",
                level_shapes=shapes,
                dtype=np.dtype(image_series.dtype),
                channel_names=names,
                pixel_size_um=pixel_size,
                series=series,
                _arrays=arrays,
                _axes=level_axes,
                _fixed=fixed,
                _closers=[tif.close],
            )
        except BaseException:
            tif.close()
            raise
    return slide


def _check_tiff_complete(image_series: Any, file_size: int, path: Path, messages: list[str]) -> None:
    """Refuse a TIFF whose tiles/strips point past the end of the file (a truncated copy)."""
    for level in image_series.levels:
        for page in level.pages:
            if page is None:
                raise BadDataError(
                    "a TIFF page of the image is missing; the file is truncated or corrupt, re-copy it", path
                )
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size and int((offsets + counts).max()) > file_size:
                raise BadDataError(
                    f"image data ends at byte {int((offsets + counts).max())} but the file has {file_size} bytes; "
                    "the file is truncated, re-copy or re-export it",
                    path,
                )
    if any("corrupted" in message for message in messages):  # tifffile skipped a broken IFD
        raise BadDataError(f"TIFF structure is damaged ({messages[0][:160]}); re-copy or re-export it", path)


def _cyx_shape(shape: Sequence[int], axes: str, path: Path) -> tuple[int, int, int]:
    sizes = dict(zip(axes, (int(s) for s in shape)))
    if "Y" not in sizes or "X" not in sizes:
        raise BadDataError(f"image axes {axes!r} have no Y and X; not a 2-D image, re-export it", path)
    if sizes.get("C", 1) > 1 and sizes.get("S", 1) > 1:
        raise BadDataError(
            f"image has both channels and samples per pixel (axes {axes!r}); export one channel per plane",
            path,
        )
    channels = sizes.get("S", 1) if "S" in sizes else sizes.get("C", 1)
    return channels, sizes["Y"], sizes["X"]


def _fixed_indices(axes: str, shape: Sequence[int], z: int, t: int, path: Path) -> dict[str, int]:
    sizes = dict(zip(axes, (int(s) for s in shape)))
    fixed: dict[str, int] = {}
    for axis, wanted in (("Z", z), ("T", t)):
        if axis in sizes:
            if not 0 <= wanted < sizes[axis]:
                raise UsageError(f"{axis.lower()}={wanted} is out of range (0..{sizes[axis] - 1})", path)
            fixed[axis] = wanted
        elif wanted:
            raise UsageError(f"image has no {axis} axis; {axis.lower()}={wanted} cannot be read", path)
    return fixed


def _xml_local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_xml_pixels(xml_text: str | None, series: int) -> tuple[list[str] | None, tuple[float, float] | None]:
    """Channel names and (y, x) pixel size in µm of image ``series`` in an OME-XML document."""
    if not xml_text:
        return None, None
    try:
        root = ElementTree.fromstring(xml_text.encode("utf-8") if isinstance(xml_text, str) else xml_text)
    except ElementTree.ParseError:
        return None, None
    images = [element for element in root if _xml_local(element.tag) == "Image"]
    if not 0 <= series < len(images):
        return None, None
    pixels = next((e for e in images[series] if _xml_local(e.tag) == "Pixels"), None)
    if pixels is None:
        return None, None
    names: list[str] = []
    for channel in (e for e in pixels if _xml_local(e.tag) == "Channel"):
        samples = int(channel.get("SamplesPerPixel", "1") or 1)
        name = channel.get("Name")
        if samples > 1:
            base = name or "channel"
            names.extend(f"{base}_{i}" for i in range(samples))
        else:
            names.append(name if name else f"channel_{len(names)}")
    pixel_size = None
    size_x = _positive_float(pixels.get("PhysicalSizeX"))
    size_y = _positive_float(pixels.get("PhysicalSizeY"))
    if size_x is not None or size_y is not None:
        size_x = size_x if size_x is not None else size_y
        size_y = size_y if size_y is not None else size_x
        um_x = length_to_um(size_x, pixels.get("PhysicalSizeXUnit", "µm"))
        um_y = length_to_um(size_y, pixels.get("PhysicalSizeYUnit", "µm"))
        if um_x and um_y:
            pixel_size = (um_y, um_x)
    return (names or None), pixel_size


def _positive_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


# -- OME-Zarr ----------------------------------------------------------------------------


def _open_zarr(path: Path, series: int, z: int, t: int) -> Slide:
    import warnings

    with warnings.catch_warnings():
        # zarr warns about harmless quirks of stores written by other tools (e.g. "filters": [])
        warnings.simplefilter("ignore")
        return _open_zarr_quietly(path, series, z, t)


def _open_zarr_quietly(path: Path, series: int, z: int, t: int) -> Slide:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        attributes = dict(root.attrs)
    except Exception as error:
        raise BadDataError(f"cannot open Zarr store ({_first_line(error)}); re-copy or re-export it", path) from None
    ome = attributes.get("ome", attributes)
    group, ome_xml = root, None
    if "bioformats2raw.layout" in ome or "bioformats2raw.layout" in attributes:
        names = bioformats2raw_series(root)
        if not 0 <= series < len(names):
            raise UsageError(f"series {series} does not exist (the store has {len(names)})", path)
        try:
            group = root[names[series]]
        except Exception as error:
            raise BadDataError(f"series {names[series]!r} cannot be opened ({_first_line(error)})", path) from None
        attributes = dict(group.attrs)
        ome = attributes.get("ome", attributes)
        for candidate in (path / "OME" / "METADATA.ome.xml", path.parent / "METADATA.ome.xml"):
            if candidate.is_file():
                ome_xml = candidate.read_text(encoding="utf-8", errors="replace")
                break
    elif series != 0:
        raise UsageError(f"series {series} does not exist (the store holds one image)", path)
    multiscales = ome.get("multiscales")
    if not multiscales:
        if "plate" in ome or "well" in ome:
            raise BadDataError("is an OME-Zarr HCS plate/well, not an image; pass one field's image group", path)
        raise BadDataError("Zarr store has no OME-NGFF 'multiscales' metadata; write it with ome-zarr-py", path)
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise BadDataError("OME-NGFF multiscales lists no datasets; re-export the image", path)
    arrays = []
    for dataset in datasets:
        try:
            arrays.append(group[str(dataset["path"])])
        except Exception as error:
            raise BadDataError(
                f"pyramid level {dataset.get('path')!r} is missing ({_first_line(error)}); the store is incomplete",
                path,
            ) from None
    axes, units = ngff_axes(multiscale, arrays[0].ndim, path)
    level_shapes = [_cyx_shape(array.shape, axes, path) for array in arrays]
    fixed = _fixed_indices(axes, arrays[0].shape, z, t, path)
    scale = ngff_level0_scale(multiscale, datasets[0], len(axes))
    pixel_size = None
    if scale is not None:
        um_y = length_to_um(scale[axes.index("Y")], units.get("Y"))
        um_x = length_to_um(scale[axes.index("X")], units.get("X"))
        if um_y and um_x and um_y > 0 and um_x > 0:
            pixel_size = (um_y, um_x)
    n_channels = level_shapes[0][0]
    names = omero_names(ome.get("omero") or attributes.get("omero"), n_channels)
    if names is None and ome_xml is not None:
        xml_names, xml_pixel_size = _ome_xml_pixels(ome_xml, series)
        names = xml_names if xml_names and len(xml_names) == n_channels else None
        pixel_size = pixel_size or xml_pixel_size
    return Slide(
        path=path,
        format="ome-zarr",
        level_shapes=level_shapes,
        dtype=np.dtype(arrays[0].dtype),
        channel_names=names or [f"channel_{i}" for i in range(n_channels)],
        pixel_size_um=pixel_size,
        series=series,
        _arrays=arrays,
        _axes=[axes] * len(arrays),
        _fixed=fixed,
    )


def _percentile_source(slide: Slide, min_pixels: int) -> int:
    """Smallest pyramid level that still has at least ``min_pixels`` per channel (or level 0)."""
    for level in range(slide.n_levels - 1, -1, -1):
        _, size_y, size_x = slide.level_shapes[level]
        if size_y * size_x >= min_pixels:
            return level
    return 0


def channel_percentiles(
    slide: Slide,
    channels: Sequence[int],
    low: float = 1.0,
    high: float = 99.8,
    min_pixels: int = 1_000_000,
    max_pixels: int = 16_000_000,
) -> np.ndarray:
    """Whole-slide intensity percentiles per channel, so that every tile is normalised alike.

    Computed from the smallest pyramid level with at least ``min_pixels`` pixels (level 0
    for small images). When that level is still larger than ``max_pixels`` (a huge slide
    with no pyramid), a regular grid of 512 x 512 windows spread over it is used instead
    so memory stays bounded.

    Returns
    -------
    ndarray, shape (c, 2), float32
        ``[low_value, high_value]`` per requested channel; NaN is ignored.
    """
    channel_list = list(channels)
    level = _percentile_source(slide, min_pixels)
    _, size_y, size_x = slide.level_shapes[level]
    if size_y * size_x <= max_pixels:
        data = slide.read_level(level, channels=channel_list).reshape(len(channel_list), -1)
    else:
        window = 512
        n_side = max(1, int(math.sqrt(max_pixels / window**2)))
        starts_y = np.linspace(0, max(0, size_y - window), n_side).astype(int)
        starts_x = np.linspace(0, max(0, size_x - window), n_side).astype(int)
        pieces = [
            slide.read_region(int(y), int(x), window, window, level=level, channels=channel_list).reshape(
                len(channel_list), -1
            )
            for y in starts_y
            for x in starts_x
        ]
        data = np.concatenate(pieces, axis=1)
    data = data.astype(np.float32, copy=False)
    result = np.nanpercentile(data, [low, high], axis=1).T if data.size else np.zeros((len(channel_list), 2))
    return np.asarray(result, dtype=np.float32)


def tissue_overview(slide: Slide, channels: Sequence[int], percentiles: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The nuclear composite of the slide's tissue-detection level and its downsampling factors.

    Returns
    -------
    low : ndarray of float32, shape (y, x)
        Mean of the normalised nuclear channels at `nuclei_app.core.tissue.tissue_level`.
    factors : tuple of float
        Level-0 pixels per ``low`` pixel, (y, x).
    """
    level = tissue_level(slide.level_shapes)
    low = normalise_intensities(slide.read_level(level, channels), percentiles).mean(axis=0)
    return low, slide.downsample_factor(level)


#: Side (px) of the windows the nucleus diameter is measured on. Granulometry needs several whole
#: nuclei of the largest plausible size in view: on a 300 px tile window of a slide whose nuclei
#: are 35 px wide the estimate collapsed to its 4 px floor, and the model was run at 9x the scale.
DIAMETER_WINDOW_PX = 1024


def measure_nucleus_diameter(slide: Slide, channels: Sequence[int], percentiles: np.ndarray,
                             windows: Sequence[tuple[int, int, int, int]],
                             pixel_size_um: tuple[float, float] | None = None, max_windows: int = 3) -> float | None:
    """The slide's typical nucleus diameter (px): the median estimate over a few tissue windows.

    The one rule training (`nuclei_app.train.data`) and segmentation (`nuclei_app.segment`)
    share, so a slide is brought to the model's scale exactly as its training images were.

    Parameters
    ----------
    slide : Slide
    channels : sequence of int
        The nuclear channels.
    percentiles : ndarray, shape (C, 2)
        Whole-slide normalisation (`channel_percentiles`).
    windows : sequence of (y0, x0, y1, x1)
        Level-0 windows on tissue, in any order; up to ``max_windows`` spread over the list are
        used, each grown about its centre to `DIAMETER_WINDOW_PX` (clipped to the slide; a slide
        smaller than that is measured whole).
    pixel_size_um : (float, float), optional
        Pixel size when known from elsewhere (a BIDS sidecar); default the slide's own.

    Returns
    -------
    float or None
        Diameter in pixels, rounded to 0.01; None without windows.
    """
    if not windows:
        return None
    _, height, width = slide.shape
    picks = sorted({int(round(i)) for i in np.linspace(0, len(windows) - 1, min(max_windows, len(windows)))})
    identity = np.tile(np.asarray([[0.0, 1.0]], dtype=np.float32), (len(channels), 1))
    estimates = []
    for index in picks:
        y0, x0, y1, x1 = windows[index]
        side_y, side_x = min(height, max(DIAMETER_WINDOW_PX, y1 - y0)), min(width, max(DIAMETER_WINDOW_PX, x1 - x0))
        top = int(np.clip((y0 + y1) // 2 - side_y // 2, 0, height - side_y))
        left = int(np.clip((x0 + x1) // 2 - side_x // 2, 0, width - side_x))
        region = normalise_intensities(slide.read_region(top, left, side_y, side_x, channels=channels), percentiles)
        estimates.append(estimate_nucleus_diameter(nuclear_composite(region, identity),
                                                   pixel_size_um or slide.pixel_size_um))
    return round(float(np.median(estimates)), 2)
