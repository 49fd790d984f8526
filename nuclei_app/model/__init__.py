"""The student network: backbone + ECA, ignore-aware heads, multi-head Mask R-CNN, transform, checkpoint, predictor."""
