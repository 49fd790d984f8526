"""Weak-to-strong self-training: training data, pseudo-labels (teachers, cross-check, the
student's corrections and expansions), the loop, the score cut-off and the model card.
Importing it imports torch.
"""
from __future__ import annotations

from nuclei_app.train.loop import TrainingResult, train_model

__all__ = [
    "TrainingResult",
    "train_model",
]
