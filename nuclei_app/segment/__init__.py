"""Whole-slide segmentation: predictors, tile jobs, executors, the run record, the pipeline."""
