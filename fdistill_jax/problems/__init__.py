"""The problems: each folder ends in one plugin object (`plugin.py: PLUGIN`, a
`train.registry.Registry`) that the composition root `fdistill_jax.plugins` merges."""
