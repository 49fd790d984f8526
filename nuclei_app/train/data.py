"""Training images, tile sampling, crops and batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
from scipy import ndimage
from nuclei_app.config import TrainingConfig
from nuclei_app.errors import BadDataError, MissingInputError
from nuclei_app.provenance import path_sha256
from nuclei_app.core.intensity import normalise_intensities
from nuclei_app.model.heads import integral_image
from nuclei_app.model.transform import rescale_image
from nuclei_app.seeding import generator
from nuclei_app.core.tiling import make_tile_grid
from nuclei_app.io.slides import measure_nucleus_diameter, tissue_overview
from nuclei_app.core.tissue import tissue_tiles
from nuclei_app.io.slides import channel_percentiles, open_slide
from nuclei_app.core.channels import select_nuclear_channels, stain_key
from nuclei_app.bids.discover import discover


MIN_NUCLEI_TO_TRAIN = 5


@dataclass
class TrainingImage:
    """One training image at canonical scale, with its pseudo-labels.

    image : float32 (C, H, W), normalised with whole-slide percentiles.
    labels : uint32 (H, W), current pseudo-labels of the consensus view (0 = background).
    confidence : float32 (n+1,), confidence of label id i at index i (index 0 unused).
    ignore : bool (H, W), ambiguous foreground that teaches neither object nor background.
    views : per head, (labels, confidence, ignore) as that head sees them.
    """

    name: str
    image: np.ndarray
    scale: float
    source: dict
    labels: np.ndarray = None  # type: ignore[assignment]
    confidence: np.ndarray = None  # type: ignore[assignment]
    ignore: np.ndarray = None  # type: ignore[assignment]
    views: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def sample_tissue_tiles(slide, channels: Sequence[int], percentiles: np.ndarray, tile: int, rng: np.random.Generator,
                 limit: int) -> list[tuple[int, int, int, int]]:
    """Up to ``limit`` tiles (y0, x0, h, w) of level 0 on tissue, drawn at random (seeded).

    Tissue is found exactly as segmentation finds it (`nuclei_app.core.tissue.tissue_tiles`), on a
    grid of non-overlapping tiles.
    """
    grid = make_tile_grid(slide.shape[1:], tile=tile, overlap=0)
    on_tissue = tissue_tiles(*tissue_overview(slide, channels, percentiles), grid)
    candidates = []
    for row, col in grid.positions():
        if on_tissue[row, col]:
            y0, x0, y1, x1 = grid.window(row, col)
            candidates.append((y0, x0, y1 - y0, x1 - x0))
    if len(candidates) > limit:
        chosen = rng.choice(len(candidates), size=limit, replace=False)
        candidates = [candidates[i] for i in sorted(chosen)]
    return candidates


def load_training_images(
    paths: Sequence[str | Path],
    config: TrainingConfig,
    nuclear_channels: str | Sequence[str] | None = None,
    whole_image_limit: int = 2048 * 2048,
) -> tuple[list[TrainingImage], list[str], list[dict]]:
    """Read every input (image files or BIDS folders) as canonical-scale training images.

    Small images are used whole; large slides contribute tiles sampled from tissue.
    Returns the images, the nuclear channel names (identical across inputs) and provenance.
    """

    files = expand_inputs(paths)
    rng = generator(config.seed, "training_tiles")
    per_slide_tiles = max(1, config.max_training_tiles // max(len(files), 1))
    images, provenance, channel_names = [], [], None
    for path, known_pixel_size in files:
        with open_slide(path) as slide:
            channels = select_nuclear_channels(slide.channel_names, nuclear_channels, path=path)
            names = [slide.channel_names[i] for i in channels]
            if channel_names is None:
                channel_names = names
            elif [stain_key(n) for n in names] != [stain_key(n) for n in channel_names]:
                raise BadDataError(
                    f"nuclear channels {names} differ from the first input's {channel_names}; "
                    "pass --nuclear-channels so every input offers the same stains",
                    path,
                )
            pixel_size = slide.pixel_size_um or known_pixel_size
            percentiles = channel_percentiles(slide, channels)
            _, height, width = slide.shape
            if height * width <= whole_image_limit:
                regions = [(0, 0, height, width)]
            else:
                regions = sample_tissue_tiles(slide, channels, percentiles, config.training_tile_size, rng, per_slide_tiles)
            raw_regions = [normalise_intensities(slide.read_region(*region, channels=channels), percentiles) for region in regions]
            provenance.append(
                {
                    "path": str(path),
                    "sha256": path_sha256(path),
                    "shape": list(slide.shape),
                    "channels": names,
                    "pixel_size_um": list(pixel_size) if pixel_size else None,
                    "regions": [list(r) for r in regions],
                }
            )
            # One scale per slide, measured as `segment` measures it, so all its tiles are resized alike.
            diameter = measure_nucleus_diameter(slide, channels, percentiles,
                                                [(y, x, y + h, x + w) for y, x, h, w in regions], pixel_size)
        scale = config.model_preset.canonical_diameter / max(diameter, 1.0)
        for index, region in enumerate(raw_regions):
            images.append(
                TrainingImage(
                    name=f"{Path(path).name}#{index}",
                    image=rescale_image(region, scale),
                    scale=scale,
                    source={"path": str(path), "shape": [height, width], "region": list(regions[index]),
                            "diameter_px": float(diameter),
                            "pixel_size_um": list(pixel_size) if pixel_size else None},
                )
            )
    return images, channel_names or [], provenance


def expand_inputs(paths: Sequence[str | Path]) -> list[tuple[Path, tuple[float, float] | None]]:
    """Image files as given; BIDS folders expanded to their slides (with sidecar pixel sizes)."""
    files: list[tuple[Path, tuple[float, float] | None]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise MissingInputError("no such file or folder; check the path", path)
        if path.is_dir() and (path / "dataset_description.json").is_file():

            for record in discover(path):
                files.append((Path(record.path), record.pixel_size_um))
        else:
            files.append((path, None))
    return files


# ----------------------------------------------------------------------------- batches


def _crop_targets(labels: np.ndarray, ignore: np.ndarray) -> dict[str, torch.Tensor]:
    """Targets for one crop: objects cut below half their size by the crop edge become "ignore"."""
    ids, counts = np.unique(labels, return_counts=True)
    keep_ids, masks, boxes = [], [], []
    ignore = ignore.copy()
    objects = ndimage.find_objects(labels)
    for label_id, count in zip(ids, counts):
        if label_id == 0:
            continue
        window = objects[label_id - 1]
        if window is None:
            continue
        mask = labels[window] == label_id
        ys, xs = np.nonzero(mask)
        y0, x0 = window[0].start + ys.min(), window[1].start + xs.min()
        y1, x1 = window[0].start + ys.max() + 1, window[1].start + xs.max() + 1
        touches_edge = y0 == 0 or x0 == 0 or y1 == labels.shape[0] or x1 == labels.shape[1]
        if count < 12 or (touches_edge and count < 40):
            ignore |= labels == label_id
            continue
        full = np.zeros(labels.shape, dtype=np.uint8)
        full[window][mask] = 1
        masks.append(full)
        boxes.append([x0, y0, x1, y1])
        keep_ids.append(label_id)
    height, width = labels.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
        "ignore_integral": integral_image(torch.from_numpy(ignore)),
    }


def sample_batch(images: list[TrainingImage], config: TrainingConfig, rng: np.random.Generator):
    """A batch of augmented crops (B, C, S, S) and every head's targets for them."""
    preset = config.model_preset
    size = preset.crop_size
    areas = np.array([item.image.shape[1] * item.image.shape[2] for item in images], dtype=np.float64)
    picks = rng.choice(len(images), size=preset.batch_size, p=areas / areas.sum())
    crops, head_targets = [], [[] for _ in range(config.heads)]
    for index in picks:
        item = images[index]
        _, height, width = item.image.shape
        y0 = int(rng.integers(0, max(height - size, 0) + 1))
        x0 = int(rng.integers(0, max(width - size, 0) + 1))
        window = (slice(y0, y0 + size), slice(x0, x0 + size))
        flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        turns = int(rng.integers(0, 4))

        def augment(array: np.ndarray) -> np.ndarray:
            array = array[..., window[0], window[1]]
            pad = [(0, 0)] * (array.ndim - 2) + [(0, size - array.shape[-2]), (0, size - array.shape[-1])]
            array = np.pad(array, pad)
            if flips[0]:
                array = array[..., ::-1, :]
            if flips[1]:
                array = array[..., :, ::-1]
            return np.ascontiguousarray(np.rot90(array, turns, axes=(-2, -1)))

        crop = augment(item.image)
        gain, gamma = rng.uniform(0.75, 1.3), rng.uniform(0.8, 1.25)
        crop = np.clip(crop * gain, 0, 1.5) ** gamma
        crops.append(torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)))
        for k, (labels, _, ignore) in enumerate(item.views):
            head_targets[k].append(_crop_targets(augment(labels), augment(ignore)))
    return torch.stack(crops), head_targets


def pseudo_label_coverage(item: TrainingImage) -> float:
    from skimage.filters import threshold_otsu

    composite = item.image.mean(0)
    if composite.max() <= composite.min():
        return 0.0
    foreground = composite > threshold_otsu(composite)
    return float((item.labels[foreground] > 0).mean()) if foreground.any() else 0.0

