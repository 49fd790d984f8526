"""Arrays in, arrays out: instances, label images, tiling, tissue, intensity, morphology, stitching, metrics and the weak labelers. No files, no torch."""
