"""Command-line tools (absl flags), each a thin layer over the library.

  python -m fdistill_jax.tools.convert       EDM snapshot -> converted teacher directory
  python -m fdistill_jax.tools.sample        one-step / teacher samples (EDM and text-to-image
                                             runs), generator export
  python -m fdistill_jax.tools.evaluate      FID, precision, recall; reference statistics
  python -m fdistill_jax.tools.sweep         one config over divergences and seeds, a table
  python -m fdistill_jax.tools.digits_sweep  the digits table: teacher, divergences, ablations
  python -m fdistill_jax.tools.analysis      the paper's Fig. 4(b), 5(b) and 6 from trained runs
  python -m fdistill_jax.tools.plot_weights  h(r) of every divergence against log r
  python -m fdistill_jax.tools.sample_t2i    Stable Diffusion teacher samples (DDIM / Euler)
  python -m fdistill_jax.tools.evaluate_t2i  COCO-2014 prompts, reference statistics, FID,
                                             CLIP score, in-batch similarity (DINO)

`cli` is what they share (their own absl FlagValues, a quiet console, one-line
errors); `pip install -e .` installs each as a console script (`fdistill-*`,
listed in pyproject.toml). docs/index.md shows where each is used.
"""
