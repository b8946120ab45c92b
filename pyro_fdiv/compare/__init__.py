"""Judging approximate posteriors: HMC reference, metrics, fits and plots."""
