"""Inference: noise schedules, eps -> D, classifier-free guidance, the EDM Heun sampler,
one-step generation and the one Stable Diffusion pipeline (SD 1.x and SDXL: `sd`,
sampled by `sd_sampling`). Nothing here trains.
"""
