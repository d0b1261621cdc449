"""Pixel conventions, in one place: uint8 <-> the [-1, 1] range the networks see.

EDM (and this project) map uint8 images to x / 127.5 - 1 and back with
(x * 127.5 + 128).clip(0, 255) truncated to uint8, which rounds half up. Every
consumer (data sources, sample files, PNG grids, Inception input) uses these
two functions, so training grids, exported samples and FID inputs agree.
"""

import numpy as np


def to_unit_range(images) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (x / 127.5 - 1); float images pass through as float32."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32, copy=False)


def quantize(x, xp=np):
  """floor(clip(x * 127.5 + 128, 0, 255)): the uint8 values of [-1, 1] images, as floats.

  `xp` is numpy or jax.numpy, so the Inception preprocessing (inside jit) and
  `to_uint8` (on the host) compute the same values.
  """
  return xp.floor(xp.clip(x * 127.5 + 128.0, 0.0, 255.0))


def to_uint8(images) -> np.ndarray:
  """[-1, 1] -> uint8 as EDM: (x * 127.5 + 128).clip(0, 255) truncated; uint8 passes through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return quantize(images.astype(np.float32)).astype(np.uint8)
