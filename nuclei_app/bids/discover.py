"""Find the slides of a BIDS microscopy dataset, with their entities and inherited sidecar metadata.

Slides live at
``sub-<label>/[ses-<label>/]micr/sub-<label>[_ses-<label>]_sample-<label>[_acq-<label>]``
``[_stain-<label>][_run-<index>][_chunk-<index>]_<suffix><extension>``.
Their metadata is the merge of every JSON sidecar that applies to them under the BIDS
inheritance principle: sidecars at the dataset root, subject, session and ``micr``
levels whose entities are a subset of the slide's and whose suffix matches; deeper and
more specific files override shallower ones.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from nuclei_app.errors import BadDataError, MissingInputError, UsageError
from nuclei_app.io.slides import length_to_um




#: Entities of BIDS microscopy file names, in the order they must appear.
ENTITY_ORDER: tuple[str, ...] = ("sub", "ses", "sample", "acq", "stain", "run", "chunk")


#: BIDS microscopy suffixes. FLUO (fluorescence) and CONF (confocal) are the usual ones for
#: nuclear stains; 2PE/MPE (two-/multi-photon), SPIM (light sheet), SR (super resolution),
#: NLO (non-linear optical) are fluorescence too. BF, DF, PC, DIC (bright/dark field, phase
#: and differential interference contrast), TEM/SEM (electron), uCT, XPCT, PLI, CARS and
#: OCT are BIDS microscopy modalities that are accepted as files; they rarely carry a
#: nuclear stain, which `validate` then reports.
MICROSCOPY_SUFFIXES: tuple[str, ...] = (
    "FLUO",
    "CONF",
    "2PE",
    "MPE",
    "SPIM",
    "SR",
    "NLO",
    "BF",
    "DF",
    "PC",
    "DIC",
    "TEM",
    "SEM",
    "uCT",
    "XPCT",
    "PLI",
    "CARS",
    "OCT",
)


#: Image extensions the app reads (``.ome.zarr`` is a folder).
IMAGE_EXTENSIONS: tuple[str, ...] = (".ome.tif", ".ome.btf", ".ome.zarr")


_LABEL = r"[a-zA-Z0-9]+"


_INDEX = r"[0-9]+"


_BIDS_NAME = re.compile(
    rf"^sub-(?P<sub>{_LABEL})"
    rf"(?:_ses-(?P<ses>{_LABEL}))?"
    rf"_sample-(?P<sample>{_LABEL})"
    rf"(?:_acq-(?P<acq>{_LABEL}))?"
    rf"(?:_stain-(?P<stain>{_LABEL}))?"
    rf"(?:_run-(?P<run>{_INDEX}))?"
    rf"(?:_chunk-(?P<chunk>{_INDEX}))?"
    r"_(?P<suffix>[a-zA-Z0-9]+)"
    r"(?P<extension>\.[a-zA-Z0-9.]+)?$"
)


_PREFIXES = {"participant": "sub-", "session": "ses-", "sample": "sample-"}


def split_extension(name: str) -> tuple[str, str]:
    """Split ``name`` at its first dot: ('sub-01_sample-A_FLUO', '.ome.tif')."""
    stem, dot, rest = name.partition(".")
    return stem, (dot + rest) if dot else ""


def parse_bids_name(name: str) -> dict[str, str] | None:
    """Entities, suffix and extension of a BIDS microscopy file name, or None if it does not match.

    Parameters
    ----------
    name : str
        A file or folder name (not a path), e.g. ``"sub-01_ses-1_sample-A_FLUO.ome.tif"``.

    Returns
    -------
    dict or None
        Keys among ``sub, ses, sample, acq, stain, run, chunk`` (present entities only),
        plus ``suffix`` and ``extension`` (``""`` when the name has none).
    """
    match = _BIDS_NAME.match(name)
    if match is None:
        return None
    parsed = {key: value for key, value in match.groupdict().items() if value is not None}
    parsed.setdefault("extension", "")
    return parsed


def parse_loose_name(name: str) -> tuple[dict[str, str], str, str] | None:
    """Entities (any subset, e.g. of an inherited sidecar ``sample-A_FLUO.json``), suffix, extension."""
    stem, extension = split_extension(name)
    parts = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, dash, value = part.partition("-")
        if not dash or not value:
            return None
        entities[key] = value
    return entities, parts[-1], extension


def normalise_label(label: str, kind: str) -> str:
    """Strip an optional ``sub-``/``ses-``/``sample-`` prefix and check the label is alphanumeric.

    Raises
    ------
    UsageError
        The label is empty, contains ``..`` or a path separator, or other non-alphanumerics.
    """
    text = str(label).strip()
    prefix = _PREFIXES[kind]
    if text.startswith(prefix):
        text = text[len(prefix) :]
    option = f"--{kind}-label"
    if ".." in text or "/" in text or "\\" in text or "\x00" in text:
        raise UsageError(f"{option} {label!r} contains '..' or a path separator; give a plain label such as 01")
    if not re.fullmatch(_LABEL, text):
        raise UsageError(f"{option} {label!r} is not a BIDS label (letters and digits only), e.g. {prefix}01")
    return text


def _normalise_labels(labels: str | Sequence[str] | None, kind: str) -> set[str] | None:
    if labels is None:
        return None
    items = [labels] if isinstance(labels, str) else list(labels)
    # "01 02" and "01,02" are both accepted (shell and config files write lists differently)
    split = [piece for item in items for piece in re.split(r"[,\s]+", str(item)) if piece]
    if not split:
        raise UsageError(f"--{kind}-label is empty; give a label such as {_PREFIXES[kind]}01 or leave the option out")
    return {normalise_label(item, kind) for item in split}


@dataclass
class SlideRecord:
    """One slide of a BIDS dataset.

    Attributes
    ----------
    path : Path
        The image file or ``.ome.zarr`` folder.
    bids_dir : Path
        The dataset root.
    entities : dict
        ``{"sub": "01", "ses": "1", "sample": "A", ...}`` in BIDS order (present ones only).
    suffix, extension : str
        e.g. ``"FLUO"``, ``".ome.tif"``.
    metadata : dict
        Sidecar JSON merged by inheritance (``PixelSize``, ``PixelSizeUnits``,
        ``SampleStaining``...).
    sidecars : list of Path
        The sidecars merged into ``metadata``, shallowest first.
    """

    path: Path
    bids_dir: Path
    entities: dict[str, str]
    suffix: str
    extension: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sidecars: list[Path] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")

    @property
    def sample(self) -> str:
        return self.entities["sample"]

    @property
    def relative_dir(self) -> Path:
        """Folder of the slide relative to the dataset root, e.g. ``sub-01/ses-1/micr``."""
        return self.path.parent.relative_to(self.bids_dir)

    @property
    def pixel_size_um(self) -> tuple[float, float] | None:
        """(y, x) pixel size in micrometres from ``PixelSize`` ([x, y(, z)]) and ``PixelSizeUnits``.

        None when either key is missing or malformed.
        """

        size = self.metadata.get("PixelSize")
        unit = self.metadata.get("PixelSizeUnits")
        if not isinstance(size, (list, tuple)) or len(size) < 2 or not isinstance(unit, str):
            return None
        try:
            x_um = length_to_um(float(size[0]), unit)
            y_um = length_to_um(float(size[1]), unit)
        except (TypeError, ValueError):
            return None
        if x_um is None or y_um is None or x_um <= 0 or y_um <= 0:
            return None
        return y_um, x_um

    @property
    def name(self) -> str:
        return self.path.name


def _entity_prefix(entities: dict[str, str]) -> str:
    return "_".join(f"{key}-{entities[key]}" for key in ENTITY_ORDER if key in entities)


def bids_derivative_name(record: SlideRecord, desc: str, suffix: str, ext: str) -> str:
    """Derivative file name: the slide's entities plus ``desc-<desc>``, then suffix and extension.

    Example: ``bids_derivative_name(rec, "nuclei", "FLUO", ".ome.zarr")`` gives
    ``"sub-01_ses-1_sample-A_desc-nuclei_FLUO.ome.zarr"``.
    """
    if not re.fullmatch(_LABEL, desc):
        raise UsageError(f"desc label {desc!r} must be letters and digits only")
    extension = ext if not ext or ext.startswith(".") else f".{ext}"
    return f"{_entity_prefix(record.entities)}_desc-{desc}_{suffix}{extension}"


def _sidecar_applies(sidecar_name: str, entities: dict[str, str], suffix: str) -> bool:
    parsed = parse_loose_name(sidecar_name)
    if parsed is None:
        return False
    sidecar_entities, sidecar_suffix, extension = parsed
    if extension != ".json" or sidecar_suffix != suffix:
        return False
    return all(entities.get(key) == value for key, value in sidecar_entities.items())


def inherited_metadata(path: Path, bids_dir: Path, entities: dict[str, str], suffix: str) -> tuple[dict, list[Path]]:
    """Merge every sidecar JSON that applies to ``path`` (BIDS inheritance principle).

    Returns the merged dictionary and the sidecars used, shallowest first.

    Raises
    ------
    BadDataError
        A sidecar that applies is not valid JSON (or not a JSON object).
    """
    folders = [bids_dir]
    relative = path.parent.relative_to(bids_dir)
    for part in relative.parts:
        folders.append(folders[-1] / part)
    merged: dict[str, Any] = {}
    used: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        candidates = [
            entry
            for entry in folder.iterdir()
            if entry.is_file() and entry.name.endswith(".json") and _sidecar_applies(entry.name, entities, suffix)
        ]
        # within one folder the more specific sidecar (more entities) wins
        candidates.sort(key=lambda entry: (len(parse_loose_name(entry.name)[0]), entry.name))  # type: ignore[index]
        for sidecar in candidates:
            try:
                content = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise BadDataError(f"sidecar is not valid JSON ({error}); fix its syntax", sidecar) from None
            if not isinstance(content, dict):
                raise BadDataError("sidecar must hold a JSON object ({...}); fix its content", sidecar)
            merged.update(content)
            used.append(sidecar)
    return merged, used


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a BIDS TSV file (``samples.tsv``, ``participants.tsv``) as dictionaries."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle, delimiter="\t")]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BadDataError(f"cannot read TSV ({error}); save it as UTF-8 tab-separated text", path) from None


def check_inside(path: Path, bids_dir: Path) -> Path:
    """Resolve ``path`` (following symlinks) and refuse it when it leaves the dataset."""
    resolved = path.resolve()
    if not resolved.is_relative_to(bids_dir.resolve()):
        raise BadDataError(
            f"resolves to {resolved}, outside the dataset; copy the data into the dataset instead of linking it",
            path,
        )
    return resolved


def _micr_folders(bids_dir: Path) -> list[Path]:
    folders = []
    for subject in sorted(bids_dir.glob("sub-*")):
        if not subject.is_dir():
            continue
        folders.extend(sorted(p for p in subject.glob("micr") if p.is_dir()))
        folders.extend(sorted(p for p in subject.glob("ses-*/micr") if p.is_dir()))
    return folders


def image_candidates(bids_dir: Path) -> list[Path]:
    """Every entry of every ``micr`` folder except JSON sidecars and hidden/partial files."""
    entries = []
    for folder in _micr_folders(bids_dir):
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or ".partial-" in entry.name or entry.name.endswith(".json"):
                continue
            entries.append(entry)
    return entries


def check_bids_dir(bids_dir: str | Path) -> Path:
    path = Path(bids_dir)
    if not path.exists():
        raise MissingInputError("BIDS dataset folder does not exist; check the path", path)
    if not path.is_dir():
        raise MissingInputError("is a file, not a BIDS dataset folder; pass the dataset's root folder", path)
    return path


def discover(
    bids_dir: str | Path,
    participant_label: str | Sequence[str] | None = None,
    session_label: str | Sequence[str] | None = None,
    sample_label: str | Sequence[str] | None = None,
) -> list[SlideRecord]:
    """Slides of a BIDS microscopy dataset, optionally filtered, sorted by path.

    Only well-named files with a supported image extension (``.ome.tif``, ``.ome.btf``,
    ``.ome.zarr``) and a BIDS microscopy suffix are returned; `nuclei_app.validate`
    reports the rest. An empty list means the filters selected nothing.

    Parameters
    ----------
    bids_dir : str or Path
        Dataset root.
    participant_label, session_label, sample_label : str or sequence of str, optional
        Labels with or without their ``sub-``/``ses-``/``sample-`` prefix; a string may
        hold several labels separated by commas or spaces.

    Raises
    ------
    MissingInputError
        ``bids_dir`` does not exist or is not a folder.
    UsageError
        A label contains ``..``, a path separator or other non-alphanumerics.
    BadDataError
        A slide is a symlink resolving outside the dataset, or a sidecar is invalid JSON.
    """
    root = check_bids_dir(bids_dir)
    subjects = _normalise_labels(participant_label, "participant")
    sessions = _normalise_labels(session_label, "session")
    samples = _normalise_labels(sample_label, "sample")
    records = []
    for entry in image_candidates(root):
        parsed = parse_bids_name(entry.name)
        if parsed is None or parsed["extension"] not in IMAGE_EXTENSIONS:
            continue
        if parsed["suffix"] not in MICROSCOPY_SUFFIXES:
            continue
        entities = {key: parsed[key] for key in ENTITY_ORDER if key in parsed}
        if subjects is not None and entities["sub"] not in subjects:
            continue
        if sessions is not None and entities.get("ses") not in sessions:
            continue
        if samples is not None and entities["sample"] not in samples:
            continue
        check_inside(entry, root)
        metadata, sidecars = inherited_metadata(entry, root, entities, parsed["suffix"])
        records.append(
            SlideRecord(
                path=entry,
                bids_dir=root,
                entities=entities,
                suffix=parsed["suffix"],
                extension=parsed["extension"],
                metadata=metadata,
                sidecars=sidecars,
            )
        )
    return records


_GENERIC_CHANNEL = re.compile(r"^(channel[ _]?\d+|\d+)$", re.IGNORECASE)


def channel_names_with_staining(channel_names: Sequence[str], metadata: dict[str, Any]) -> list[str]:
    """Channel names from the image, or from the sidecar's ``SampleStaining`` when the image has none.

    When every image channel name is generic (``channel_0``, ``Channel 1``, ``0``...) and
    ``SampleStaining`` lists exactly one stain per channel, the stains name the channels.
    """
    names = [str(name) for name in channel_names]
    staining = metadata.get("SampleStaining")
    if isinstance(staining, str):
        staining = [staining]
    if (
        isinstance(staining, list)
        and len(staining) == len(names)
        and all(_GENERIC_CHANNEL.match(name) for name in names)
    ):
        return [str(stain) for stain in staining]
    return names
