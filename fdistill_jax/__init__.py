"""fdistill_jax: one-step diffusion distillation with f-divergences in JAX/Flax.

Implements f-distill (Xu, Nie, Vahdat, "One-step Diffusion Models with
f-Divergence Distribution Matching", 2025). The loss module
(`fdistill_jax.divergences`, `fdistill_jax.losses`) depends only on jax and can
be imported on its own.
"""

__version__ = "0.1.0"
