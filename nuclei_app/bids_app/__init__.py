"""The BIDS App: settings, derivative layout, dataset models, the participant and group levels."""
