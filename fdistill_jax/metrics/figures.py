"""Figures a person reads, drawn with matplotlib (Agg): sample grids and toy panels.

Every figure has axes or a title saying what it shows, and every heat map a
colour bar. `image_grid` (numpy only) also feeds TensorBoard's image summaries.
"""

import math
import os
import textwrap
from typing import Callable, Mapping, Optional, Sequence

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from fdistill_jax.data import pixels  # pylint: disable=g-import-not-at-top,wrong-import-position
from fdistill_jax.io import atomic  # pylint: disable=g-import-not-at-top,wrong-import-position

LOG_DENSITY_RANGE = 12.0   # Heat maps of log densities show [max - 12, max] nats.


def save_figure(fig, path):
  """Writes a matplotlib figure as PNG atomically and closes it."""
  atomic.write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi,
                                                  bbox_inches="tight"))
  plt.close(fig)
  return os.path.abspath(path)


def image_grid(images, ncols=None, pad=1, pad_value=255):
  """uint8 grid [rows*(H+pad)+pad, cols*(W+pad)+pad, C] of images ([-1, 1] or uint8 NHWC).

  Tiles are placed row-major, separated by `pad` pixels of `pad_value`;
  missing tiles of the last row stay `pad_value`.
  """
  images = pixels.to_uint8(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"image_grid expects images [N, H, W, 1 or 3], got {images.shape}; "
                     "convert NCHW with transpose(0, 2, 3, 1).")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def save_image_grid(images, path, *, ncols=None, labels: Optional[Sequence] = None,
                    title="", tile_inches=None, dpi=100):
  """PNG of a titled sample grid; `labels` (class ids or captions) above each tile.

  Tiles are shown enlarged with nearest-neighbour interpolation, never shrunk:
  each covers `tile_inches` (default: the larger of 0.6 inch and two screen
  pixels per image pixel at `dpi`), rows and columns packed tightly.
  """
  images = pixels.to_uint8(images)
  n, h = len(images), images.shape[1]
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  tile = tile_inches or max(0.6, 2.0 * h / dpi)
  gap, margin = 0.03, 0.05
  label_h = 0.16 if labels is not None else gap
  title_h = 0.32 if title else 0.0
  width = ncols * tile + (ncols - 1) * gap + 2 * margin
  height = title_h + nrows * (tile + label_h) + margin
  fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), dpi=dpi, squeeze=False)
  fig.subplots_adjust(left=margin / width, right=1 - margin / width, bottom=margin / height,
                      top=1 - (title_h + label_h) / height, wspace=gap / tile,
                      hspace=label_h / tile)
  for i, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if i >= n:
      continue
    image = images[i]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    if labels is not None:
      ax.set_title(str(labels[i]), fontsize=6, pad=1)
  if title:
    fig.suptitle(title, fontsize=8, y=1 - 0.06 / height, va="top")
  return save_figure(fig, path)


def save_image_grids(path, grids: Mapping[str, np.ndarray], *, ncols=10, title="",
                     panel_inches=3.0, dpi=100):
  """PNG of several titled image grids side by side (e.g. one per sampler).

  Args:
    path: output PNG path.
    grids: {panel title: images [N, H, W, C] in [-1, 1] or uint8}, tiled row-major
      `ncols` per row.
    title: the figure's title.
  """
  n = len(grids)
  fig, axes = plt.subplots(1, n, figsize=(panel_inches * n, panel_inches + 0.5), dpi=dpi,
                           squeeze=False)
  for ax, (name, images) in zip(axes[0], grids.items()):
    grid = image_grid(images, ncols=ncols, pad=1, pad_value=128)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_title(name, fontsize=8)
    ax.set_axis_off()
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return save_figure(fig, path)


def save_captioned_columns(path, columns: Mapping[str, np.ndarray], captions: Sequence[str], *,
                           title="", tile_inches=2.0, max_dpi=256):
  """PNG of side-by-side columns of images, one caption per row (e.g. teacher | student).

  Args:
    path: output PNG path.
    columns: {column title: images [R, H, W, C] in [-1, 1] or uint8}; row r of
      every column shows captions[r].
    captions: R captions (prompts), written above their row, wrapped.
    title: the figure's title.
    tile_inches: the side of each tile; the dpi shows images up to `max_dpi *
      tile_inches` pixels (512 by default) at their own resolution.
  """
  names = list(columns)
  images = [pixels.to_uint8(columns[n]) for n in names]
  rows, h = len(captions), images[0].shape[1]
  if any(len(x) != rows for x in images):
    raise ValueError(f"every column needs {rows} images (one per caption), got "
                     f"{[len(x) for x in images]}.")
  dpi = int(min(max_dpi, max(100, h / tile_inches)))
  ncols, width_chars = len(names), int(_caption_chars(len(names), tile_inches))
  wrapped = [textwrap.fill(str(c), width_chars, max_lines=2, placeholder=" ...")
             for c in captions]
  head, caption_h, gap = 0.3 + (0.2 if title else 0.0), 0.34, 0.05
  width = ncols * tile_inches + (ncols - 1) * gap + 0.1
  height = head + rows * (tile_inches + caption_h) + 0.05
  fig, axes = plt.subplots(rows, ncols, figsize=(width, height), dpi=dpi, squeeze=False)
  fig.subplots_adjust(left=0.05 / width, right=1 - 0.05 / width, bottom=0.05 / height,
                      top=1 - (head + caption_h) / height, wspace=gap / tile_inches,
                      hspace=caption_h / tile_inches)
  for r in range(rows):
    for c in range(ncols):
      ax = axes[r, c]
      ax.imshow(images[c][r], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_title(wrapped[r], fontsize=7, loc="left", pad=2)
  for c, name in enumerate(names):
    box = axes[0, c].get_position()
    fig.text((box.x0 + box.x1) / 2, 1 - (head - 0.05) / height, name, ha="center", va="top",
             fontsize=8, fontweight="bold")
  if title:
    fig.text(0.5, 1 - 0.04 / height, title, ha="center", va="top", fontsize=8)
  return save_figure(fig, path)


def _caption_chars(ncols, tile_inches, chars_per_inch=15):
  """Characters of a 7-point caption that fit across `ncols` tiles."""
  return max(20, ncols * tile_inches * chars_per_inch)


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


def _field_image(ax, fig, fn, extent, size, label, vmin=None):
  values = np.asarray(fn(plane_points(extent, size)), np.float64).reshape(size, size)
  finite = values[np.isfinite(values)]
  lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
  im = ax.imshow(np.where(np.isfinite(values), values, np.nan), extent=(*extent, *extent),
                 origin="upper", cmap="viridis", vmin=lo,
                 vmax=finite.max() if finite.size else 1.0)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
  return values


def _toy_legend():
  """The toy panels' legend: grey is the teacher's density p, orange the generator's q."""
  from matplotlib import lines, patches  # pylint: disable=g-import-not-at-top
  return [patches.Patch(color="grey", alpha=0.5, label="teacher p (density)"),
          lines.Line2D([], [], ls="", marker="o", ms=3, color="tab:orange",
                       label="generator q (samples)")]


def plot_toy(path, mixture, samples: Mapping[str, np.ndarray], *, title="",
             field: Optional[Callable] = None, field_label="field", extent=None,
             size=200, max_points=4000):
  """Writes the toy figure: teacher log density | each sample set | optional field.

  Args:
    path: output PNG path.
    mixture: the `fdistill_jax.problems.toy.mixture.GaussianMixture` teacher.
    samples: {panel title: samples [N, 2]}, e.g. initial and distilled generator.
    title: the figure's title.
    field: optional callable points [M, 2] -> values [M] drawn as a heat map
      (e.g. log10 of the f-distill weight h(r(x)), Theorem 1).
    field_label: its colour-bar label.
    extent: (lo, hi) of the square shown; default `default_extent(mixture)`.
    size: heat-map resolution per side.
    max_points: cap on the points drawn per panel.
  """
  extent = extent or default_extent(mixture)
  panels = 1 + len(samples) + (field is not None)
  fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.0), dpi=100, squeeze=False)
  axes = axes[0]
  log_p = lambda x: np.asarray(mixture.log_density(x, 0.0))
  values = _field_image(axes[0], fig, log_p, extent, size, "log p(x) [nats]")
  axes[0].set_title("teacher density p")
  vmin = np.nanmax(values) - LOG_DENSITY_RANGE
  axes[0].images[0].set_clim(vmin, np.nanmax(values))
  for ax, (name, points) in zip(axes[1:], samples.items()):
    points = np.asarray(points, np.float64)
    points = points[np.all(np.isfinite(points), axis=-1)][:max_points]
    ax.imshow(np.where(values >= vmin, values, np.nan), extent=(*extent, *extent),
              origin="upper", cmap="Greys", alpha=0.35)
    ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:orange", alpha=0.6, linewidths=0)
    ax.legend(handles=_toy_legend(), loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xlim(extent)
    ax.set_ylim(extent)
    ax.set_aspect("equal")
    ax.set_title(f"{name} (n={len(points)})")
  if field is not None:
    _field_image(axes[-1], fig, field, extent, size, field_label)
    axes[-1].set_title(field_label)
  for ax in axes:
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_toy_grid(path, mixture, samples: Mapping[str, np.ndarray], *, title="", extent=None,
                  max_points=2000, ncols=4):
  """Side-by-side scatter plots of several sample sets over the teacher's density."""
  extent = extent or default_extent(mixture)
  n = len(samples)
  ncols = min(ncols, n)
  nrows = int(math.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.4 * nrows), dpi=100,
                           squeeze=False)
  grid = plane_points(extent, 150)
  log_p = np.asarray(mixture.log_density(grid, 0.0)).reshape(150, 150)
  log_p = np.where(log_p >= log_p.max() - LOG_DENSITY_RANGE, log_p, np.nan)
  for ax, (name, points) in zip(axes.flat, samples.items()):
    points = np.asarray(points, np.float64)
    points = points[np.all(np.isfinite(points), axis=-1)][:max_points]
    ax.imshow(log_p, extent=(*extent, *extent), origin="upper", cmap="Greys", alpha=0.35)
    ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:orange", alpha=0.6, linewidths=0)
    ax.set_xlim(extent)
    ax.set_ylim(extent)
    ax.set_aspect("equal")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
  for ax in list(axes.flat)[n:]:
    ax.set_axis_off()
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_curves(path, x, curves: Mapping[str, np.ndarray], *, xlabel, ylabel, title="",
                log_y=False, notes: Sequence[tuple] = (), legend_loc="best"):
  """Line plot of several curves over one x axis, with a legend.

  Args:
    path: output PNG path.
    x: the shared abscissa [N].
    curves: {legend label: values [N]}.
    xlabel, ylabel, title: axis labels and title.
    log_y: logarithmic y axis.
    notes: (x, text) pairs: a dotted vertical line at x, labelled with text.
    legend_loc: matplotlib legend location.
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
  styles = ("-", "--", "-.", ":")         # overlapping curves stay distinguishable
  for i, (label, values) in enumerate(curves.items()):
    ax.plot(x, values, label=label, linewidth=1.8, linestyle=styles[i % len(styles)])
  if log_y:
    ax.set_yscale("log")
  for at, text in notes:
    ax.axvline(at, color="grey", linestyle=":", linewidth=1)
    ax.annotate(text, (at, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                ha="center", va="bottom", color="dimgrey",
                bbox=dict(boxstyle="round", fc="white", ec="none", alpha=0.8))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, loc=legend_loc)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_panels(path, panels: Mapping[str, Mapping[str, tuple]], *, xlabel, ylabel, title="",
                ncols=3, log_x=False, log_y=False, notes=""):
  """A grid of line plots, one panel per entry, each with its own legend.

  Args:
    path: output PNG path.
    panels: {panel title: {legend label: (x, y) or (x, y, y standard error)}};
      a standard error is drawn as a shaded band.
    xlabel, ylabel, title: axis labels (shared by every panel) and the figure's title.
    ncols: panels per row.
    log_x, log_y: logarithmic axes.
    notes: a line of text under the title.
  """
  n = len(panels)
  ncols = min(ncols, n)
  nrows = int(math.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), dpi=100,
                           squeeze=False)
  for ax, (name, curves) in zip(axes.flat, panels.items()):
    for label, curve in curves.items():
      x, y = np.asarray(curve[0]), np.asarray(curve[1])
      line, = ax.plot(x, y, label=label, linewidth=1.6, marker=".", markersize=3)
      if len(curve) > 2:
        err = np.asarray(curve[2])
        ax.fill_between(x, y - err, y + err, color=line.get_color(), alpha=0.2, linewidth=0)
    if log_x:
      ax.set_xscale("log")
    if log_y:
      ax.set_yscale("log")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.set_axis_off()
  if title or notes:
    fig.suptitle(title + (f"\n{notes}" if notes else ""), fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)
