"""CLIP score of image-caption pairs: the cosine of the two towers' projected embeddings.

  score = cos(E_img(image), E_txt(caption)) = <e_i, e_t> / (|e_i| |e_t|)

per pair, with E_img the vision tower with `visual_projection` and E_txt the text
tower with `text_projection` of the same CLIP model (`models.sd`); the scorer and
its image preprocessing are `fdistill_jax.metrics.t2i.metrics.ClipScorer`.

Convention: this returns the raw cosine, which is the scale of the paper's
Table 4 numbers (0.292 for f-distill JS, CFG 1.75; 0.287 for DMD2). torchmetrics'
`CLIPScore` reports 100 * max(cos, 0) instead (29.2 for the same images). The
paper does not name its CLIP model; DMD2's evaluation, which its Table 4 compares
with, uses open_clip ViT-g/14 (`sd.t2i_metrics`, the COCO protocol). Compare only
numbers computed with the same CLIP weights.
"""

import jax.numpy as jnp


def cosine(image_embeds, text_embeds):
  """Per-pair cosine similarity [N] of [N, D] embeddings (float32)."""
  a = jnp.asarray(image_embeds, jnp.float32)
  b = jnp.asarray(text_embeds, jnp.float32)
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  return jnp.sum(a * b, axis=-1)
