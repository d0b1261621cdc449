"""The digits classifier: features and class predictions for the measures.

A small CNN (a 3x3 convolution with 16 channels at 8x8, a 2x2 average pool,
a 3x3 convolution with 32 channels at 4x4, a 64-unit hidden layer and a 10-way
output) trained once on the train split
(`data.load('train')`): AdamW, 1-pixel random shifts, a fixed seed, so the same
code gives the same network. Its 64-unit hidden layer, before the ReLU (after
it, units that never fire would make the covariance singular), is the feature
space of the digits' Frechet distance and precision / recall, the way
Inception's pool features are FID's; its argmax is the predicted class (97.5%
right on the held-out split). Trained in about half a minute on a CPU and cached in a
directory (`params.npz` + `classifier.json`, written atomically), which every
later run reads.
"""

import dataclasses
import json
import os

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdistill_jax import console
from fdistill_jax.problems.digits import data
from fdistill_jax.io import atomic

FEATURES = 64
VERSION = 1                      # bump when the network or its training changes
PARAMS_FILE, META_FILE = "params.npz", "classifier.json"
TRAIN = dict(steps=1500, batch=64, lr=2e-3, weight_decay=1e-4, seed=0)


class DigitsCNN(nn.Module):
  """x [B, 8, 8, 1] in [-1, 1] -> (features [B, FEATURES], logits [B, 10])."""
  features: int = FEATURES

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv0")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x)).reshape(x.shape[0], -1)
    features = nn.Dense(self.features, name="hidden")(x)
    return features, nn.Dense(data.NUM_CLASSES, name="out")(nn.relu(features))


def _shift(key, image):
  """The image moved by up to one pixel each way (background -1 fills the gap)."""
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  dy, dx = jax.random.randint(key, (2,), 0, 3)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)


def train(images, labels, *, steps, batch, lr, weight_decay, seed):
  """Trains `DigitsCNN` (one compiled scan over all steps); returns its params."""
  module = DigitsCNN()
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  def loss_fn(params, x, y):
    logits = module.apply({"params": params}, x)[1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def step(carry, key):
    params, opt_state = carry
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.choice(k_idx, images.shape[0], (batch,), replace=False)
    x = jax.vmap(_shift)(jax.random.split(k_shift, batch), images[idx])
    grads = jax.grad(loss_fn)(params, x, labels[idx])
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def fit(key):
    k_init, k_steps = jax.random.split(key)
    params = module.init(k_init, images[:1])["params"]
    carry = (params, opt.init(params))
    return jax.lax.scan(step, carry, jax.random.split(k_steps, steps))[0][0]

  return jax.device_get(fit(jax.random.PRNGKey(seed)))


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A trained classifier: `features_and_logits(x)` on numpy batches, and its record."""
  params: dict
  meta: dict

  def __post_init__(self):
    module = DigitsCNN(features=int(self.meta["features"]))
    object.__setattr__(self, "_apply", jax.jit(lambda p, x: module.apply({"params": p}, x)))

  def features_and_logits(self, images, batch=512):
    """(features [N, F], logits [N, 10]) as float64 numpy, batch by batch (one shape: one compile)."""
    images = np.asarray(images, np.float32)
    feats, logits = [], []
    for start in range(0, len(images), batch):
      chunk = images[start:start + batch]
      padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                               np.float32)])
      f, l = jax.device_get(self._apply(self.params, padded))
      feats.append(f[:len(chunk)])
      logits.append(l[:len(chunk)])
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits).astype(np.float64)

  def accuracy(self, images, labels):
    return float(np.mean(np.argmax(self.features_and_logits(images)[1], -1) == labels))


def _save(path, params, meta):
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  def fill(tmp):
    np.savez(os.path.join(tmp, PARAMS_FILE), **flat)
    atomic.write_json(os.path.join(tmp, META_FILE), meta)
  atomic.write_dir(path, fill, tool="fdistill_jax.problems.digits.classifier", what="digits classifier")


def _load(path):
  with open(os.path.join(path, META_FILE)) as f:
    meta = json.load(f)
  if meta.get("version") != VERSION:
    raise ValueError(f"The digits classifier in {path} has version {meta.get('version')}, this "
                     f"code expects {VERSION}; delete the folder to retrain it (about a minute).")
  with np.load(os.path.join(path, PARAMS_FILE), allow_pickle=False) as npz:
    flat = {tuple(k.split("/")): npz[k] for k in npz.files}
  return Classifier(traverse_util.unflatten_dict(flat), meta)


def load_or_train(path) -> Classifier:
  """The classifier cached in `path`; trains and writes it there first if absent."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, META_FILE)):
    return _load(path)
  console.say("Training the digits classifier (cached in %s) ...", path)
  images, labels = data.load("train")
  params = train(images, labels, **TRAIN)
  clf = Classifier(params, {"version": VERSION, "features": FEATURES, **TRAIN,
                            "split_seed": data.SPLIT_SEED})
  meta = dict(clf.meta, train_accuracy=clf.accuracy(images, labels),
              heldout_accuracy=clf.accuracy(*data.load("heldout")))
  if jax.process_index() == 0:
    _save(path, params, meta)
  console.say("  digits classifier: held-out accuracy %.3f.", meta["heldout_accuracy"])
  return Classifier(params, meta)
