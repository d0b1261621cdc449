"""PNG figures without matplotlib: toy-demo panels and image grids (PIL only).

`plot_toy` draws, side by side, the teacher's log density as a heat map, the
generated samples as dots over a dimmed copy of it, and optionally a scalar
field over the plane (e.g. the f-distill weight h(r(x)), Theorem 1), under a
title line. Layout (all in pixels): panels of `panel_size` squares separated
and surrounded by `PAD`, below a `TITLE_HEIGHT` strip, so the image is

  width  = n_panels * panel_size + (n_panels + 1) * PAD
  height = TITLE_HEIGHT + panel_size + PAD.
"""

import math
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

PAD = 8
TITLE_HEIGHT = 24
LOG_DENSITY_RANGE = 12.0   # Heat maps of log densities show [max - 12, max] nats.

# Anchor colours of a perceptually ordered dark-blue -> teal -> yellow map
# (approximately viridis) for values 0, 0.25, 0.5, 0.75, 1.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                     [253, 231, 37]], np.float64)


def colormap(values):
  """Maps values in [0, 1] (any shape) to uint8 RGB [..., 3]; NaN maps to black."""
  v = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0, 1)
  pos = v * (len(_ANCHORS) - 1)
  lo = np.minimum(pos.astype(int), len(_ANCHORS) - 2)
  frac = (pos - lo)[..., None]
  rgb = (1 - frac) * _ANCHORS[lo] + frac * _ANCHORS[lo + 1]
  rgb[np.isnan(np.asarray(values, np.float64))] = 0
  return rgb.round().astype(np.uint8)


def default_extent(mixture, margin_stds=5.0):
  """Square (lo, hi) containing all means +- margin_stds * std, centred at 0."""
  half = float(np.abs(mixture.means).max() + margin_stds * mixture.std)
  return (-half, half)


def plane_points(extent, size):
  """Pixel-centre points [size * size, 2], row-major, y decreasing down the rows."""
  lo, hi = extent
  centres = lo + (np.arange(size) + 0.5) * (hi - lo) / size
  xx, yy = np.meshgrid(centres, centres[::-1])
  return np.stack([xx.ravel(), yy.ravel()], axis=-1).astype(np.float32)


def _normalise(field, log_range=None):
  """Rescales a field to [0, 1]: min-max, or [max - log_range, max] if given."""
  field = np.asarray(field, np.float64)
  finite = field[np.isfinite(field)]
  if not finite.size:
    return np.zeros_like(field)
  hi = finite.max()
  lo = hi - log_range if log_range is not None else finite.min()
  return np.clip((field - lo) / max(hi - lo, 1e-12), 0, 1)


def field_panel(fn, extent, size, log_range=None):
  """Heat-map panel [size, size, 3] of fn(points [M, 2]) -> [M] over the extent."""
  values = np.asarray(fn(plane_points(extent, size))).reshape(size, size)
  return colormap(_normalise(values, log_range)), values


def _to_pixels(points, extent, size):
  lo, hi = extent
  scale = size / (hi - lo)
  cols = (points[:, 0] - lo) * scale
  rows = (hi - points[:, 1]) * scale
  return cols, rows


def _draw_dots(image, samples, extent, color=(255, 120, 40), max_points=4000):
  samples = np.asarray(samples, np.float64)
  samples = samples[np.all(np.isfinite(samples), axis=-1)][:max_points]
  draw = ImageDraw.Draw(image)
  for c, r in zip(*_to_pixels(samples, extent, image.size[0])):
    draw.ellipse([c - 1.2, r - 1.2, c + 1.2, r + 1.2], fill=color)


def _labelled(panel, label):
  image = Image.fromarray(panel)
  draw = ImageDraw.Draw(image)
  draw.rectangle([0, 0, image.size[0] - 1, image.size[1] - 1], outline=(200, 200, 200))
  draw.text((4, 3), label, fill=(255, 255, 255))
  return image


def compose(panels: Sequence[Image.Image], title: str):
  """Places equal square panels side by side under a title line (see module doc)."""
  size = panels[0].size[0]
  width = len(panels) * size + (len(panels) + 1) * PAD
  canvas = Image.new("RGB", (width, TITLE_HEIGHT + size + PAD), (255, 255, 255))
  ImageDraw.Draw(canvas).text((PAD, 6), title, fill=(0, 0, 0))
  for i, panel in enumerate(panels):
    canvas.paste(panel, (PAD + i * (size + PAD), TITLE_HEIGHT))
  return canvas


def plot_toy(path, mixture, samples, *, title="", field: Optional[Callable] = None,
             field_label="field", extent=None, panel_size=256, max_points=4000):
  """Writes the toy figure: teacher log density | samples | optional field.

  Args:
    path: output PNG path (folders are created).
    mixture: the `fdistill_jax.toy.GaussianMixture` teacher.
    samples: generated samples [N, 2] (at most `max_points` drawn).
    title: text of the title line.
    field: optional callable points [M, 2] -> values [M] for a third panel
      (min-max colour scale; the range is written on the panel).
    field_label: name of the field, shown on its panel.
    extent: (lo, hi) of the square shown; default `default_extent(mixture)`.
    panel_size: side of each panel in pixels.
    max_points: cap on the number of dots drawn.

  Returns:
    The PIL image that was written.
  """
  extent = extent or default_extent(mixture)
  log_p = lambda x: np.asarray(mixture.log_density(x, 0.0))
  density, _ = field_panel(log_p, extent, panel_size, LOG_DENSITY_RANGE)
  teacher = _labelled(density, f"teacher log p  [{extent[0]:.2f}, {extent[1]:.2f}]^2")
  dots = _labelled((density * 0.35).astype(np.uint8), f"samples (n={len(samples)})")
  _draw_dots(dots, samples, extent, max_points=max_points)
  panels = [teacher, dots]
  if field is not None:
    heat, values = field_panel(field, extent, panel_size)
    finite = values[np.isfinite(values)]
    span = f"[{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "[no finite values]"
    panels.append(_labelled(heat, f"{field_label} {span}"))
  image = compose(panels, title)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image.save(path, format="PNG")
  return image


def save_image_grid(images, path, ncols):
  """Writes images [N, H, W, C] with values in [-1, 1] as one PNG grid.

  Tiles are placed row-major, `ncols` per row, without gaps; missing tiles of
  the last row are black. C = 1 gives a greyscale PNG, C = 3 an RGB one.
  The PNG is (ceil(N / ncols) * H) x (ncols * W) pixels.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or ncols < 1:
    raise ValueError(f"save_image_grid expects images [N, H, W, 1 or 3] and ncols >= 1, got "
                     f"{images.shape} and ncols={ncols}; convert NCHW with transpose(0, 2, 3, 1).")
  n, h, w, c = images.shape
  nrows = math.ceil(n / ncols)
  pixels = np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)
  grid = np.zeros((nrows * ncols, h, w, c), np.uint8)
  grid[:n] = pixels
  grid = grid.reshape(nrows, ncols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(nrows * h, ncols * w, c)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path, format="PNG")
  return grid
