r"""Stable Diffusion (1.x and SDXL) as an f-distill teacher: the engine's text conditioning.

The engine (`fdistill_jax.train`) distils any denoiser with EDMPrecond's call
signature `apply(variables, x, sigma, c, *, train, feature_resolutions)`. For
Stable Diffusion that is the pipeline's own module,
`fdistill_jax.pipelines.sd.LatentDenoiser` (`pipe.module` with `pipe.params`): the
U-Net's eps prediction on the discrete schedule, wrapped as
D(x; sigma, c) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma), c)
(`fdistill_jax.pipelines.denoisers`), in the VAE's scaled latent space (64x64x4 for
512x512 images). The one-step generator is the same module initialised from
the teacher U-Net: x = G(sigma_max z, sigma_max, c), z ~ N(0, I), sigma_max =
14.61 (the schedule's largest sigma, t = 999), is a clean latent in one call;
the fake score starts from the teacher U-Net too.

Conditioning `c` (`TextConditioning`, the `train.conditioning` interface, built
from the pipeline by `text_conditioning`): SD 1.x's CLIP text tower's last hidden
state [B, 77, 768]; SDXL's pytree {'context': [B, 77, 2048], 'pooled': [B, 1280],
'time_ids': [B, 6]} (both towers, the pooled text, the size/crop numbers
(res, res, 0, 0, res, res) for every example, generated and real alike), which the
engine passes through untouched (every leaf has the batch as its leading axis).
The unconditional `c` of classifier-free guidance is the module's
(`LatentDenoiser.unconditional`: the empty prompt's embedding, or zeros for SDXL
base's `force_zeros_for_empty_prompt`, with the same time_ids).

Where prompts are encoded: inside the jitted steps, from token ids that the
host tokenises in the prefetch thread. The frozen text tower (123M
parameters, 85M of them in matmuls: about 13 GFLOPs per 77-token prompt) is a
few percent of one SD 1.5 U-Net forward at 64x64 latents (several hundred
GFLOPs), and an iteration runs about ten U-Net passes (forward and backward)
per example, so encoding in the step costs little and keeps data and model
independent (no re-encoding when the teacher changes): a precomputed store would
need 77 x 768 floats (236 kB in float32) per caption, 165 TB for COYO-700M,
and a new store whenever the text tower changes. Real images of the GAN's
branch are encoded the same way (VAE encoder, a posterior sample times the
scaling factor 0.18215, as DMD2's SD training does).

Everything is float32 unless `compute_dtype='bfloat16'` (networks compute in
bf16, parameters stay float32; the denoiser arithmetic is float32).
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from fdistill_jax.pipelines import sd


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """Text prompts as the engine's conditioning (`train.conditioning` interface), SD 1.x and SDXL.

  Batches of a text source hold 'captions' (strings; `host` tokenises them into
  'tokens' [n, L] int32, and for SDXL 'tokens_2' with the second tokenizer) and,
  for image-text sources, 'images' [n, H, W, 3] in [-1, 1]. The generator is
  conditioned on the iteration's captions; the GAN's real branch is (VAE latents
  of the images, their captions).

  Attributes:
    teacher: the teacher `LatentDenoiser` (with text towers and VAE).
    image_shape: (H, W, 3) the source's images must have (the VAE maps them to
      the teacher's latents).
    context_shape: (L, C) of the text embeddings (SDXL: C1 + C2).
    empty_tokens: token ids of the empty prompt (the unconditional input).
    tokenizer: prompts -> [N, L] int32 ids (host side).
    pooled_dim: SDXL: width of the pooled embedding (0 for SD 1.x).
    time_ids: SDXL: the six micro-conditioning numbers of every example.
    empty_tokens_2: SDXL: the second tokenizer's ids of the empty prompt.
    tokenizer_2: SDXL: the second tokenizer (host side); None for SD 1.x.
  """
  teacher: sd.LatentDenoiser
  image_shape: tuple
  context_shape: tuple
  empty_tokens: tuple
  tokenizer: Any = dataclasses.field(compare=False, hash=False, repr=False, default=None)
  pooled_dim: int = 0
  time_ids: tuple = ()
  empty_tokens_2: tuple = ()
  tokenizer_2: Any = dataclasses.field(compare=False, hash=False, repr=False, default=None)

  @property
  def is_sdxl(self) -> bool:
    return self.teacher.text_encoder_2 is not None

  def host(self, batch):
    batch = dict(batch)
    captions = list(batch.pop("captions"))
    batch["tokens"] = np.asarray(self.tokenizer(captions), np.int32)
    if self.is_sdxl:
      batch["tokens_2"] = np.asarray(self.tokenizer_2(captions), np.int32)
    return batch

  def check_source(self, source, config):
    if not getattr(source, "has_captions", False):
      raise ValueError(f"data.kind={config.data.kind!r} yields no captions; a text-conditional "
                       "teacher needs data.kind='webdataset' (image-text shards) or 'captions'.")
    if getattr(source, "image_shape", None) is None:
      if config.loss.gan_weight > 0 or config.divergence != "rkl":
        raise ValueError(
            "The data source has captions but no images, so there is no GAN real branch and no "
            "density ratio: use it with the reverse-KL objective without GAN "
            "(--config=...:rkl,no_gan), or use an image-text source (data.kind='webdataset').")
      return
    if tuple(source.image_shape) != tuple(self.image_shape):
      raise ValueError(f"The data source yields images of shape {tuple(source.image_shape)} "
                       f"but the VAE maps {tuple(self.image_shape)} to the teacher's latents; "
                       f"set data.resolution={self.image_shape[0]}.")
    if getattr(source, "num_classes", 0):
      raise ValueError("A text-conditional teacher needs a source of captions "
                       f"(data.num_classes=0), not one with {source.num_classes} classes.")

  def _time_ids(self, n):
    return jnp.broadcast_to(jnp.asarray(self.time_ids, jnp.float32), (n, len(self.time_ids)))

  def _tokens(self, batch):
    return (batch["tokens"], batch["tokens_2"]) if self.is_sdxl else (batch["tokens"],)

  def encode(self, teacher_vars, batch):
    """The conditioning of a batch's token ids ('tokens'[, 'tokens_2']), inside jit."""
    tokens = self._tokens(batch)
    c = self.teacher.apply(teacher_vars, *tokens, method="encode_text")
    return {**c, "time_ids": self._time_ids(tokens[0].shape[0])} if self.is_sdxl else c

  def draw(self, teacher_vars, key, indices, batch):
    del key, indices
    return self.encode(teacher_vars, batch)

  def real(self, teacher_vars, key, batch):
    if "images" not in batch:
      return None
    x = self.teacher.apply(teacher_vars, batch["images"], key, method="encode_images")
    return x, self.encode(teacher_vars, batch)

  def uncond(self, teacher_vars, c):
    empty = [jnp.asarray(self.empty_tokens, jnp.int32)[None]]
    if self.is_sdxl:
      empty.append(jnp.asarray(self.empty_tokens_2, jnp.int32)[None])
    u = self.teacher.apply(teacher_vars, *empty, method="unconditional")
    if not self.is_sdxl:
      return jnp.broadcast_to(u.astype(c.dtype), c.shape)
    return {k: c[k] if k == "time_ids" else jnp.broadcast_to(u[k].astype(c[k].dtype), c[k].shape)
            for k in c}

  def dummy(self, n):
    context = jnp.zeros((n,) + tuple(self.context_shape), jnp.float32)
    if not self.is_sdxl:
      return context
    return {"context": context, "pooled": jnp.zeros((n, self.pooled_dim), jnp.float32),
            "time_ids": self._time_ids(n)}


def text_conditioning(pipe: sd.Pipeline, resolution: int) -> TextConditioning:
  """The engine's conditioning of `pipe`'s teacher (`pipe.module`) at `resolution` pixels."""
  if pipe.tokenizer is None or (pipe.is_sdxl and pipe.tokenizer_2 is None):
    what = "tokenizer/ or tokenizer_2/" if pipe.is_sdxl else "tokenizer/"
    raise ValueError(f"The SD teacher has no tokenizer: the model folder lacks {what}; set "
                     "--config.teacher.tokenizer=PATH/tokenizer.")
  text = pipe.text_encoder.text_model
  ids = lambda tok: tuple(int(t) for t in tok([""])[0])
  kw = {}
  if pipe.is_sdxl:
    text_2 = pipe.text_encoder_2
    kw = dict(pooled_dim=text_2.projection_dim,
              time_ids=tuple(float(v) for v in sd.time_ids(1, resolution, resolution)[0]),
              empty_tokens_2=ids(pipe.tokenizer_2), tokenizer_2=pipe.tokenizer_2)
  width = text.hidden_size + (pipe.text_encoder_2.text_model.hidden_size if pipe.is_sdxl else 0)
  return TextConditioning(pipe.module, image_shape=(resolution, resolution, 3),
                          context_shape=(text.max_position_embeddings, width),
                          empty_tokens=ids(pipe.tokenizer), tokenizer=pipe.tokenizer, **kw)
