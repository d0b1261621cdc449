"""Command-line tools (absl flags), each a thin layer over the library.

  python -m fdistill_jax.tools.convert    EDM snapshot -> converted teacher directory
  python -m fdistill_jax.tools.sample     one-step / teacher samples, generator export
  python -m fdistill_jax.tools.evaluate   FID, precision, recall; reference statistics
  python -m fdistill_jax.tools.sweep      one config over divergences and seeds, a table
"""
