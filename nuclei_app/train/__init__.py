"""Weak-to-strong self-training: training data, pseudo-labels, the loop, the score cut-off."""
