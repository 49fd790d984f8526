"""OME-NGFF metadata: the one place that parses multiscales/axes/omero and names the version we write.

Readers (slides, label images, label sources) and writers (`nuclei_app.io.ome_zarr`) all go
through here, so a spec detail (``ome`` nesting in 0.5, implicit axes in 0.1/0.2, the
scale of level 0) is handled once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence
from nuclei_app.errors import BadDataError, UsageError


#: NGFF version of every store the app writes. 0.4 (Zarr v2) is what today's viewers read
#: (napari-ome-zarr, QuPath, Fiji/MoBIE, vizarr, OMERO); 0.5 (Zarr v3) is still arriving.
NGFF_VERSION = "0.4"
#: Zarr format of each NGFF version we can write.
ZARR_FORMATS = {"0.4": 2, "0.5": 3}


def ngff_format(version: str = NGFF_VERSION) -> tuple[Any, int]:
    """The ome-zarr-py format object and Zarr format of NGFF ``version`` ("0.4" or "0.5")."""
    from ome_zarr.format import FormatV04, FormatV05

    if version not in ZARR_FORMATS:
        raise UsageError(f"NGFF version {version!r} is not supported; use one of {', '.join(ZARR_FORMATS)}")
    return {"0.4": FormatV04, "0.5": FormatV05}[version](), ZARR_FORMATS[version]


def is_zarr_store(path: Path) -> bool:
    """Whether ``path`` is a folder holding Zarr metadata (v2 ``.zgroup``/``.zattrs``/``.zarray`` or v3 ``zarr.json``)."""
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs", ".zarray"))


def ome_attributes(group: Any) -> dict[str, Any]:
    """NGFF attributes of a zarr group: at the top (Zarr v2, NGFF <= 0.4) or under ``ome`` (NGFF 0.5)."""
    attributes = dict(group.attrs)
    return dict(attributes.get("ome", attributes))


def label_array_level0(group: Any, path: Path) -> tuple[Any, str]:
    """Level 0 of an NGFF label image group and its axes, lower case (e.g. ``"yx"``, ``"tczyx"``).

    Raises
    ------
    BadDataError
        No ``multiscales`` metadata, or axes that do not match the array.
    """
    multiscales = ome_attributes(group).get("multiscales")
    if not multiscales:
        raise BadDataError("this zarr group has no 'multiscales' metadata; point at an NGFF label image", path)
    array = group[multiscales[0]["datasets"][0]["path"]]
    axes, _ = ngff_axes(multiscales[0], array.ndim, path)
    return array, axes.lower()


def bioformats2raw_series(root: Any) -> list[str]:
    try:
        listed = root["OME"].attrs.get("series")
        if listed:
            return [str(name) for name in listed]
    except Exception:  # layout 1 has no OME group: series are the numbered subgroups
        pass
    return sorted((name for name in root.group_keys() if name.isdigit()), key=int)


def ngff_axes(multiscale: dict, ndim: int, path: Path) -> tuple[str, dict[str, str]]:
    """Axes of a multiscale as one letter each (T, C, Z, Y, X, or '?') and their units."""
    raw_axes = multiscale.get("axes")
    if raw_axes is None:  # NGFF 0.1/0.2: implicit t, c, z, y, x, trailing axes when fewer
        return "TCZYX"[-ndim:], {}
    letters, units = [], {}
    for axis in raw_axes:
        if isinstance(axis, str):
            name, kind, unit = axis, None, None
        else:
            name, kind, unit = str(axis.get("name", "")), axis.get("type"), axis.get("unit")
        name = name.lower()
        if name in ("x", "y", "z", "t", "c"):
            letter = name.upper()
        elif kind == "channel":
            letter = "C"
        elif kind == "time":
            letter = "T"
        else:
            letter = "?"
        if unit:
            units[letter] = str(unit)
        letters.append(letter)
    text = "".join(letters)
    if len(text) != ndim:
        raise BadDataError(f"NGFF axes {text!r} do not match the array's {ndim} dimensions; re-export it", path)
    return text, units


def ngff_level0_scale(multiscale: dict, dataset: dict, ndim: int) -> list[float] | None:
    scale = None
    for transform in dataset.get("coordinateTransformations") or []:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = [float(v) for v in transform["scale"]]
    for transform in multiscale.get("coordinateTransformations") or []:
        if transform.get("type") == "scale" and "scale" in transform and scale is not None:
            scale = [a * float(b) for a, b in zip(scale, transform["scale"])]
    return scale if scale is not None and len(scale) == ndim else None


def omero_names(omero: Any, n_channels: int) -> list[str] | None:
    if not isinstance(omero, dict):
        return None
    channels = omero.get("channels") or []
    if len(channels) != n_channels:
        return None
    names = []
    for index, channel in enumerate(channels):
        label = channel.get("label") if isinstance(channel, dict) else None
        names.append(str(label) if label not in (None, "") else f"channel_{index}")
    return names


FLAT_LABEL_NAME = "nuclei"


def layer_label_name(layer: int) -> str:
    """Name of overlap layer ``layer`` under ``labels/``: ``nuclei_layer-<k>``."""
    return f"{FLAT_LABEL_NAME}_layer-{int(layer)}"


#: Display colours given to channels in order (``omero.channels[].color``).
CHANNEL_COLOURS = ("0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF", "FF8000")


def omero_metadata(
    channel_names: Sequence[str],
    value_ranges: Sequence[tuple[float, float]],
    windows: Sequence[tuple[float, float]],
) -> dict[str, Any]:
    """``omero`` rendering metadata: label, colour, value range and display window per channel.

    Parameters
    ----------
    channel_names : sequence of str
    value_ranges : sequence of (float, float)
        (min, max) each channel can take (``window.min``/``window.max``).
    windows : sequence of (float, float)
        (start, end) contrast window a viewer should show first.
    """
    channels = []
    for index, (name, (low, high), (start, end)) in enumerate(zip(channel_names, value_ranges, windows)):
        channels.append(
            {
                "label": str(name),
                "color": CHANNEL_COLOURS[index % len(CHANNEL_COLOURS)],
                "active": True,
                "window": {"min": float(low), "max": float(high), "start": float(start), "end": float(end)},
            }
        )
    return {"channels": channels}
