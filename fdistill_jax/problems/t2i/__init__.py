"""Text-to-image distillation on Stable Diffusion 1.5 and SDXL (its plugin: `plugin.PLUGIN`)."""
