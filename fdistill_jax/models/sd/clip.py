"""CLIP text and vision towers (transformers 5 `models/clip/modeling_clip.py`), Flax linen.

`CLIPTextModel` is Stable Diffusion's text encoder (ViT-L/14's text tower for
SD 1.x): token + position embeddings, `num_hidden_layers` pre-norm causal
transformer layers, `final_layer_norm`. It returns the last hidden state (the
U-Net's `encoder_hidden_states`) and the pooled output: the final hidden state
at the first end-of-text token, or, for configs with the pre-2023
`eos_token_id == 2`, at the largest token id (transformers keeps both rules).

With `output_hidden_states=True` the text towers also return transformers'
`hidden_states`: the embeddings and every layer's output (no final layer
norm), N + 1 arrays. SDXL conditions on `hidden_states[-2]` of both of its
encoders; its second encoder (OpenCLIP ViT-bigG in transformers' form,
`hidden_act="gelu"`) is a `CLIPTextModelWithProjection`, whose projected
`text_embeds` are SDXL's pooled text embedding.

`CLIPVisionModelWithProjection` is the image tower for CLIP scores: patch
embedding (stride-`patch_size` convolution without bias), class token,
position embeddings, `pre_layrnorm` (sic, the reference's name), the
transformer, `post_layernorm` on the class token, `visual_projection`.

Parameter trees mirror the state dicts: `text_model/...` and
`vision_model/...`, `visual_projection/weight`. Padding masks are not applied
(Stable Diffusion encodes prompts padded to 77 tokens without one).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models.sd.layers import Attention
from fdistill_jax.models.sd.layers import Conv
from fdistill_jax.models.sd.layers import Embedding
from fdistill_jax.models.sd.layers import LayerNorm
from fdistill_jax.models.sd.layers import Linear

# CLIP's image normalisation (openai/CLIP `_transform`; transformers' CLIPImageProcessor).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x):
  """x * sigmoid(1.702 x), CLIP's activation."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str = "quick_gelu"

  @nn.compact
  def __call__(self, x):
    h = ACTIVATIONS[self.hidden_act](Linear(self.intermediate_size, name="fc1")(x))
    return Linear(x.shape[-1], name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  eps: float = 1e-5
  causal: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x):
    attn = Attention(self.heads, x.shape[-1] // self.heads, qkv_bias=True, causal=self.causal,
                     names=("q_proj", "k_proj", "v_proj", "out_proj"), attention=self.attention,
                     name="self_attn")
    x = x + attn(LayerNorm(self.eps, name="layer_norm1")(x))
    mlp = CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp")
    return x + mlp(LayerNorm(self.eps, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
  """`layers_0` ... `layers_{N-1}`."""
  num_layers: int
  heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  eps: float = 1e-5
  causal: bool = False
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, output_hidden_states=False):
    """The last layer's output, or (it, (input, every layer's output))."""
    layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    states = [x]
    for i in range(self.num_layers):
      x = layer(self.heads, self.intermediate_size, self.hidden_act, self.eps, self.causal,
                self.attention, name=f"layers_{i}")(x)
      states.append(x)
    return (x, tuple(states)) if output_hidden_states else x


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int

  @nn.compact
  def __call__(self, ids, dtype):
    tokens = Embedding(self.vocab_size, self.hidden_size, name="token_embedding")(ids, dtype)
    positions = Embedding(self.max_position_embeddings, self.hidden_size,
                          name="position_embedding")(jnp.arange(ids.shape[1]), dtype)
    return tokens + positions[None]


class CLIPTextTransformer(nn.Module):
  """`embeddings`, `encoder`, `final_layer_norm` (transformers' `text_model`)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, input_ids, output_hidden_states=False):
    """(last_hidden_state, pooler_output), + hidden_states when asked; float32."""
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"input_ids has {ids.shape[1]} tokens; this text encoder takes at most "
                       f"{self.max_position_embeddings}: tokenize with that max_length.")
    x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                           name="embeddings")(ids, self.dtype)
    x, states = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads,
                            self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                            causal=True, remat=self.remat, attention=self.attention,
                            name="encoder")(x, True)
    x = LayerNorm(self.layer_norm_eps, name="final_layer_norm")(x)
    if self.eos_token_id == 2:  # Legacy configs: the end token has the largest id.
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    out = (x.astype(jnp.float32), pooled.astype(jnp.float32))
    if output_hidden_states:
      out += (tuple(h.astype(jnp.float32) for h in states),)
    return out


class CLIPTextModel(nn.Module):
  """transformers `CLIPTextModel`: returns (last_hidden_state, pooler_output), float32.

  `CLIPTextModel(CLIPTextTransformer(...))`: the tower's parameters live under
  `text_model`, the field's name.
  """
  text_model: CLIPTextTransformer

  def __call__(self, input_ids, output_hidden_states=False):
    return self.text_model(input_ids, output_hidden_states)


class CLIPTextModelWithProjection(nn.Module):
  """transformers `CLIPTextModelWithProjection`: (text_embeds, last_hidden_state), float32,
  + hidden_states with `output_hidden_states=True`.

  The pooled output (the end token's state) through `text_projection` (no bias):
  the text side of CLIP score. Parameters under `text_model` and `text_projection`.
  """
  text_model: CLIPTextTransformer
  projection_dim: int = 768

  @nn.compact
  def __call__(self, input_ids, output_hidden_states=False):
    x, pooled, *states = self.text_model(input_ids, output_hidden_states)
    embeds = Linear(self.projection_dim, use_bias=False, name="text_projection")(pooled)
    return (embeds.astype(jnp.float32), x, *states)


class CLIPVisionEmbeddings(nn.Module):
  hidden_size: int
  image_size: int
  patch_size: int

  @nn.compact
  def __call__(self, pixels):
    b = pixels.shape[0]
    x = Conv(self.hidden_size, self.patch_size, stride=self.patch_size, padding=0,
             use_bias=False, name="patch_embedding")(pixels)
    x = x.reshape(b, -1, self.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden_size))
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    pos = Embedding(num_positions, self.hidden_size, name="position_embedding")(
        jnp.arange(num_positions), x.dtype)
    return jnp.concatenate([cls, x], axis=1) + pos[None]


class CLIPVisionTransformer(nn.Module):
  """`embeddings`, `pre_layrnorm`, `encoder`, `post_layernorm` (transformers' `vision_model`)."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str = "xla"

  @nn.compact
  def __call__(self, pixels):
    size = (self.image_size, self.image_size, self.num_channels)
    if tuple(pixels.shape[1:]) != size:
      raise ValueError(f"pixel_values has shape {tuple(pixels.shape)}; expected [B, *{size}] "
                       "(NHWC, CLIP-normalised): resize with "
                       "fdistill_jax.metrics.t2i.metrics.clip_pixels first.")
    x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                             name="embeddings")(jnp.asarray(pixels).astype(self.dtype))
    x = LayerNorm(self.layer_norm_eps, name="pre_layrnorm")(x)
    x = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                    self.hidden_act, self.layer_norm_eps, remat=self.remat,
                    attention=self.attention, name="encoder")(x)
    pooled = LayerNorm(self.layer_norm_eps, name="post_layernorm")(x[:, 0])
    return x, pooled


class CLIPVisionModelWithProjection(nn.Module):
  """transformers `CLIPVisionModelWithProjection`: (image_embeds, last_hidden_state), float32.

  The tower's parameters live under `vision_model`, the projection's under
  `visual_projection`.
  """
  vision_model: CLIPVisionTransformer
  projection_dim: int = 768

  @nn.compact
  def __call__(self, pixel_values):
    x, pooled = self.vision_model(pixel_values)
    embeds = Linear(self.projection_dim, use_bias=False, name="visual_projection")(pooled)
    return embeds.astype(jnp.float32), x.astype(jnp.float32)
