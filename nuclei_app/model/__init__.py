"""The student: backbone + ECA (`backbone`), ignore-aware RPN and RoI heads (`heads`), the multi-head
Mask R-CNN (`mask_rcnn`), the one canonical-scale transform for training and inference
(`transform`), weights and model card (`checkpoint`, the only place weights are loaded or saved),
the tile predictor (`predictor`) and the device choice (`device`).

Nothing is imported here: `device` must stay importable without torch, so that segmenting with
the weak labeler and the QC never pay torch's start-up. Import from the submodules.
"""
