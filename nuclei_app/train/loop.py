"""Weak-to-strong self-training: weak labels -> student -> correct + expand -> retrain.

Round 0 teaches the multi-head student from the weak labelers' output (each head a
different view: another labeler or a bootstrap subset), with unconfident foreground
marked "ignore". Each later round lets the student relabel its own training images
(heads + flips vote), keeps the teacher where the student is unsure, replaces the
teacher where the heads agree confidently (split merges, merge fragments, fix outlines),
adds confident nuclei the teacher missed, and retrains. Every round's statistics go
to ``training_report.json``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
import numpy as np
import torch
from nuclei_app.seeding import framework_seed, generator
from nuclei_app.config import TrainingConfig
from nuclei_app.errors import BadDataError, CannotCreateOutputError, UsageError
from nuclei_app.model.mask_rcnn import MultiHeadMaskRCNN, build_model
from nuclei_app.model.checkpoint import save_model, weights_sha256
from nuclei_app.train.model_card import build_model_card
from nuclei_app.train.data import MIN_NUCLEI_TO_TRAIN, TrainingImage, pseudo_label_coverage, load_training_images, sample_batch
from nuclei_app.train.pseudo_labels import RefinementStats, self_label, human_pseudo_labels, weak_pseudo_labels
from nuclei_app.train.threshold import choose_score_threshold
from nuclei_app.model.device import resolve_device


log = logging.getLogger(__name__)

#: ``evaluation(model, round_index, training_images, snapshot) -> metrics`` (see `train_model`).
Evaluation = Callable[[MultiHeadMaskRCNN, int, list[TrainingImage], Callable[[str | Path], "TrainingResult"]], dict]


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainingResult:
    model_dir: Path
    model: MultiHeadMaskRCNN
    card: dict
    report: dict


def _seed_everything(seed: int) -> None:
    torch.manual_seed(framework_seed(seed))
    np.random.seed(framework_seed(seed))  # for any library drawing from numpy's global state
    # Tiny optimizer-state values turn denormal on CPU and make AdamW several times slower.
    torch.set_flush_denormal(True)


def _learning_rate(step: int, total: int, base: float) -> float:
    warmup = min(50, max(total // 10, 1))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


#: Steps timed before ``fill_budget`` first fits the step count (and so the schedule) to the deadline.
CALIBRATION_STEPS = 10


def _train_steps(model, images, config, steps, rng, device, deadline, on_step) -> tuple[list[float], int, int, bool]:
    """Losses, steps done, steps planned (fitted to the deadline with ``fill_budget``), timed out."""
    preset = config.model_preset
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, weight_decay=1e-4)
    losses, done, timed_out = [], 0, False
    model.train()
    started = time.monotonic()
    step = 0
    while step < steps:
        if time.monotonic() > deadline:
            timed_out = True
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, preset.learning_rate)
        batch, targets = sample_batch(images, config, rng)
        batch = batch.to(device)
        targets = [[{k: v.to(device) for k, v in t.items()} for t in head] for head in targets]
        loss_terms = model.training_losses(batch, targets)
        loss = sum(loss_terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        done += 1
        on_step(step, steps, losses[-1])
        step += 1
        if config.fill_budget and step >= CALIBRATION_STEPS:
            steps = _steps_that_fit(step, time.monotonic() - started, deadline - time.monotonic())
    return losses, done, steps, timed_out


def _steps_that_fit(steps_done: int, seconds_spent: float, seconds_left: float) -> int:
    """The step count at which the schedule ends before the deadline, at the mean speed so far.

    Refitted after every step (not once after calibration) because steps slow down when the
    machine gets busy or crops hold more nuclei: a count fitted once was cut short by the
    deadline a few steps before the schedule's end. 3% is kept back for the same reason.
    """
    seconds_per_step = seconds_spent / steps_done
    return steps_done + max(int(0.97 * seconds_left / seconds_per_step), 0)


def train_model(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    config: TrainingConfig = TrainingConfig(),
    nuclear_channels: str | Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    evaluation: Evaluation | None = None,
    human_labels: Sequence[str | Path] | None = None,
) -> TrainingResult:
    """Train a student de novo from weak labels alone and write it to ``output_dir``.

    Parameters
    ----------
    inputs : image files (OME-TIFF, OME-Zarr, TIFF) and/or BIDS folders.
    output_dir : model folder; receives ``weights.pt``, ``model_card.json``, ``training_report.json``.
    config : the `TrainingConfig` (preset, heads, rounds, time budget, seed...).
    nuclear_channels : channel names to use (default: every recognised nuclear stain).
    progress : called with one line per notable event (for the CLI's log/progress bar).
    evaluation : optional hook ``(model, round, training images, snapshot) -> metrics``, used by
        benchmarks with ground truth; ``snapshot(folder)`` writes the model folder `train` would
        write if it stopped after this round (to segment it as a user would). The hook's result
        is stored in that round's report entry, and its time is not charged to ``config.max_minutes``.
    human_labels : for supervised upper bounds only (benchmarks): one label image per input
        image file, used instead of the weak labels (needs ``config.rounds == 0``); the model
        card then says ``human_labels_used: true``.
    """
    say = progress or (lambda line: log.info(line))
    started = time.time()
    output_dir = Path(output_dir)
    _check_writable_output(output_dir)
    device = resolve_device(config.device)
    _seed_everything(config.seed)
    images, channel_names, provenance = _round_zero_images(inputs, config, nuclear_channels, human_labels, say)
    model = build_model(len(channel_names), config.model_preset, heads=config.heads, use_eca=config.use_eca).to(device)
    folder = _ModelFolderWriter(images, channel_names, provenance, config, device, started, human_labels is not None)
    rounds_report, timed_out = _self_train(model, images, config, device, say, evaluation, folder)
    result = folder.write(model, output_dir, rounds_report, timed_out, say)
    say(f"model {result.card['model_id']} written to {output_dir}")
    return result


@dataclass
class _ModelFolderWriter:
    """Writes the model folder of a training run: the final one, or a snapshot after any round.

    A snapshot is exactly the folder `train` would have written had it stopped after that
    round (score cut-off chosen the same way, full card), so benchmarks score every round
    through `segment` like a user's model.
    """

    images: list[TrainingImage]
    channel_names: list[str]
    provenance: list[dict]
    config: TrainingConfig
    device: str
    started: float
    human_labels_used: bool

    def write(self, model: MultiHeadMaskRCNN, output_dir: Path, rounds_report: list[dict], timed_out: bool,
              say: Callable[[str], None] = lambda line: None) -> TrainingResult:
        threshold_choice = choose_score_threshold(model, self.images, self.device,
                                                  min_confidence=self.config.min_teacher_confidence)
        say(f"score threshold {threshold_choice['score_threshold']:.2f} "
            f"(F1 {max(threshold_choice['f1_vs_pseudo_labels']):.3f} against the pseudo-labels)")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # saved at once: no copy
        card = build_model_card(model, self.images, self.channel_names, self.provenance, self.config, self.device,
                                threshold_choice, weights_sha256(state), seconds=time.time() - self.started,
                                timed_out=timed_out, human_labels_used=self.human_labels_used)
        report = {
            "model_id": card["model_id"],
            "rounds": rounds_report,
            "total_seconds": round(time.time() - self.started, 2),
            "timed_out": timed_out,
            "converged": len(rounds_report) < self.config.rounds + 1 and not timed_out,
        }
        save_model(output_dir, state, card, report)
        return TrainingResult(Path(output_dir), model, card, report)


def _round_zero_images(
    inputs: Sequence[str | Path],
    config: TrainingConfig,
    nuclear_channels: str | Sequence[str] | None,
    human_labels: Sequence[str | Path] | None,
    say: Callable[[str], None],
) -> tuple[list[TrainingImage], list[str], list[dict]]:
    """Training images at canonical scale with round 0 pseudo-labels (weak labelers, or human masks)."""
    if human_labels is not None and (config.rounds or len(human_labels) != len(inputs)):
        raise UsageError("training on human masks needs one mask file per input image and rounds=0 "
                         "(self-training would overwrite the masks)")
    images, channel_names, provenance = load_training_images(inputs, config, nuclear_channels)
    say(f"training on {len(images)} image(s) from {len(provenance)} input(s); channels {channel_names}")
    if human_labels is None:
        weak_pseudo_labels(images, config)
    else:
        human_pseudo_labels(images, {str(Path(i).resolve()): Path(m) for i, m in zip(inputs, human_labels)}, config)
    n_teacher = sum(int(item.labels.max()) for item in images)
    if n_teacher < MIN_NUCLEI_TO_TRAIN:
        raise BadDataError(
            f"the {'human masks hold' if human_labels is not None else 'weak labeler found'} {n_teacher} "
            "nuclei in the training images; nothing to learn from "
            "(empty or flat images?). Check the nuclear channels (--nuclear-channels) and the input",
            str(inputs[0]) if inputs else None,
        )
    say(f"round 0 pseudo-labels: {n_teacher} nuclei from "
        + ("human masks" if human_labels is not None else f"weak labelers {list(config.weak_methods)}"))
    return images, channel_names, provenance


def _self_train(
    model: MultiHeadMaskRCNN,
    images: list[TrainingImage],
    config: TrainingConfig,
    device: str,
    say: Callable[[str], None],
    evaluation: Evaluation | None,
    folder: "_ModelFolderWriter",
) -> tuple[list[dict], bool]:
    """Round 0 on the weak labels, then correct + expand + fine-tune until converged or out of time.

    Returns every round's report entry and whether any round was cut short by the time budget.
    """
    rng = generator(config.seed, "batches")
    deadline = time.monotonic() + config.max_minutes * 60
    default_steps = config.steps_per_round or config.model_preset.default_steps_per_round
    rounds_report: list[dict] = []
    timed_out = False
    prediction_pass_seconds = 0.0
    for round_index in range(config.rounds + 1):
        round_started = time.time()
        stats = RefinementStats()
        if round_index > 0:
            pass_started = time.monotonic()
            stats = self_label(model, images, config, device)
            prediction_pass_seconds = time.monotonic() - pass_started
            say(
                f"round {round_index}: corrected {stats.corrected} (split {stats.split}, merged {stats.merged}, "
                f"outlines {stats.outline_fixed}), added {stats.added}, removed {stats.removed}"
            )
        steps = default_steps if round_index == 0 else max(default_steps // 2, 1)
        # Later rounds fine-tune; the round's remaining share of the time budget caps it.
        round_deadline = min(deadline, time.monotonic() + _round_share(round_index, config) * config.max_minutes * 60)
        if round_index == config.rounds:
            # The last round leaves time for choosing the score threshold (one more prediction pass).
            round_deadline -= prediction_pass_seconds
        losses, done, steps, round_timed_out = _train_steps(model, images, config, steps, rng, device, round_deadline,
                                                            _loss_logger(round_index, say))
        timed_out |= round_timed_out
        entry = _round_entry(round_index, done, steps, time.time() - round_started, losses, stats, images,
                             round_timed_out)
        if evaluation is not None:
            hook_started = time.monotonic()

            def snapshot(target: str | Path, rounds: list[dict] = rounds_report + [entry]) -> TrainingResult:
                was_training = model.training  # choosing the cut-off predicts in eval mode
                try:
                    return folder.write(model, Path(target), rounds, timed_out)
                finally:
                    model.train(was_training)

            entry["evaluation"] = evaluation(model, round_index, images, snapshot)
            deadline += time.monotonic() - hook_started  # scoring is not training: not charged to the budget
        rounds_report.append(entry)
        if round_index > 0 and stats.changed_fraction < config.convergence_fraction:
            say(f"pseudo-labels changed by {stats.changed_fraction:.1%} < {config.convergence_fraction:.1%}: converged")
            break
        if time.monotonic() > deadline:
            say("time budget spent; stopping after this round")
            break
    return rounds_report, timed_out


def _loss_logger(round_index: int, say: Callable[[str], None]) -> Callable[[int, int, float], None]:
    """A step callback that says the mean loss of the last 50 steps every 50 steps and at the end."""
    recent: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        recent.append(loss)
        if (step + 1) % 50 == 0 or step == total - 1:
            say(f"round {round_index} step {step + 1}/{total} mean loss {np.mean(recent[-50:]):.3f}")

    return on_step


def _round_entry(round_index: int, done: int, steps: int, seconds: float, losses: list[float],
                 stats: RefinementStats, images: list[TrainingImage], round_timed_out: bool) -> dict:
    """One round's entry of ``training_report.json`` (schema ``training_report``)."""
    objects = int(sum(int(item.labels.max()) for item in images))
    return {
        "round": round_index,
        "steps": done,
        "steps_planned": steps,
        "seconds": round(seconds, 2),
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "pseudo_labels": {
            "objects": objects,
            "kept": stats.kept if round_index else objects,
            "corrected": stats.corrected,
            "split": stats.split,
            "merged": stats.merged,
            "outline_fixed": stats.outline_fixed,
            "added": stats.added,
            "removed": stats.removed,
            "changed_fraction": round(stats.changed_fraction, 4),
            "foreground_coverage": round(float(np.mean([pseudo_label_coverage(i) for i in images])), 4),
        },
        "teacher_student_f1": round(stats.teacher_student_f1, 4) if round_index else None,
        "head_agreement": None if stats.head_agreement is None else round(stats.head_agreement, 4),
        "timed_out": round_timed_out,
    }


def _check_writable_output(output_dir: Path) -> None:
    """Fail before training, not after minutes of it, when the model folder cannot be written."""
    import os

    if output_dir.exists() and not output_dir.is_dir():
        raise CannotCreateOutputError("exists and is not a folder; choose a model folder path", output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CannotCreateOutputError(f"cannot create the parent folder ({error.strerror}); choose a writable path",
                                      output_dir) from None
    if not os.access(output_dir.parent, os.W_OK):
        raise CannotCreateOutputError("the parent folder is not writable; choose a writable path", output_dir)


def _round_share(round_index: int, config: TrainingConfig) -> float:
    """Share of the time budget a round may use: half for round 0, the rest split evenly."""
    if config.rounds == 0:
        return 1.0
    return 0.5 if round_index == 0 else 0.5 / config.rounds


#: Below this best F1 against its pseudo-labels a student keeps the default cut-off.

