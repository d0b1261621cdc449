"""Inference: noise schedules, eps -> D, classifier-free guidance, the EDM Heun sampler,
one-step generation and the Stable Diffusion pipelines. Nothing here trains.
"""
