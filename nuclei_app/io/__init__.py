"""Everything that reads or writes image, label and table formats: slides (OME-TIFF,
OME-Zarr, TIFF), NGFF metadata (`nuclei_app.io.ngff`, the one parser), label stores, tables.

Implementation lives in the submodules; the names a user calls are re-exported here.
"""
from __future__ import annotations

from nuclei_app.io.slides import Slide, open_slide, read_image, channel_percentiles
from nuclei_app.io.labels import read_labels, write_label_tiff
from nuclei_app.io.ome_tiff import write_ome_tiff
from nuclei_app.io.ome_zarr import write_ome_zarr_image, write_labels_ome_zarr, SegmentationZarrWriter
from nuclei_app.io.label_source import open_label_source
from nuclei_app.io.tables import read_nuclei_table

__all__ = [
    "SegmentationZarrWriter",
    "Slide",
    "channel_percentiles",
    "open_label_source",
    "open_slide",
    "read_image",
    "read_labels",
    "read_nuclei_table",
    "write_label_tiff",
    "write_labels_ome_zarr",
    "write_ome_tiff",
    "write_ome_zarr_image",
]
