"""The BIDS App: settings, derivative layout, dataset models, the participant and group levels.

Implementation lives in the submodules; the names a user calls are re-exported here.
"""
from __future__ import annotations

from nuclei_app.bids_app.app import RunResult, run_bids_app
from nuclei_app.bids_app.settings import load_run_config

__all__ = ["RunResult", "load_run_config", "run_bids_app"]
