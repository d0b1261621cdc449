r"""SDXL as an f-distill teacher: its latent denoiser and its pytree text conditioning.

The denoiser is SD's (`sd.distill.LatentDenoiser`, D = x - sigma eps(x / sqrt(1 +
sigma^2), t(sigma), c) on the same discrete schedule); only the conditioning
differs. SDXL's `c` is a pytree

  {'context': [B, 77, 2048], 'pooled': [B, 1280], 'time_ids': [B, 6]}

(both text towers' penultimate states, the second tower's projected pooled
output, the size/crop micro-conditioning: `fdistill_jax.pipelines.sdxl`), which the
engine passes through untouched: generator, fake score and teacher hand it to
the U-Net (`distill.unet_inputs`), CFG's unconditional input has the same
structure, and every leaf has the batch as its leading axis, so it is sharded
like the batch.

As for SD 1.5, prompts are tokenised on the host (both tokenizers) and
encoded inside the jitted steps (`sd.distill`'s docstring gives the cost
argument; SDXL's two towers are 123M + 695M parameters against a 2.6B U-Net).

Unconditional input (classifier-free guidance): SDXL base's
`force_zeros_for_empty_prompt` makes diffusers' negative context and pooled
embedding all zeros when no negative prompt is given, with the same time_ids
as the positive branch; `force_zeros=False` encodes the empty prompt instead.

time_ids: (res, res, 0, 0, res, res) for every example, generated and real
alike (images are centre-cropped and resized to res; diffusers' default for
generation at res x res, and DMD2's SDXL training).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fdistill_jax.problems.t2i import distill
from fdistill_jax.pipelines import sdxl


class SDXLLatentDenoiser(distill.LatentDenoiser):
  """`LatentDenoiser` whose `encode_text` runs SDXL's two text towers.

  Attributes (besides LatentDenoiser's):
    text_encoder_2: the second tower (`CLIPTextModelWithProjection`).
  """
  text_encoder_2: Optional[nn.Module] = None

  def encode_text(self, tokens, tokens_2=None):
    """Token ids of both tokenizers [B, L] -> {'context', 'pooled'} (float32)."""
    _, _, states = self.text_encoder(tokens, True)
    pooled, _, states_2 = self.text_encoder_2(tokens_2, True)
    return sdxl.prompt_embeddings(states, states_2, pooled)


@dataclasses.dataclass(frozen=True)
class SDXLTextConditioning(distill.TextConditioning):
  """SDXL's prompts as the engine's conditioning (`train.conditioning` interface).

  Batches hold 'captions' (and 'images' for image-text sources); `host`
  tokenises the captions with both tokenizers into 'tokens' and 'tokens_2'.

  Attributes (besides TextConditioning's; `context_shape` is (L, C1 + C2)):
    pooled_dim: width of the pooled embedding (the second tower's projection).
    time_ids: the six micro-conditioning numbers of every example.
    force_zeros: the unconditional context and pooled embedding are zeros
      (SDXL base's `force_zeros_for_empty_prompt`), else the empty prompt's.
    empty_tokens_2: the second tokenizer's ids of the empty prompt.
    tokenizer_2: the second tokenizer (host side).
  """
  pooled_dim: int = 1280
  time_ids: tuple = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
  force_zeros: bool = True
  empty_tokens_2: tuple = ()
  tokenizer_2: Any = dataclasses.field(compare=False, hash=False, repr=False, default=None)

  def host(self, batch):
    batch = dict(batch)
    captions = list(batch.pop("captions"))
    batch["tokens"] = np.asarray(self.tokenizer(captions), np.int32)
    batch["tokens_2"] = np.asarray(self.tokenizer_2(captions), np.int32)
    return batch

  def _time_ids(self, n):
    return jnp.broadcast_to(jnp.asarray(self.time_ids, jnp.float32), (n, len(self.time_ids)))

  def _encode(self, teacher_vars, tokens, tokens_2):
    c = self.teacher.apply(teacher_vars, tokens, tokens_2, method="encode_text")
    return {**c, "time_ids": self._time_ids(tokens.shape[0])}

  def draw(self, teacher_vars, key, indices, batch):
    del key, indices
    return self._encode(teacher_vars, batch["tokens"], batch["tokens_2"])

  def real(self, teacher_vars, key, batch):
    if "images" not in batch:
      return None
    x = self.teacher.apply(teacher_vars, batch["images"], key, method="encode_images")
    return x, self._encode(teacher_vars, batch["tokens"], batch["tokens_2"])

  def uncond(self, teacher_vars, c):
    if self.force_zeros:
      return {"context": jnp.zeros_like(c["context"]), "pooled": jnp.zeros_like(c["pooled"]),
              "time_ids": c["time_ids"]}
    empty = self._encode(teacher_vars, jnp.asarray(self.empty_tokens, jnp.int32)[None],
                         jnp.asarray(self.empty_tokens_2, jnp.int32)[None])
    return {k: jnp.broadcast_to(empty[k].astype(c[k].dtype), c[k].shape) if k != "time_ids"
            else c[k] for k in c}

  def dummy(self, n):
    return {"context": jnp.zeros((n,) + tuple(self.context_shape), jnp.float32),
            "pooled": jnp.zeros((n, self.pooled_dim), jnp.float32),
            "time_ids": self._time_ids(n)}
