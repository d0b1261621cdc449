"""Flax linen modules only: EDM U-Nets and preconditioning, discriminator heads,
the toy MLPs, Inception-v3, DINO ViT and the Stable Diffusion networks (`models.sd`).

No module here reads a file: `fdistill_jax.loaders` turns files into their variables.
"""
