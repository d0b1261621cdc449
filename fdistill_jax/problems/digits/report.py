"""The digits report: the 'digits' evaluator, its measures, and the sweep table's columns.

After the last iteration (and every `digits.eval_every` iterations) of a run
on the digits, the evaluator samples `digits.num_samples` images (default: four
times the train split, 5,752) with every sampler of the run's method (the
one-step generator when distilling; the teacher's Heun sampler and its one
step from sigma_max when training a teacher) and measures each against the
held-out split in the feature space of the digits classifier (`classifier`).
The draws are the same for every run: the noise comes from `digits.eval_seed`
(not the run's seed) and sample i is conditioned on the i-th label of the
train split, cyclically, so the class proportions are the train split's. What
varies between two runs' measures is then their training, not the draws
(with 1,438 samples and uniformly drawn labels, one checkpoint's FD varied by
+-0.6 between draws).

  fd              Frechet distance of the classifier's features (`eval.metrics`)
  precision       k-NN precision (k = 3; Kynkaenniemi et al. 2019): samples
                  inside the held-out manifold
  recall          k-NN recall: held-out images inside the samples' manifold
  class_accuracy  how often the classifier names the class the sample was
                  conditioned on (does the label steer the generator?)

It also measures the train split itself against the held-out split (`floor`:
the value of a perfect sampler with 1,438 samples, up to sampling noise; FD's
small-sample bias puts a perfect sampler lower at 5,752; its class accuracy is
the classifier's on the held-out split) and writes into the workdir

  digits_metrics.json   {'step', 'floor', 'rows': [one per sampler], 'classifier', ...}
  digits_samples.png    ten samples of each class for each sampler
"""

import os
import time

import numpy as np

from fdistill_jax import console
from fdistill_jax.problems.digits import classifier as classifier_lib
from fdistill_jax.problems.digits import data
from fdistill_jax.metrics import figures
from fdistill_jax.metrics import distances as metrics
from fdistill_jax.pipelines import sampling
from fdistill_jax.io import atomic

METRICS_FILE = "digits_metrics.json"
SAMPLES_FILE = "digits_samples.png"
CLASSIFIER_DIR = "digits_classifier"     # default cache, in the workdir
K = 3                                    # k-NN precision / recall
MEASURES = ("fd", "precision", "recall", "class_accuracy")


class Reference:
  """The held-out split's features and statistics, and the measures against them."""

  def __init__(self, clf: classifier_lib.Classifier):
    self.clf = clf
    images, self.labels = data.load("heldout")
    self.features = clf.features_and_logits(images)[0]
    self.mu, self.sigma = metrics.feature_statistics(self.features)

  def measure(self, images, labels) -> dict:
    """FD, precision, recall and class accuracy of `images` conditioned on `labels`."""
    images = np.asarray(images, np.float32)
    finite = np.all(np.isfinite(images.reshape(len(images), -1)), axis=1)
    if not finite.all():
      raise FloatingPointError(f"{int((~finite).sum())} of {len(images)} samples are not finite; "
                               "the network diverged.")
    feats, logits = self.clf.features_and_logits(images)
    precision, recall = metrics.precision_recall(self.features, feats, k=K)
    return {"fd": metrics.frechet_distance(*metrics.feature_statistics(feats), self.mu,
                                           self.sigma),
            "precision": precision, "recall": recall,
            "class_accuracy": float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))}

  def floor(self) -> dict:
    """The train split measured like samples; class accuracy on the held-out split."""
    images, labels = data.load("train")
    out = self.measure(images, labels)
    out.update(name="held-out vs train split (floor)", calls=0,
               class_accuracy=self.clf.meta["heldout_accuracy"], num_samples=len(images))
    return out


def classifier_path(config, workdir):
  """`digits.classifier`, or WORKDIR/digits_classifier when that is empty."""
  path = config.digits.classifier if "digits" in config else ""
  return path or os.path.join(workdir, CLASSIFIER_DIR)


SAMPLES_PER_TRAIN_IMAGE = 4               # the default evaluation size: 4 x 1,438 samples


def num_samples(config):
  """`digits.num_samples`, or (0) SAMPLES_PER_TRAIN_IMAGE times the train split's size."""
  n = int(config.digits.num_samples) if "digits" in config else 0
  return n if n > 0 else SAMPLES_PER_TRAIN_IMAGE * len(data.split_indices()["train"])


def eval_seed(config):
  """`digits.eval_seed`: the evaluation's noise, the same for every run (not `config.seed`)."""
  return int(config.digits.get("eval_seed", 0)) if "digits" in config else 0


class DigitsReport:
  """The 'digits' evaluator (see the module docstring)."""

  def __init__(self, ctx):
    self.ctx, config = ctx, ctx.config
    self.every, self.at_end = int(config.digits.eval_every) if "digits" in config else 0, True
    self.reference = Reference(classifier_lib.load_or_train(classifier_path(config, ctx.workdir)))
    self.num, self.seed = num_samples(config), eval_seed(config)
    # Sample i is conditioned on the i-th train label (cyclically): every evaluation has the
    # train split's class proportions, so no row's FD moves with a draw of the labels.
    labels = tuple(int(c) for c in data.load("train")[1])
    batch = min(256, self.num)
    self.samplers = [(s, sampling.BatchSampler(s.make(labels), batch, ctx.devices))
                     for s in ctx.model_samplers()]
    self._floor = None

  def __call__(self, params, step):
    rows, grids = [], {}
    for spec, sampler in self.samplers:
      start = time.time()
      x, labels = sampler(params[spec.params_key], self.num, seed=self.seed,
                          what=f"digits samples ({spec.name})")
      seconds = time.time() - start
      rows.append({"name": spec.name, "calls": spec.calls, **self.reference.measure(x, labels),
                   "sampling_seconds": seconds, "num_samples": self.num})
      grids[spec.name] = (x, labels)
    if self._floor is None:
      self._floor = self.reference.floor()
    if self.ctx.is_primary:
      self._write(step, rows, grids)
    first = rows[0]
    for row in rows:
      console.say("  digits | %s: FD %.3f, precision %.3f, recall %.3f, class accuracy %.3f",
                  row["name"], row["fd"], row["precision"], row["recall"],
                  row["class_accuracy"])
    return {f"digits/{m}": float(first[m]) for m in MEASURES}

  def _write(self, step, rows, grids):
    config = self.ctx.config
    atomic.write_json(os.path.join(self.ctx.workdir, METRICS_FILE), {
        "step": int(step), "method": config.get("method", "fdistill"),
        "divergence": config.divergence, "seed": int(config.seed), "floor": self._floor,
        "rows": rows, "classifier": self.reference.clf.meta})
    figures.save_image_grids(
        os.path.join(self.ctx.workdir, SAMPLES_FILE),
        {f"{name} (step {step})": per_class_grid(x, labels) for name, (x, labels) in grids.items()},
        title="rows: classes 0-9 (the label each sample was conditioned on)")


def per_class_grid(images, labels, per_class=10):
  """[10 * per_class, H, W, C]: the first `per_class` samples of each class, class by class.

  A class with fewer samples is padded with blank (-1) images.
  """
  blank = -np.ones_like(images[:1])
  rows = []
  for c in range(data.NUM_CLASSES):
    members = images[np.asarray(labels) == c][:per_class]
    rows.append(np.concatenate([members] + [blank] * (per_class - len(members))))
  return np.concatenate(rows)


def _get(name):
  return lambda m: m[name]


# The sweep's table: (column, function of a row of digits_metrics.json).
COLUMNS = (("FD", _get("fd")), ("precision", _get("precision")), ("recall", _get("recall")),
           ("class accuracy", _get("class_accuracy")), ("calls / sample", _get("calls")))


FD_TAG = "digits/fd"                     # the TensorBoard tag of the generator's FD


def curves_figure(path, curves, teacher_fd=None, one_step_fd=None):
  """FD against training iterations: one panel per variant, one line per seed.

  Args:
    path: the PNG to write.
    curves: {variant: {seed label: (iterations [N], FD [N])}}.
    teacher_fd: the teacher's 35-call FD, drawn as a line with 1.5x it dashed.
    one_step_fd: the teacher's own one-step FD (the students' starting point), if given.
  """
  from fdistill_jax.metrics import figures  # pylint: disable=g-import-not-at-top
  plt = figures.plt
  names = list(curves)
  cols = min(3, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100,
                           squeeze=False, sharex=True, sharey=True)
  for ax, name in zip(axes.flat, names):
    for seed, (steps, fds) in curves[name].items():
      ax.plot(steps, fds, marker="o", markersize=2.5, linewidth=1.3, label=f"seed {seed}")
    if teacher_fd is not None:
      ax.axhline(teacher_fd, color="black", linewidth=1, label="teacher, 35 calls")
      ax.axhline(1.5 * teacher_fd, color="black", linewidth=1, linestyle="--",
                 label="1.5 x teacher")
    if one_step_fd is not None:
      ax.axhline(one_step_fd, color="grey", linewidth=1, linestyle=":",
                 label="teacher, 1 call")
    ax.set_yscale("log")
    ax.set_title(name, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  for i, ax in enumerate(axes.flat[:len(names)]):
    if i + cols >= len(names):           # the lowest panel of its column
      ax.xaxis.set_tick_params(labelbottom=True)
      ax.set_xlabel("training iteration")
  for ax in axes[:, 0]:
    ax.set_ylabel("FD to the held-out split (log)")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7, loc="upper right")
  fig.suptitle("One-step students of the digits teacher: classifier-feature FD during "
               "training (same evaluation draws for every run)", fontsize=10)
  fig.tight_layout()
  return figures.save_figure(fig, path)
