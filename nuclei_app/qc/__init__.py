"""Self-diagnosis without ground truth: metrics, rules, the slide driver, overlays and the group report."""
