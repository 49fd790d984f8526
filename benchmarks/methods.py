"""The segmentation methods `compare.py` benchmarks, each run in its own worker process.

Every method has the same signature: ``run(task) -> dict``. It trains (where it trains) on
``task.train_names`` within ``task.budget_seconds`` of wall-clock time, then writes one
``uint32`` label TIFF per image of ``task.predict_names`` to ``task.prediction_dir`` and
returns its timings. Trained peers learn from the teacher's pseudo-labels
(``task.pseudo_label_dir``), never from human masks; only the ``*_supervised`` upper bounds
read ``task.human_mask_paths``, for the train split only. Peers are imported inside their
runner: a missing optional package is a failure of that method alone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile


@dataclass(frozen=True)
class Task:
    """What one worker does (written by compare.py as JSON, read back by the worker)."""

    method: str
    image_paths: dict[str, str]  # name -> image file
    train_names: list[str]
    predict_names: list[str]
    pseudo_label_dir: str  # NAME.tif teacher labels for every image
    prediction_dir: str
    work_dir: str
    budget_seconds: float
    seed: int
    human_mask_paths: dict[str, str] = field(default_factory=dict)  # train split only, upper bounds only
    code_signature: str = ""  # hash of methods.py and nuclei_app: a rerun reuses a result only for the same code

    @classmethod
    def load(cls, path: str | Path) -> "Task":
        return cls(**json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- shared helpers


def normalised_image(path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The nuclear channels of an image file, (C, H, W) float32 mapped as nuclei_app maps them."""
    from nuclei_app.io.slides import channel_percentiles, open_slide
    from nuclei_app.core.intensity import normalise_intensities
    from nuclei_app.core.channels import select_nuclear_channels

    with open_slide(path) as slide:
        channels = select_nuclear_channels(slide.channel_names, None, path=path)
        image = slide.read_level(0, channels=channels)
        return normalise_intensities(image, channel_percentiles(slide, channels)), slide.pixel_size_um


def composite(path: str | Path) -> np.ndarray:
    """One grey (H, W) float32 image per file: the input every single-channel peer gets."""
    image, _ = normalised_image(path)
    return image.mean(axis=0)


def pseudo_labels(task: Task, name: str) -> np.ndarray:
    return tifffile.imread(Path(task.pseudo_label_dir) / f"{name}.tif").astype(np.int32)


def write_prediction(task: Task, name: str, labels: np.ndarray, folder: str | None = None) -> None:
    from nuclei_app.io.labels import write_label_tiff

    target = Path(folder or task.prediction_dir)
    target.mkdir(parents=True, exist_ok=True)
    write_label_tiff(target / f"{name}.tif", np.asarray(labels).astype(np.uint32))


def predict_all(task: Task, predict_one: Callable[[str], np.ndarray], folder: str | None = None) -> dict:
    """Label every image of the prediction set; returns seconds and megapixels."""
    started, pixels = time.time(), 0
    for name in task.predict_names:
        labels = predict_one(name)
        pixels += labels.size
        write_prediction(task, name, labels, folder)
    return {"inference_seconds": time.time() - started, "inference_megapixels": pixels / 1e6}


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


# ----------------------------------------------------------------------------- training-free


def run_weak(task: Task, method: str) -> dict:
    from nuclei_app.workflows import weak_label_file

    started, pixels = time.time(), 0
    Path(task.prediction_dir).mkdir(parents=True, exist_ok=True)
    for name in task.predict_names:
        pixels += weak_label_file(task.image_paths[name], Path(task.prediction_dir) / f"{name}.tif",
                                  method=method).labels.size
    return {"train_seconds": 0.0, "inference_seconds": time.time() - started, "inference_megapixels": pixels / 1e6}


# ----------------------------------------------------------------------------- nuclei_app and its ablations


#: TrainingConfig changes per method: the full method, a plain single-head Mask R-CNN and the ablations.
NUCLEI_APP_VARIANTS: dict[str, dict] = {
    "nuclei_app": {},
    # Our Mask R-CNN reduced to the plain recipe: one head, no ECA, one teacher (the same LoG
    # pseudo-labels the peers get), no ignore regions, no self-training rounds.
    "plain_maskrcnn": {"heads": 1, "use_eca": False, "rounds": 0, "weak_methods": ("log",),
                       "teacher_agreement": False, "use_ignore": False},
    "ablation_no_eca": {"use_eca": False},
    "ablation_one_head": {"heads": 1},
    "ablation_no_correction": {"use_correction": False},
    "ablation_no_expansion": {"use_expansion": False},
    "ablation_no_ignore": {"use_ignore": False},
    "ablation_one_teacher": {"weak_methods": ("log",), "teacher_agreement": False},
    "nuclei_app_supervised": {"rounds": 0},
}


def segment_labels(model_dir: str | Path, image_path: str | Path, work_dir: str | Path,
                   score_threshold: float | None = None) -> np.ndarray:
    """An image's labels exactly as ``nuclei-app segment IMAGE --model MODEL_DIR --no-qc`` writes them.

    The one inference path: `segment_slide` (scale from the measured nucleus size, tiling,
    stitching, the model's cut-off or ``score_threshold``, outline trim) into a temporary
    store, read back as uint32 (H, W). Every nuclei_app row of the benchmark goes through here.
    """
    import shutil

    from nuclei_app.config import SegmentConfig
    from nuclei_app.io.labels import read_labels
    from nuclei_app.segment.pipeline import segment_slide
    from nuclei_app.segment.predictors import PredictorSpec

    store = Path(work_dir) / f"{Path(image_path).name}.ome.zarr"
    config = SegmentConfig(device="cpu", score_threshold=score_threshold, resume=False,
                           work_dir=str(Path(work_dir) / f".{store.name}.work"))
    try:
        segment_slide(image_path, store, PredictorSpec("model", model_dir=str(model_dir)), config, progress=False)
        return read_labels(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(config.work_dir, ignore_errors=True)


def run_nuclei_app(task: Task) -> dict:
    """Train as `nuclei-app train` does (`train_model`), predict as `nuclei-app segment` does (`segment_labels`)."""
    from nuclei_app.config import TrainingConfig
    from nuclei_app.model.checkpoint import DEFAULT_SCORE_THRESHOLD, model_score_threshold
    from nuclei_app.train.loop import train_model

    supervised = task.method == "nuclei_app_supervised"
    # fill_budget: like the peers, every variant trains for the whole budget (the preset's default
    # step count would leave most of it unused), its schedule fitted to the steps that fit.
    config = TrainingConfig(max_minutes=task.budget_seconds / 60, seed=task.seed, fill_budget=True).with_changes(
        **NUCLEI_APP_VARIANTS[task.method])
    work = Path(task.work_dir)
    model_dir = work / "model"

    def segment_with(model_folder: Path, score_threshold: float | None = None) -> Callable[[str], np.ndarray]:
        return lambda name: segment_labels(model_folder, task.image_paths[name], work / "segment", score_threshold)

    hook_seconds = 0.0

    def per_round(model, round_index, images, snapshot) -> dict:
        # Predictions after every round: the 0 vs 1 vs R rounds comparison, each round's model
        # written as `train` would have written it had it stopped there (this time is not
        # charged to the training budget: train_model excludes its evaluation hook).
        nonlocal hook_seconds
        started = time.time()
        snapshot_dir = work / f"model_round_{round_index}"
        card = snapshot(snapshot_dir).card
        predict_all(task, segment_with(snapshot_dir), folder=str(work / f"round_{round_index}"))
        hook_seconds += time.time() - started
        return {"score_threshold": model_score_threshold(card)}

    started = time.time()
    inputs = [task.image_paths[n] for n in task.train_names]
    masks = [task.human_mask_paths[n] for n in task.train_names] if supervised else None
    # Per-round predictions only for the full method (the rounds comparison); the ablations
    # and upper bounds are scored on their final model alone.
    per_round_wanted = task.method == "nuclei_app"
    result = train_model(inputs, model_dir, config, evaluation=per_round if per_round_wanted else None,
                         human_labels=masks)
    train_seconds = time.time() - started - hook_seconds
    # plain_maskrcnn keeps the stock fixed 0.5 cut-off; every other variant its chosen one.
    fixed = DEFAULT_SCORE_THRESHOLD if task.method == "plain_maskrcnn" else None
    timings = predict_all(task, segment_with(model_dir, fixed))
    # Inference-only ablation of the full method: the same weights with the fixed 0.5 cut-off.
    inference_ablations = {}
    if task.method == "nuclei_app":
        inference_ablations["ablation_fixed_threshold"] = str(work / "ablation_fixed_threshold")
        predict_all(task, segment_with(model_dir, DEFAULT_SCORE_THRESHOLD),
                    folder=inference_ablations["ablation_fixed_threshold"])
    rounds = [entry["round"] for entry in result.report["rounds"]]
    return {"train_seconds": train_seconds, **timings, "rounds": rounds,
            "score_threshold": model_score_threshold(result.card),
            "inference_ablation_dirs": inference_ablations,
            "round_prediction_dirs": {} if not per_round_wanted else
            {str(r): str(work / f"round_{r}") for r in rounds},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()}}


# ----------------------------------------------------------------------------- StarDist


def _stardist_training_data(task: Task, labels_for: Callable[[str], np.ndarray]):
    from stardist import fill_label_holes

    images = [composite(task.image_paths[n]) for n in task.train_names]
    labels = [fill_label_holes(labels_for(n)) for n in task.train_names]
    return images, labels


def run_stardist(task: Task) -> dict:
    """StarDist 2D from scratch (no pretrained model), stopped by a wall-clock callback."""
    import tensorflow as tf
    from stardist.models import Config2D, StarDist2D

    seed_everything(task.seed)
    tf.keras.utils.set_random_seed(task.seed)
    started = time.time()
    if task.method == "stardist_supervised":
        images, labels = _stardist_training_data(task, lambda n: tifffile.imread(task.human_mask_paths[n]))
    else:
        images, labels = _stardist_training_data(task, lambda n: pseudo_labels(task, n))
    patch = min(128, *(min(image.shape) for image in images)) // 16 * 16
    config = Config2D(n_rays=32, grid=(2, 2), n_channel_in=1, train_patch_size=(patch, patch),
                      train_batch_size=4, train_epochs=10_000, train_steps_per_epoch=20,
                      use_gpu=False, train_tensorboard=False)
    model = StarDist2D(config, name="stardist", basedir=str(Path(task.work_dir)))
    # Threshold optimisation (StarDist's standard last step) gets the last tenth of the budget.
    training_deadline = started + 0.9 * task.budget_seconds

    class WallClock(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.time() > training_deadline:
                self.model.stop_training = True

    model.prepare_for_training()
    model.callbacks.append(WallClock())
    validation = (images[: max(1, len(images) // 4)], labels[: max(1, len(labels) // 4)])
    model.train(images, labels, validation_data=validation, epochs=10_000, steps_per_epoch=20)
    model.optimize_thresholds(*validation)
    train_seconds = time.time() - started

    def predict_one(name: str) -> np.ndarray:
        labels, _ = model.predict_instances(composite(task.image_paths[name]), verbose=False)
        return labels

    return {"train_seconds": train_seconds, **predict_all(task, predict_one),
            "thresholds": {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)}}


# ----------------------------------------------------------------------------- Cellpose 3


def run_cellpose(task: Task) -> dict:
    """Cellpose 3's CPnet from random weights (no model_type, no pretrained file)."""
    import torch
    from cellpose import dynamics, models
    from cellpose import train as cellpose_train
    from cellpose import utils as cellpose_utils

    seed_everything(task.seed)
    torch.manual_seed(task.seed)
    started = time.time()
    images = [composite(task.image_paths[n]) for n in task.train_names]
    labels = [pseudo_labels(task, n) for n in task.train_names]
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None)
    flows = dynamics.labels_to_flows(labels, device=torch.device("cpu"))  # once, not per train_seg call
    save_dir = Path(task.work_dir)

    def train_epochs(n_epochs: int) -> None:
        # One batch per "epoch": Cellpose ramps its learning rate up over the first 10 epochs
        # and halves it over the last ones, so a budget of few, long epochs would be spent
        # warming up. Its own default learning rate and weight decay (AdamW).
        cellpose_train.train_seg(model.net, train_data=images, train_labels=flows, channels=[0, 0],
                                 normalize=False, n_epochs=n_epochs, batch_size=8, min_train_masks=1,
                                 save_path=str(save_dir), model_name="cellpose", SGD=False,
                                 nimg_per_epoch=8)

    # Each train_seg call has a fixed set-up cost; two short calls separate it from the cost of
    # a batch, so the last call's epoch count (and so its schedule) fits the remaining budget.
    call_started = time.time()
    train_epochs(1)
    one_batch_call = time.time() - call_started
    call_started = time.time()
    train_epochs(3)
    batch_seconds = max((time.time() - call_started - one_batch_call) / 2, 1e-3)
    call_overhead = max(one_batch_call - batch_seconds, 0.0)
    remaining = task.budget_seconds - (time.time() - started) - call_overhead
    extra_epochs = int(remaining // batch_seconds)
    if extra_epochs > 0:
        train_epochs(extra_epochs)
    train_seconds = time.time() - started

    def predict_one(name: str) -> np.ndarray:
        # Cellpose rescales to its training diameter; the size each image needs comes from its
        # teacher labels (training-free, as a user would measure it).
        diameter = float(cellpose_utils.diameters(pseudo_labels(task, name))[0]) or model.diam_mean
        masks, _, _ = model.eval(composite(task.image_paths[name]), channels=[0, 0], diameter=diameter,
                                 normalize=False)
        return masks

    return {"train_seconds": train_seconds, **predict_all(task, predict_one), "batches": 4 + max(extra_epochs, 0)}


RUNNERS: dict[str, Callable[[Task], dict]] = {
    "otsu_watershed": lambda task: run_weak(task, "otsu"),
    "log_watershed": lambda task: run_weak(task, "log"),
    "stardist": run_stardist,
    "cellpose3": run_cellpose,
    **{name: run_nuclei_app for name in NUCLEI_APP_VARIANTS},
    "stardist_supervised": run_stardist,
}
