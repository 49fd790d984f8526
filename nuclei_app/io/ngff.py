"""OME-NGFF metadata: reading multiscales/axes/omero, the format version we write."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from nuclei_app.errors import BadDataError


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

