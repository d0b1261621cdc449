"""Evaluation: one-step sampling, FID / precision / recall, figures, the loop's evaluators."""
