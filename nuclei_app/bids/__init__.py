"""BIDS microscopy input: discovery of slides and their metadata, and validation.
"""
from __future__ import annotations

from nuclei_app.bids.discover import SlideRecord, discover
from nuclei_app.bids.validate import ValidationReport, validate_dataset

__all__ = [
    "SlideRecord",
    "ValidationReport",
    "discover",
    "validate_dataset",
]
