"""nuclei_app: learn to segment overlapping nuclei in multiplex IF slides with no human annotation."""

__version__ = "0.1.0"
