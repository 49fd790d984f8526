"""Check a BIDS microscopy dataset before any work is done on it.

`validate_dataset` walks the dataset and reports every problem it finds, one per file and
rule, each naming the file and how to fix it. Rules (``rule`` field of a problem):

=========================  ==========================================================
``dataset-description``    ``dataset_description.json`` missing or not a JSON object
``samples-tsv``            ``samples.tsv`` missing or unreadable
``filename``               name does not follow ``sub-<label>[_ses-<label>]_sample-<label>``
                           ``[_acq-][_stain-][_run-][_chunk-]_<suffix><ext>`` (entity
                           order, label characters, folder it sits in)
``suffix``                 suffix is not a BIDS microscopy suffix
``extension``              extension is not ``.ome.tif``, ``.ome.btf`` or ``.ome.zarr/``
``bigtiff-extension``      ``.ome.tif`` that is BigTIFF (must be ``.ome.btf``) or the reverse
``sample-not-listed``      the slide's sample is not a row of ``samples.tsv``
``sidecar-json``           a sidecar that applies to the slide is not valid JSON
``pixel-size-missing``     no ``PixelSize``/``PixelSizeUnits`` after sidecar inheritance
``pixel-size-mismatch``    sidecar ``PixelSize`` disagrees with the OME metadata
``unreadable-image``       image cannot be opened or read (truncated, corrupt, empty)
``no-nuclear-channel``     no channel is named like a nuclear stain
``outside-dataset``        a slide is a symlink resolving outside the dataset
=========================  ==========================================================
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from nuclei_app import __version__
from nuclei_app.bids.discover import ENTITY_ORDER, IMAGE_EXTENSIONS, MICROSCOPY_SUFFIXES, check_bids_dir, parse_loose_name, split_extension, channel_names_with_staining, check_inside, image_candidates, inherited_metadata, parse_bids_name, read_tsv
from nuclei_app.errors import BadDataError, NucleiAppError
from nuclei_app.io.slides import open_slide
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.bids.discover import SlideRecord
from nuclei_app.atomic import atomic_write_text
from nuclei_app.schemas import validate_instance




RULES: tuple[str, ...] = (
    "dataset-description",
    "samples-tsv",
    "filename",
    "suffix",
    "extension",
    "bigtiff-extension",
    "sample-not-listed",
    "sidecar-json",
    "pixel-size-missing",
    "pixel-size-mismatch",
    "unreadable-image",
    "no-nuclear-channel",
    "outside-dataset",
)


#: Relative disagreement between sidecar and OME pixel sizes still accepted (rounding in
#: instrument software writes e.g. 0.6499999761581421 for 0.65).
PIXEL_SIZE_TOLERANCE = 0.02


_NAME_TEMPLATE = (
    "sub-<label>[_ses-<label>]_sample-<label>[_acq-<label>][_stain-<label>][_run-<index>][_chunk-<index>]"
    "_<suffix><ext>"
)


@dataclass
class Problem:
    """One problem: which file, which rule, what is wrong and how to fix it."""

    path: str
    rule: str
    message: str
    fix: str

    def line(self) -> str:
        """The one-line form printed by ``nuclei-app validate``."""
        return f"{self.path}: [{self.rule}] {self.message}; fix: {self.fix}"


@dataclass
class ValidationReport:
    """Result of `validate_dataset`.

    Attributes
    ----------
    bids_dir : Path
    problems : list of Problem
        Paths are relative to ``bids_dir`` (POSIX separators).
    files_checked : int
        Dataset-level files plus every entry of every ``micr`` folder.
    """

    bids_dir: Path
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0

    @property
    def valid(self) -> bool:
        return not self.problems

    def add(self, path: Path | str, rule: str, message: str, fix: str) -> None:
        """Record a problem, at most one per file and rule."""
        relative = self._relative(path)
        if any(p.path == relative and p.rule == rule for p in self.problems):
            return
        self.problems.append(Problem(relative, rule, message, fix))

    def _relative(self, path: Path | str) -> str:
        path = Path(path)
        try:
            return path.relative_to(self.bids_dir).as_posix()
        except ValueError:
            return str(path)

    def lines(self) -> list[str]:
        return [problem.line() for problem in self.problems]

    def summary(self) -> str:
        if self.valid:
            return f"{self.bids_dir}: valid BIDS microscopy dataset ({self.files_checked} files checked)"
        files = len({problem.path for problem in self.problems})
        return (
            f"{self.bids_dir}: {len(self.problems)} problem(s) in {files} file(s) "
            f"({self.files_checked} files checked)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; validates against ``validation_report.schema.json``."""
        return {
            "tool": "nuclei-app",
            "version": __version__,
            "bids_dir": str(self.bids_dir),
            "valid": self.valid,
            "files_checked": self.files_checked,
            "problem_count": len(self.problems),
            "problems": [
                {"path": p.path, "rule": p.rule, "message": p.message, "fix": p.fix} for p in self.problems
            ],
        }

    def to_json(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write_json(self, path: str | Path) -> Path:
        """Validate against the schema and write atomically."""

        validate_instance(self.to_dict(), "validation_report")
        return atomic_write_text(path, self.to_json())


# --------------------------------------------------------------------------------------
# Name checks
# --------------------------------------------------------------------------------------


def _explain_bad_name(name: str) -> tuple[str, str]:
    """Why ``name`` is not a BIDS microscopy name, and a suggested fix."""
    stem, extension = split_extension(name)
    parts = stem.split("_")
    pairs = []
    for part in parts[:-1]:
        key, dash, value = part.partition("-")
        if not dash:
            return f"'{part}' is not an entity (key-label)", f"rename to {_NAME_TEMPLATE}"
        pairs.append((key, value))
    keys = [key for key, _ in pairs]
    unknown = [key for key in keys if key not in ENTITY_ORDER]
    if unknown:
        return (
            f"entity '{unknown[0]}' is not a BIDS microscopy entity",
            f"rename to {_NAME_TEMPLATE} (entities: {', '.join(ENTITY_ORDER)})",
        )
    for key, value in pairs:
        pattern = r"[0-9]+" if key in ("run", "chunk") else r"[a-zA-Z0-9]+"
        if not re.fullmatch(pattern, value):
            kind = "an index (digits only)" if key in ("run", "chunk") else "a label (letters and digits only)"
            cleaned = re.sub(r"[^a-zA-Z0-9]", "", value) or "1"
            return f"'{key}-{value}' must be {kind}", f"rename with {key}-{cleaned}"
    if "sub" not in keys or "sample" not in keys:
        missing = "sub" if "sub" not in keys else "sample"
        return f"required entity '{missing}-<label>' is missing", f"rename to {_NAME_TEMPLATE}"
    ordered = sorted(pairs, key=lambda pair: ENTITY_ORDER.index(pair[0]))
    if len(set(keys)) != len(keys):
        return "an entity appears twice", f"rename to {_NAME_TEMPLATE}"
    if ordered != pairs:
        fixed = "_".join(f"{k}-{v}" for k, v in ordered) + f"_{parts[-1]}{extension}"
        return "entities are out of order", f"rename to {fixed}"
    if len(parts) < 2 or not re.fullmatch(r"[a-zA-Z0-9]+", parts[-1]):
        return "suffix is missing", f"end the name with a suffix such as _FLUO{extension or '.ome.tif'}"
    return "name does not follow the BIDS microscopy pattern", f"rename to {_NAME_TEMPLATE}"


def _folder_problem(entry: Path, bids_dir: Path, parsed: dict[str, str]) -> str | None:
    relative = entry.parent.relative_to(bids_dir).parts  # ("sub-01", ["ses-1",] "micr")
    subject_folder = relative[0][len("sub-") :]
    if parsed["sub"] != subject_folder:
        return f"subject sub-{parsed['sub']} does not match its folder sub-{subject_folder}"
    session_folder = relative[1][len("ses-") :] if len(relative) == 3 else None
    if parsed.get("ses") != session_folder:
        if session_folder is None:
            return f"ses-{parsed['ses']} in the name but the file is not in a ses-{parsed['ses']} folder"
        return f"file sits in ses-{session_folder} but its name says {('ses-' + parsed['ses']) if parsed.get('ses') else 'no session'}"
    return None


def _tiff_kind(path: Path) -> str | None:
    """'classic', 'big' or None (not a TIFF) from the header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if head in (b"II*\x00", b"MM\x00*"):
        return "classic"
    if head in (b"II+\x00", b"MM\x00+"):
        return "big"
    return None


# --------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------


def _check_dataset_files(report: ValidationReport, bids_dir: Path) -> list[dict[str, str]] | None:
    description = bids_dir / "dataset_description.json"
    report.files_checked += 1
    if not description.is_file():
        report.add(
            description,
            "dataset-description",
            "dataset_description.json is missing",
            'create it with at least {"Name": "...", "BIDSVersion": "1.9.0"}',
        )
    else:
        try:
            content = json.loads(description.read_text(encoding="utf-8"))
            if not isinstance(content, dict) or "Name" not in content or "BIDSVersion" not in content:
                raise ValueError("needs a JSON object with Name and BIDSVersion")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            report.add(
                description,
                "dataset-description",
                f"dataset_description.json is not usable ({str(error).splitlines()[0][:120]})",
                'make it a JSON object with "Name" and "BIDSVersion"',
            )
    samples_tsv = bids_dir / "samples.tsv"
    report.files_checked += 1
    if not samples_tsv.is_file():
        report.add(
            samples_tsv,
            "samples-tsv",
            "samples.tsv is missing (required for microscopy)",
            "create samples.tsv with columns sample_id, participant_id, sample_type",
        )
        return None
    try:
        rows = read_tsv(samples_tsv)
    except BadDataError as error:
        report.add(samples_tsv, "samples-tsv", error.message, "save samples.tsv as UTF-8 tab-separated text")
        return None
    if rows and not {"sample_id", "participant_id"} <= set(rows[0]):
        report.add(
            samples_tsv,
            "samples-tsv",
            "samples.tsv lacks the sample_id or participant_id column",
            "add columns sample_id and participant_id (e.g. sample-A, sub-01)",
        )
        return None
    return rows


def _check_image(report: ValidationReport, entry: Path, bids_dir: Path, parsed: dict[str, str],
                 samples: list[dict[str, str]] | None) -> None:

    try:
        check_inside(entry, bids_dir)
    except BadDataError as error:
        report.add(entry, "outside-dataset", error.message.split(";")[0],
                   "copy the image into the dataset instead of linking it")
        return
    extension = parsed["extension"]
    if extension in (".ome.tif", ".ome.btf") and entry.is_file():
        kind = _tiff_kind(entry)
        if kind == "big" and extension == ".ome.tif":
            report.add(entry, "bigtiff-extension", "file is BigTIFF but named .ome.tif",
                       f"rename to {entry.name[: -len('.ome.tif')]}.ome.btf")
        elif kind == "classic" and extension == ".ome.btf":
            report.add(entry, "bigtiff-extension", "file is classic TIFF but named .ome.btf",
                       f"rename to {entry.name[: -len('.ome.btf')]}.ome.tif")
    if samples is not None:
        listed = any(
            row.get("sample_id") == f"sample-{parsed['sample']}" and row.get("participant_id") == f"sub-{parsed['sub']}"
            for row in samples
        )
        if not listed:
            report.add(entry, "sample-not-listed",
                       f"sample-{parsed['sample']} of sub-{parsed['sub']} is not listed in samples.tsv",
                       f"add a row 'sample-{parsed['sample']}\tsub-{parsed['sub']}\t<sample_type>' to samples.tsv")
    entities = {key: parsed[key] for key in ENTITY_ORDER if key in parsed}
    try:
        metadata, _ = inherited_metadata(entry, bids_dir, entities, parsed["suffix"])
    except BadDataError as error:
        report.add(error.path or entry, "sidecar-json", error.message.split(";")[0], "fix the JSON syntax")
        metadata = None
    sidecar_pixel_size = None
    if metadata is not None:

        record = SlideRecord(entry, bids_dir, entities, parsed["suffix"], extension, metadata)
        sidecar_pixel_size = record.pixel_size_um
        if sidecar_pixel_size is None:
            have = [key for key in ("PixelSize", "PixelSizeUnits") if key in metadata]
            what = "PixelSize and PixelSizeUnits are missing" if not have else (
                "PixelSize/PixelSizeUnits are malformed" if len(have) == 2 else f"only {have[0]} is given")
            report.add(entry, "pixel-size-missing", f"{what} after sidecar inheritance",
                       f'add "PixelSize": [x, y] and "PixelSizeUnits": "um" to {entry.name.split(".")[0]}.json '
                       "or a sidecar it inherits")
    try:
        with open_slide(entry) as slide:
            slide.read_level(slide.smallest_level())  # decodes the cheapest level: catches broken chunks
            slide.read_region(0, 0, 1, 1, level=0)
            ome_pixel_size = slide.pixel_size_um
            names = channel_names_with_staining(slide.channel_names, metadata or {})
    except NucleiAppError as error:
        report.add(entry, "unreadable-image", error.message.split(";")[0],
                   "re-copy or re-export the image (OME-TIFF with bfconvert, OME-Zarr with bioformats2raw)")
        return
    if sidecar_pixel_size is not None and ome_pixel_size is not None:
        disagree = any(abs(a - b) > PIXEL_SIZE_TOLERANCE * max(a, b) for a, b in zip(sidecar_pixel_size, ome_pixel_size))
        if disagree:
            report.add(entry, "pixel-size-mismatch",
                       f"sidecar PixelSize gives (y, x) = ({sidecar_pixel_size[0]:g}, {sidecar_pixel_size[1]:g}) um "
                       f"but the image metadata says ({ome_pixel_size[0]:g}, {ome_pixel_size[1]:g}) um",
                       "correct the sidecar PixelSize/PixelSizeUnits (or the OME metadata) so they agree")
    try:
        select_nuclear_channels(names, None, path=entry)
    except NucleiAppError:
        report.add(entry, "no-nuclear-channel",
                   f"no channel is named like a nuclear stain (channels: {', '.join(names)})",
                   "name the DAPI/Hoechst/Histone channel in the OME metadata or list the stains in "
                   "SampleStaining, or pass --nuclear-channels when running")


def validate_dataset(bids_dir: str | Path) -> ValidationReport:
    """Check a BIDS microscopy dataset; every problem found, one per file and rule.

    Parameters
    ----------
    bids_dir : str or Path
        Dataset root.

    Returns
    -------
    ValidationReport
        ``.valid`` is True when no problem was found.

    Raises
    ------
    MissingInputError
        ``bids_dir`` does not exist or is not a folder.
    """
    root = check_bids_dir(bids_dir)
    report = ValidationReport(bids_dir=root)
    samples = _check_dataset_files(report, root)
    for entry in image_candidates(root):
        report.files_checked += 1
        parsed = parse_bids_name(entry.name)
        if parsed is None:
            message, fix = _explain_bad_name(entry.name)
            report.add(entry, "filename", message, fix)
            loose = parse_loose_name(entry.name)
            suffix, extension = (loose[1], loose[2]) if loose else ("", split_extension(entry.name)[1])
        else:
            folder_message = _folder_problem(entry, root, parsed)
            if folder_message:
                report.add(entry, "filename", folder_message, "move the file to its own sub-/ses- folder or rename it")
            suffix, extension = parsed["suffix"], parsed["extension"]
        suffix_ok = suffix in MICROSCOPY_SUFFIXES
        if suffix and not suffix_ok:
            report.add(entry, "suffix", f"suffix '{suffix}' is not a BIDS microscopy suffix",
                       f"use one of {', '.join(MICROSCOPY_SUFFIXES[:2])} (or {', '.join(MICROSCOPY_SUFFIXES[2:])})")
        extension_ok = extension in IMAGE_EXTENSIONS and (entry.is_dir() == (extension == ".ome.zarr"))
        if not extension_ok:
            what = f"extension '{extension or '(none)'}'" + (" (a folder)" if entry.is_dir() else "")
            report.add(entry, "extension", f"{what} is not supported",
                       "convert to OME-TIFF (.ome.tif, or .ome.btf for BigTIFF) or OME-Zarr (.ome.zarr folder)")
        if parsed is not None and suffix_ok and extension_ok:
            _check_image(report, entry, root, parsed, samples)
    return report
