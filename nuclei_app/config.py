"""Configuration in one typed place: model presets, training, segmentation, QC and run settings.

Defaults and validation of every setting live here and nowhere else: `TrainingConfig`,
`SegmentConfig`, `QCThresholds` and `RunConfig` (which composes a `SegmentConfig`).
Library entry points take these objects, command-line option defaults come from them, and
every output records the configuration that produced it (`dataclasses.asdict`).
Settings files (JSON or TOML) are read by `read_settings_file`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, TypeVar

from nuclei_app.errors import MissingInputError, UsageError
from nuclei_app.schemas import schema_errors


@dataclass(frozen=True)
class ModelPreset:
    """Architecture and training-crop geometry of one model size.

    Images are rescaled so that a typical nucleus is ``canonical_diameter`` pixels
    wide before they reach the network (as Cellpose does with its diameter), which
    lets a shallow network with a small receptive field see whole nuclei.
    """

    name: str
    backbone: str  # "slim" (residual blocks sized below) or "resnet50"
    stem_channels: int
    stem_stride: int  # 2 skips full-resolution convolutions (most of the CPU cost at canonical scale)
    stage_channels: tuple[int, ...]  # one residual stage each, stride 2 each; FPN uses the last len(anchor_sizes)
    fpn_channels: int
    anchor_sizes: tuple[tuple[int, ...], ...]  # per FPN level, in canonical pixels
    aspect_ratios: tuple[float, ...]
    box_head_width: int
    mask_head_layers: tuple[int, ...]
    rpn_pre_nms_train: int
    rpn_post_nms_train: int
    rpn_pre_nms_test: int
    rpn_post_nms_test: int
    rpn_batch_per_image: int
    roi_batch_per_image: int
    roi_positive_fraction: float  # caps positives per crop: the mask head's cost grows with them
    detections_per_image: int
    canonical_diameter: float
    crop_size: int
    batch_size: int
    learning_rate: float
    default_steps_per_round: int


PRESETS: dict[str, ModelPreset] = {
    # Designed for a 2-core CPU: a stride-2 stem and two residual stages (strides 4 and 8),
    # 32-channel FPN, RoIs pooled from the stride-4 level only (nuclei are small at canonical scale).
    "tiny": ModelPreset(
        name="tiny",
        backbone="slim",
        stem_channels=16,
        stem_stride=2,
        stage_channels=(32, 48),
        fpn_channels=32,
        anchor_sizes=((8, 14), (20, 32)),
        aspect_ratios=(0.6, 1.0, 1.6),
        box_head_width=128,
        mask_head_layers=(32, 32),
        rpn_pre_nms_train=600,
        rpn_post_nms_train=200,
        rpn_pre_nms_test=20000,  # test budgets per 256 x 256 canonical px: safety caps only (see
        rpn_post_nms_test=10000,  # model.OBJECTNESS_THRESHOLD); ~300 nuclei fit in that area
        rpn_batch_per_image=128,
        roi_batch_per_image=64,
        roi_positive_fraction=0.25,
        # ~2x the 16-px nuclei that fit in 256 x 256 canonical px: a cap that binds only on noise
        # (a barely trained student), whose masks would otherwise cost minutes per slide.
        detections_per_image=600,
        canonical_diameter=16.0,
        crop_size=160,
        batch_size=4,
        learning_rate=2e-3,
        default_steps_per_round=300,
    ),
    "small": ModelPreset(
        name="small",
        backbone="slim",
        stem_channels=32,
        stem_stride=1,
        stage_channels=(32, 64, 96),
        fpn_channels=64,
        anchor_sizes=((8, 14), (20, 32)),
        aspect_ratios=(0.6, 1.0, 1.6),
        box_head_width=256,
        mask_head_layers=(64, 64, 64),
        rpn_pre_nms_train=2000,
        rpn_post_nms_train=600,
        rpn_pre_nms_test=20000,
        rpn_post_nms_test=10000,
        rpn_batch_per_image=256,
        roi_batch_per_image=256,
        roi_positive_fraction=0.25,
        detections_per_image=600,
        canonical_diameter=16.0,
        crop_size=256,
        batch_size=4,
        learning_rate=1e-3,
        default_steps_per_round=1500,
    ),
    # The paper's size: ResNet-50-FPN (random init: nothing pretrained is ever downloaded), for GPUs.
    "paper": ModelPreset(
        name="paper",
        backbone="resnet50",
        stem_channels=64,
        stem_stride=2,
        stage_channels=(256, 512, 1024, 2048),
        fpn_channels=256,
        anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
        aspect_ratios=(0.5, 1.0, 2.0),
        box_head_width=1024,
        mask_head_layers=(256, 256, 256, 256),
        rpn_pre_nms_train=2000,
        rpn_post_nms_train=2000,
        rpn_pre_nms_test=10000,
        rpn_post_nms_test=5000,
        rpn_batch_per_image=256,
        roi_batch_per_image=512,
        roi_positive_fraction=0.25,
        detections_per_image=1000,
        canonical_diameter=32.0,
        crop_size=512,
        batch_size=4,
        learning_rate=2e-4,
        default_steps_per_round=4000,
    ),
}


#: A predicted nucleus keeps the pixels at least this far (0 = its surroundings, 1 = its own
#: median) up from the stain around it (`nuclei_app.instances.trim_to_local_contrast`).
OUTLINE_CONTRAST_FRACTION = 0.3


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; `UsageError` listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what `train` learns (recorded in the model card)."""

    preset: str = "tiny"
    heads: int = 3
    rounds: int = 4  # each round corrects more of the teacher (dsb2018: 0.757 F1 after 2 rounds, 0.766 after 4)
    max_minutes: float = 15.0
    steps_per_round: int | None = None  # None: the preset's default, shortened to fit max_minutes
    # Train until each round's share of max_minutes is spent, the learning-rate schedule fitted to the
    # steps the measured speed allows (more steps on a fast machine: not bit-reproducible across machines).
    fill_budget: bool = False
    seed: int = 0
    device: str = "cpu"
    weak_methods: tuple[str, ...] = ("otsu", "log")  # head k learns from weak_methods[k % len]; first = base view
    min_teacher_confidence: float = 0.35  # weaker teacher objects become "ignore", not background
    teacher_agreement: bool = True  # objects one weak labeler disputes lose confidence (see train.cross_checked)
    bootstrap_ignore_fraction: float = 0.15  # per head, this share of objects is hidden (ignored) for diversity
    correction_score: float = 0.75  # student objects at least this confident may replace the teacher's
    correction_agreement: float = 0.6  # ... and at least this much head agreement
    expansion_score: float = 0.8  # confident student objects where the teacher had none are added
    removal_score: float = 0.2  # teacher objects the student scores below this become "ignore" ...
    removal_max_teacher_confidence: float = 0.5  # ... unless the teacher itself was at least this sure
    convergence_fraction: float = 0.02  # stop when fewer pseudo-labels than this share change
    max_training_tiles: int = 64
    training_tile_size: int = 512  # tiles sampled from large slides, in slide pixels
    use_ignore: bool = True
    use_eca: bool = True
    use_correction: bool = True
    use_expansion: bool = True

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if self.heads < 1:
            raise UsageError(f"--heads must be at least 1, got {self.heads}")
        if self.rounds < 0:
            raise UsageError(f"--rounds must be 0 or more, got {self.rounds}")
        if self.max_minutes <= 0:
            raise UsageError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.fill_budget and self.steps_per_round is not None:
            raise UsageError("give either --steps or --fill-budget, not both")

    @property
    def model_preset(self) -> ModelPreset:
        """The `ModelPreset` named by ``preset``."""
        return get_preset(self.preset)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every field."""
        return asdict(self)

    def with_changes(self, **changes: Any) -> "TrainingConfig":
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class QCThresholds:
    """Parameters and pass / warn / fail thresholds of the self-diagnosis (`nuclei_app.qc`).

    Every field has a documented default and may be set in a QC config file (JSON or TOML,
    schema ``qc_config``). A slide metric is compared with its ``<metric>_warn`` and
    ``<metric>_fail`` values: where higher is better, a value below ``_fail`` fails the
    slide and a value below ``_warn`` warns; where lower is better (``*_share``,
    ``seam_excess``), above. A metric that cannot be computed (e.g. scores without a
    model or table) is not judged.
    """

    tile_size_px: int = 512  # side of the QC tile grid, level-0 pixels
    seam_stride_px: int = 0  # segmentation tile stride for seam checks; 0: from the run record (else skipped)
    morphology_k: float = 3.5  # robust z-score beyond which a nucleus is a morphology outlier
    min_nuclei_for_statistics: int = 10  # fewer nuclei: no morphology reference, no outliers
    flag_tile_score_below: float = 0.6  # tiles whose QC score is below this are flagged
    max_flagged_tiles: int = 50  # length of the ranked flagged-tile list in the report
    max_overlays: int = 12  # flagged tiles drawn as PNG overlays beside the report (0: none)
    teacher_tiles_min: int = 16  # the weak teacher (teacher agreement, seed recall) runs on at least this many tiles
    teacher_tiles_share: float = 0.1  # ... or this share of the analysed tiles, whichever is more (1: every tile)
    teacher_sample_seed: int = 0  # seed of QC's random samples: the teacher's tiles (`nuclei_app.qc.sampling`), noise crops
    signal_autocorrelation_warn: float = 0.5
    signal_autocorrelation_fail: float = 0.2
    foreground_coverage_warn: float = 0.7
    foreground_coverage_fail: float = 0.5
    foreground_precision_warn: float = 0.6
    foreground_precision_fail: float = 0.5
    seed_recall_warn: float = 0.75
    seed_recall_fail: float = 0.5
    teacher_student_f1_warn: float = 0.45
    teacher_student_f1_fail: float = 0.25
    score_mean_warn: float = 0.6
    score_mean_fail: float = 0.4
    head_agreement_warn: float = 0.6
    head_agreement_fail: float = 0.4
    morphology_outlier_share_warn: float = 0.25
    morphology_outlier_share_fail: float = 0.5
    seam_excess_warn: float = 0.05
    seam_excess_fail: float = 0.2
    flagged_tile_share_warn: float = 0.25
    flagged_tile_share_fail: float = 0.6

    def __post_init__(self) -> None:
        if not 32 <= self.tile_size_px <= 16384:
            raise UsageError(f"QC tile_size_px must be 32 to 16384, got {self.tile_size_px}")
        if self.seam_stride_px < 0:
            raise UsageError(f"QC seam_stride_px must be 0 (auto) or positive, got {self.seam_stride_px}")
        if self.morphology_k <= 0:
            raise UsageError(f"QC morphology_k must be positive, got {self.morphology_k}")
        if self.teacher_tiles_min < 1 or not 0.0 <= self.teacher_tiles_share <= 1.0 or self.teacher_sample_seed < 0:
            raise UsageError("QC teacher_tiles_min must be >= 1, teacher_tiles_share 0 to 1, teacher_sample_seed >= 0")
        if self.min_nuclei_for_statistics < 3 or self.max_flagged_tiles < 0 or self.max_overlays < 0:
            raise UsageError("QC min_nuclei_for_statistics must be >= 3, max_flagged_tiles and max_overlays >= 0")
        for name, value in asdict(self).items():
            if name.endswith(("_warn", "_fail")) or name == "flag_tile_score_below":
                if not 0.0 <= float(value) <= 1.0:
                    raise UsageError(f"QC threshold {name} must be between 0 and 1, got {value}")
        for metric in ("signal_autocorrelation", "foreground_coverage", "foreground_precision", "seed_recall",
                       "teacher_student_f1", "score_mean", "head_agreement"):
            if getattr(self, f"{metric}_fail") > getattr(self, f"{metric}_warn"):
                raise UsageError(f"QC {metric}_fail must not exceed {metric}_warn (higher is better)")
        for metric in ("morphology_outlier_share", "seam_excess", "flagged_tile_share"):
            if getattr(self, f"{metric}_fail") < getattr(self, f"{metric}_warn"):
                raise UsageError(f"QC {metric}_fail must not be below {metric}_warn (lower is better)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every field."""
        return asdict(self)


_MEMORY_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_memory_size(text: str) -> int:
    """Bytes in a memory size such as ``"8GB"``, ``"512 MiB"``, ``"16G"`` (SI or binary units).

    Raises
    ------
    UsageError
        Not a positive number followed by an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"--mem {text!r} is not a memory size; give e.g. 8GB, 512MB or 16GiB")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


#: Devices a model may run on (``auto``: CUDA when a GPU is visible).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

#: Smallest segmentation tile side accepted, level-0 pixels (smaller tiles are mostly overlap).
MIN_TILE_PX = 64


@dataclass(frozen=True)
class SegmentConfig:
    """Everything that decides how a slide is segmented (`nuclei-app segment`, and each slide of
    `nuclei-app run ... participant`); recorded in the store's ``nuclei-app_run.json``.

    Tile geometry (the one rule both commands apply): ``tile`` is at least 64 pixels and
    ``overlap`` is 0 or more and below half the tile. Cores (and output chunks) are then
    ``tile - overlap`` pixels, wider than the overlap, so a tile's window never reaches
    the core of the tile two away. The overlap should exceed the largest nucleus: on a slide
    whose nuclei are too big for it (63x) both grow to fit them
    (`nuclei_app.core.tiling.fit_tiles_to_nuclei`), and the run record holds what was used.

    Attributes
    ----------
    tile, overlap : int
        Tile side and overlap between neighbouring tiles, level-0 pixels (at least these).
    batch_size : int
        Tiles per predictor call and per parallel task.
    device : {"auto", "cpu", "cuda"}
        Where a model runs (``auto``: CUDA when a GPU is visible).
    nuclear_channels : str, optional
        Comma-separated channel names to segment on (a sequence of names is joined); default:
        the model's channels, or every recognised nuclear stain for the weak labeler.
    score_threshold : float, optional
        Drop nuclei whose consensus score is below this (model only); default: the cut-off
        the model chose at training (its ``model_card.json``).
    nprocs : int
        Worker processes of a local Dask cluster (1: in this process).
    mem : str, optional
        Total memory of those workers, e.g. ``"8GB"`` (split evenly, Dask ``memory_limit``).
    dask_scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://HOST:PORT``); excludes ``nprocs > 1``.
    resume : bool
        Reuse the per-tile results of an interrupted run and a finished matching output.
    work_dir : str, optional
        Cache of per-tile results (default: ``.<output name>.work`` beside the output;
        for `run`, ``OUTPUT_DIR/.work``).
    """

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    device: str = "auto"
    nuclear_channels: str | None = None
    score_threshold: float | None = None
    nprocs: int = 1
    mem: str | None = None
    dask_scheduler: str | None = None
    resume: bool = True
    work_dir: str | None = None

    def __post_init__(self) -> None:
        if self.nuclear_channels is not None and not isinstance(self.nuclear_channels, str):
            object.__setattr__(self, "nuclear_channels", ",".join(str(name) for name in self.nuclear_channels))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", str(self.work_dir))
        if self.tile < MIN_TILE_PX:
            raise UsageError(f"--tile must be at least {MIN_TILE_PX} pixels, got {self.tile}")
        if not 0 <= self.overlap < self.tile / 2:
            raise UsageError(
                f"--overlap must be 0 or more and below half the tile ({self.tile} / 2 = {self.tile / 2:g}), "
                f"got {self.overlap}"
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise UsageError(f"--score-threshold must be between 0 and 1, got {self.score_threshold}")
        if self.nprocs < 1:
            raise UsageError(f"--nprocs must be at least 1, got {self.nprocs}")
        if self.nprocs > 1 and self.dask_scheduler:
            raise UsageError("give either --nprocs or --dask-scheduler, not both")
        if self.mem is not None:
            parse_memory_size(self.mem)

    @property
    def memory_limit_bytes(self) -> int | None:
        """``mem`` in bytes (None: Dask's own limit)."""
        return None if self.mem is None else parse_memory_size(self.mem)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)


_Config = TypeVar("_Config")


def override(config: _Config, **given: Any) -> _Config:
    """``config`` with the fields in ``given`` that are not None replaced (options given on a
    command line override a settings file); validated once, as a whole."""
    changes = {name: value for name, value in given.items() if value is not None}
    return replace(config, **changes) if changes else config


def read_settings_file(path: str | Path, schema: str, what: str, section: str | None = None) -> dict[str, Any]:
    """Read a settings file (JSON, or TOML when it ends in ``.toml``) and check it against ``schema``.

    The one reader of settings files (`run --config`, QC configs), with the same messages
    and exit codes for each.

    Parameters
    ----------
    path : str or Path
        The file.
    schema : str
        Name of the JSON Schema the settings must match (e.g. ``"run_config"``).
    what : str
        What the file is, for messages (e.g. ``"run config"``, ``"QC config"``).
    section : str, optional
        A file holding only this key (a ``[section]`` table) is read as its content.

    Returns
    -------
    dict
        The settings.

    Raises
    ------
    MissingInputError (66)
        The file does not exist or cannot be read.
    UsageError (64)
        Not valid JSON/TOML, not one object / table, or settings that break the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} file not found; give an existing .json or .toml file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise MissingInputError(f"cannot read the {what} file ({reason}); check its permissions and encoding", path) from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot parse the {what} ({first_line}); fix the JSON/TOML syntax", path) from None
    if section is not None and isinstance(values, dict) and set(values) == {section} and isinstance(values[section], dict):
        values = values[section]
    if not isinstance(values, dict):
        raise UsageError(f"the {what} must hold one object / table of settings", path)
    problems = schema_errors(values, schema)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"invalid {what}: {problems[0]}{more}; see `nuclei-app schemas` ({schema})", path)
    return values


#: `run` settings that are `SegmentConfig` fields (every one of them; the rest are `RunConfig`'s own).
SEGMENT_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(SegmentConfig))


@dataclass(frozen=True)
class RunConfig:
    """Settings of one BIDS-App run (`nuclei-app run BIDS_DIR OUTPUT_DIR LEVEL`).

    The names of its own fields and of its `SegmentConfig`'s fields, side by side, are the keys
    of a ``--config`` file (schema ``run_config``) and, with dashes, the command-line options;
    the effective value of every one is written to ``OUTPUT_DIR/logs/config-<level>-<time>-<pid>.json``
    (itself a valid ``--config`` file; `to_dict`, `from_settings`). ``segment.work_dir`` is the
    run's work folder (None: ``OUTPUT_DIR/.work``), ``segment.device``, ``segment.resume`` and
    ``segment.nuclear_channels`` apply to training too. Labels are stored without their
    ``sub-``/``ses-``/``sample-`` prefix.
    """

    participant_label: tuple[str, ...] | None = None
    session_label: tuple[str, ...] | None = None
    sample_label: tuple[str, ...] | None = None
    preset: str = TrainingConfig.preset
    model: str | None = None  # an existing model folder instead of OUTPUT_DIR/models/<model-id>
    seed: int = TrainingConfig.seed
    skip_bids_validation: bool = False
    heads: int = TrainingConfig.heads
    rounds: int = TrainingConfig.rounds
    max_minutes: float = TrainingConfig.max_minutes
    steps: int | None = TrainingConfig.steps_per_round  # optimizer steps of round 0 (None: the preset's)
    qc_config: str | None = None  # QC thresholds file (schema qc_config)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        self.training_config()  # heads, rounds and max_minutes are checked there

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "RunConfig":
        """The `RunConfig` of flat settings (the keys of a ``--config`` file; labels already as tuples).

        Raises
        ------
        UsageError
            An unknown key, or a value its config refuses.
        """
        own = {f.name for f in fields(cls)} - {"segment"}
        unknown = sorted(set(values) - own - set(SEGMENT_SETTINGS))
        if unknown:
            raise UsageError(
                f"unknown run setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(own | set(SEGMENT_SETTINGS)))}"
            )
        segment = SegmentConfig(**{key: value for key, value in values.items() if key in SEGMENT_SETTINGS})
        return cls(segment=segment, **{key: value for key, value in values.items() if key in own})

    def training_config(self) -> TrainingConfig:
        """The `TrainingConfig` of the dataset model this run trains."""
        return TrainingConfig(
            preset=self.preset, heads=self.heads, rounds=self.rounds, max_minutes=self.max_minutes,
            steps_per_round=self.steps, seed=self.seed, device=self.segment.device,
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready settings (label tuples as lists); valid against the ``run_config`` schema."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "segment"}
        for key in ("participant_label", "session_label", "sample_label"):
            if values[key] is not None:
                values[key] = list(values[key])
        return {**values, **self.segment.to_dict()}

    def with_changes(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)
