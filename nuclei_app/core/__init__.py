"""Arrays in, arrays out: instances, tiling, tissue, intensity, morphology, stitching,
metrics and the weak labelers. No files, no torch (a test walks the imports to keep it so).

Implementation lives in the submodules; the names a user calls are re-exported here.
"""
from __future__ import annotations

from nuclei_app.core.instances import Instances
from nuclei_app.core.weak import WeakLabels, weak_labels, log_watershed, otsu_watershed, estimate_nucleus_diameter
from nuclei_app.core.intensity import nuclear_composite, normalise_intensities, robust_z
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.core.tiling import TileGrid, make_tile_grid
from nuclei_app.core.tissue import tissue_mask_from_image
from nuclei_app.core.metrics import iou_matrix, score_instances, score_pooled, aji_plus_breakdown

__all__ = [
    "Instances",
    "TileGrid",
    "WeakLabels",
    "aji_plus_breakdown",
    "estimate_nucleus_diameter",
    "iou_matrix",
    "log_watershed",
    "make_tile_grid",
    "normalise_intensities",
    "nuclear_composite",
    "otsu_watershed",
    "robust_z",
    "score_instances",
    "score_pooled",
    "select_nuclear_channels",
    "tissue_mask_from_image",
    "weak_labels",
]
