"""Inception-v3 pool features for FID, in Flax linen (NHWC).

The network is the TensorFlow graph `inception-2015-12-05` behind the original
FID code, NVIDIA's `inception-2015-12-05.pkl` (used by NVlabs/edm `fid.py` and
StyleGAN) and pytorch-fid's `FIDInceptionA/C/E` variants. It differs from the
torchvision Inception-v3 in the ways pytorch-fid documents: the 3x3 average
pools inside blocks A, C and the first E block exclude padding from the count
(`count_include_pad=False`), the last E block (Mixed_7c) max-pools instead,
and batch norm has eps 1e-3. Module and parameter names follow pytorch-fid's
state dict (`Mixed_5b/branch1x1/conv`, `.../bn`), so converting its `.pth` is
a transpose; NVIDIA's TorchScript names map through `loaders.inception`.

Preprocessing (`preprocess`) has two documented variants:
  * "tf" (default): what the TF graph and NVIDIA's pkl do, hence what EDM's
    FID numbers use. Bilinear resize to 299 with TF1's legacy coordinates
    (source = dest * in / out, no half-pixel shift, edge clamped; the pkl
    reproduces this with `affine_grid`/`grid_sample`), then (x - 128) / 128
    on uint8-range values.
  * "pytorch_fid": pytorch-fid's `F.interpolate(bilinear,
    align_corners=False)` (half-pixel centres) on [0, 1] values, then 2x - 1.

Weights are converted from a user-provided file by
`fdistill_jax.loaders.inception.load_variables`; see there for the supported
formats.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fdistill_jax.data import pixels

RESOLUTION = 299
FEATURE_DIM = 2048


# ----------------------------------------------------------------------------
# Network.


class BasicConv2d(nn.Module):
  """Conv (no bias) + batch norm (eps 1e-3, running statistics) + ReLU."""
  features: int
  kernel: tuple = (1, 1)
  strides: int = 1
  padding: tuple = (0, 0)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = tuple((p, p) for p in self.padding)
    x = nn.Conv(self.features, self.kernel, (self.strides,) * 2, pad, use_bias=False,
                dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool3(x):
  """3x3/1 average pool, padding 1, padding excluded from the count (TF 'SAME')."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, strides=2, pad=0):
  return nn.max_pool(x, (3, 3), (strides, strides), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 1x1 | 5x5 | double 3x3 | avg-pool + 1x1."""
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: strided 3x3 | double 3x3 (strided) | max-pool."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: 1x1 | 1x7,7x1 | 7x1,1x7,7x1,1x7 | avg-pool + 1x1."""
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    for i, (width, shape) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)]):
      bd = conv(width, **shape, name=f"branch7x7dbl_{i + 2}")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 1x1, strided 3x3 | 1x1, 1x7, 7x1, strided 3x3 | max-pool."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1, 3x3 -> (1x3, 3x1) | pool + 1x1.

  `max_pool=True` is the FID graph's quirk in Mixed_7c (pytorch-fid's
  FIDInceptionE_2); Mixed_7b average-pools without counting padding.
  """
  max_pool: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = [conv(384, **row, name="branch3x3_2a")(b3), conv(384, **col, name="branch3x3_2b")(b3)]
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [conv(384, **row, name="branch3x3dbl_3a")(bd),
          conv(384, **col, name="branch3x3dbl_3b")(bd)]
    pooled = _max_pool3(x, strides=1, pad=1) if self.max_pool else _avg_pool3(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: [N, 299, 299, 3] in [-1, 1] -> [N, 2048] pool features."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, dtype=self.dtype)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x.astype(self.dtype))
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = conv(80, name="Conv2d_3b_1x1")(_max_pool3(x))
    x = _max_pool3(conv(192, (3, 3), name="Conv2d_4a_3x3")(x))
    for name, pool_features in [("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)]:
      x = InceptionA(pool_features, self.dtype, name=name)(x)
    x = InceptionB(self.dtype, name="Mixed_6a")(x)
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
      x = InceptionC(c7, self.dtype, name=name)(x)
    x = InceptionD(self.dtype, name="Mixed_7a")(x)
    x = InceptionE(False, self.dtype, name="Mixed_7b")(x)
    x = InceptionE(True, self.dtype, name="Mixed_7c")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ----------------------------------------------------------------------------
# Preprocessing: any size, uint8 or [-1, 1] -> 299x299 network input.


def _resize_matrix(n_in, n_out, half_pixel):
  """[n_out, n_in] bilinear interpolation weights along one axis (edge clamped)."""
  dest = np.arange(n_out, dtype=np.float64)
  if half_pixel:  # torch F.interpolate(align_corners=False); negatives clamp to 0.
    src = np.maximum((dest + 0.5) * n_in / n_out - 0.5, 0.0)
  else:  # TF1 legacy ResizeBilinear (the 2015 graph, NVIDIA's grid_sample).
    src = dest * n_in / n_out
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(x, size, half_pixel):
  """Separable bilinear resize of NHWC `x` to `size` (float32, exact matmuls)."""
  wh = _resize_matrix(x.shape[1], size[0], half_pixel)
  ww = _resize_matrix(x.shape[2], size[1], half_pixel)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", wh, x, precision=hi)
  return jnp.einsum("pw,nowc->nopc", ww, x, precision=hi)


def to_uint8_range(images):
  """uint8 images -> float32 as is; float images in [-1, 1] -> [0, 255] as EDM.

  Floats are quantised exactly as EDM's generate.py writes PNGs
  (floor(x * 127.5 + 128) clipped to [0, 255]), so FID on in-memory samples
  equals FID on the saved images.
  """
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32)
  return pixels.quantize(images.astype(jnp.float32), jnp)


def _preprocess_tf(x):
  return (resize_bilinear(x, (RESOLUTION,) * 2, half_pixel=False) - 128.0) / 128.0


def _preprocess_pytorch_fid(x):
  return resize_bilinear(x / 255.0, (RESOLUTION,) * 2, half_pixel=True) * 2.0 - 1.0


PREPROCESSING = {"tf": _preprocess_tf, "pytorch_fid": _preprocess_pytorch_fid}


def preprocess(images, mode="tf"):
  """NHWC uint8 (or float in [-1, 1]) images of any size -> [N, 299, 299, 3] input."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected NHWC RGB images [N, H, W, 3], got shape {images.shape}; "
                     "convert grayscale with np.repeat(x, 3, axis=-1).")
  if mode not in PREPROCESSING:
    raise ValueError(f"Unknown preprocessing {mode!r}; choose one of {sorted(PREPROCESSING)}.")
  return PREPROCESSING[mode](to_uint8_range(images))


def features(variables, images, mode="tf", dtype=jnp.float32):
  """Pool features [N, 2048] of `images` (uint8 or [-1, 1], NHWC, any size)."""
  return InceptionV3(dtype).apply(variables, preprocess(images, mode))


def variable_shapes():
  """ShapeDtypeStructs of InceptionV3's variables (no compilation)."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32))
