"""fdistill_jax: one-step diffusion distillation with f-divergences in JAX/Flax.

Implements f-distill (Xu, Nie, Vahdat, "One-step Diffusion Models with
f-Divergence Distribution Matching", 2025) for EDM teachers (CIFAR-10,
ImageNet-64) and Stable Diffusion 1.5 / SDXL teachers (text-to-image).

  divergences, losses   the loss library; depends only on jax and numpy and can be
                        imported on its own
  models/               Flax modules only (EDM U-Nets, discriminator heads, MLPs,
                        Inception, ViT, models/sd/)
  loaders/              untrusted files -> state dicts -> Flax variables (allow-list
                        unpickler, limits, EDM snapshots, diffusers / LDM checkpoints)
  pipelines/            inference: schedules and denoisers, the EDM Heun sampler,
                        Stable Diffusion pipelines, one-step sampling
  metrics/              FID, precision / recall, figures, h(r) statistics, metrics/t2i/
  train/                the engine: loop, steps, state, checkpoints, registries
  problems/             toy/, digits/, t2i/: the problems, each plugged into the engine
  data/                 generic data sources (tfds, EDM zips, WebDataset shards)
  tools/                command-line tools; main.py is the training entry point

Start at docs/index.md.
"""

__version__ = "0.1.0"
