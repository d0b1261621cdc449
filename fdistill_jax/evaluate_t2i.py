"""`python -m fdistill_jax.evaluate_t2i`: COCO FID and CLIP score of text-to-image samples.

Thin on purpose, as `main.py`: the tool is `fdistill_jax.tools.evaluate_t2i` (its docstring
has the commands), the library `fdistill_jax.sd.t2i_metrics` and `fdistill_jax.sd.coco`.
"""

from fdistill_jax.tools.evaluate_t2i import FLAGS, cli_main, main  # noqa: F401  (the tool's API)

if __name__ == "__main__":
  cli_main()
