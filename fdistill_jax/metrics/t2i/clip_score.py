"""CLIP score of image-caption pairs with the Flax CLIP towers.

  score = cos(E_img(image), E_txt(caption)) = <e_i, e_t> / (|e_i| |e_t|)

per pair, with E_img the vision tower with `visual_projection` and E_txt the text
tower with `text_projection` of the same CLIP model (`networks.sd`). Images in
[-1, 1] are preprocessed by `clip_pixels` (shorter side to the tower's size,
bicubic with antialiasing, centre crop, CLIP's mean and std).

Convention: this returns the raw cosine, which is the scale of the paper's
Table 4 numbers (0.292 for f-distill JS, CFG 1.75; 0.287 for DMD2). torchmetrics'
`CLIPScore` reports 100 * max(cos, 0) instead (29.2 for the same images). The
paper does not name its CLIP model; DMD2's evaluation, which its Table 4 compares
with, uses open_clip ViT-g/14 (`sd.t2i_metrics`, the COCO protocol). Compare only
numbers computed with the same CLIP weights.
"""

import jax.numpy as jnp

from fdistill_jax.models import sd as sd_nets


def cosine(image_embeds, text_embeds):
  """Per-pair cosine similarity [N] of [N, D] embeddings (float32)."""
  a = jnp.asarray(image_embeds, jnp.float32)
  b = jnp.asarray(text_embeds, jnp.float32)
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
  return jnp.sum(a * b, axis=-1)


def clip_score(vision, vision_vars, text, text_vars, images, tokens):
  """Per-pair CLIP score [N]: images [N, H, W, 3] in [-1, 1], tokens [N, 77] int32.

  Args:
    vision: a `CLIPVisionModelWithProjection`; vision_vars its variables.
    text: a `CLIPTextModelWithProjection`; text_vars its variables.
  """
  size = vision.vision_model.image_size
  image_embeds, _ = vision.apply(vision_vars, sd_nets.clip_pixels(images, size))
  text_embeds, _ = text.apply(text_vars, tokens)
  return cosine(image_embeds, text_embeds)
