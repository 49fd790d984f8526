"""BIDS microscopy input: discovery of slides and their metadata, and validation."""
