r"""One-step sampling, teacher sampling and generator export.

The distilled generator makes an image in one network evaluation (paper
Sec. 3, Algorithm 1): x = G_theta(sigma_init * z, sigma_init, c), z ~ N(0, I).

  # 50k samples of the EMA generator of a run (uint8 NHWC 'images' + 'labels')
  python -m fdistill_jax.sample --workdir=DIR --num=50000 --out=samples.npz \
      --grid=grid.png
  # raw weights / the second EMA copy, a fixed checkpoint, chosen classes
  python -m fdistill_jax.sample --workdir=DIR --which=raw --step=200000 \
      --labels=0,3,7 --num=64 --out=s.npz
  # the generator alone (EMA weights): spec + orbax params + export.json
  python -m fdistill_jax.sample --workdir=DIR --export=generators/cifar10_js
  python -m fdistill_jax.sample --workdir=generators/cifar10_js --num=50000 --out=s.npz
  # the EDM teacher with EDM's Heun sampler, same output format
  python -m fdistill_jax.sample --teacher=teachers/cifar10 --teacher_preset=cifar10 \
      --num=50000 --out=teacher.npz

Noise derivation (the same images whatever the batch size or device count):
sample i of seed s uses key_i = fold_in(PRNGKey(s), i), noise
z_i = normal(fold_in(key_i, 0), sample_shape), label
c_i = randint(fold_in(key_i, 1), 0, num_classes) for `--labels=uniform`, and
(teacher only) stochastic-sampler noise from fold_in(key_i, 2). `--labels=3`
gives every sample class 3; `--labels=0,3,7` cycles, c_i = list[i % len].
Unconditional models get label -1. The toy generator writes float32
`samples` [N, 2] instead of `images`.
"""

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdistill_jax import convert
from fdistill_jax import edm_sampler
from fdistill_jax import models as models_lib
from fdistill_jax import steps

SPEC_FILE = "generator_spec.json"
PARAMS_DIR = "params"
EXPORT_FILE = "export.json"
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_SIGMA_INIT = 80.0
NOISE, LABEL, CHURN = 0, 1, 2      # fold_in tags of a sample's key
_LOG = logging.getLogger(__name__)


class SampleError(ValueError):
  """A workdir, checkpoint, export directory or sampling option is unusable."""


# ----------------------------------------------------------------------------
# Reading training workdirs.


def _read_json(path, what):
  if not os.path.isfile(path):
    raise SampleError(f"{what} not found: looked for {path}.")
  with open(path) as f:
    return json.load(f)


def _manager(workdir):
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    raise SampleError(f"No checkpoints in {workdir!r}: looked for {directory}/<step>/state. "
                      "Point --workdir at a training workdir (or an exported generator).")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                               item_names=("state", "config"))


def parse_which(which, num_ema):
  """'ema' | 'ema:K' | 'raw' -> ('ema', K) or ('raw', None), checked against num_ema."""
  if which == "raw":
    return "raw", None
  k = 0
  if which.startswith("ema:") and which[4:].isdigit():
    k = int(which[4:])
  elif which != "ema":
    raise SampleError(f"which={which!r}; expected 'ema', 'ema:K' or 'raw'.")
  if not num_ema:
    raise SampleError(f"which={which!r} but the run keeps no EMA copies (ema_decays is "
                      "empty); use which='raw' (--which=raw).")
  if k >= num_ema:
    raise SampleError(f"which={which!r} but the run keeps {num_ema} EMA copies "
                      f"(ema_decays); use 'ema:0'..'ema:{num_ema - 1}' or 'raw'.")
  return "ema", k


def _restore_subtree(state_dir, key):
  """Restores state[key] (and step) as numpy arrays, whatever the saving topology."""
  path = epath.Path(state_dir)
  tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                      {"step": tree["step"], key: tree[key]})
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))


def _steps_to_try(mngr, step):
  available = sorted(mngr.all_steps(), reverse=True)
  if not available:
    raise SampleError(f"No complete checkpoint under {mngr.directory}; train longer or "
                      "wait for the first checkpoint to finish.")
  if step is None:
    return available
  if int(step) not in available:
    raise SampleError(f"No checkpoint at step {step} under {mngr.directory}; "
                      f"available steps: {sorted(available)}.")
  return [int(step)]


def _restore_params(mngr, step, which):
  """(params, config dict, step, (kind, k)) from one checkpoint."""
  config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  kind, k = parse_which(which, len(config.get("ema_decays", ())))
  state_dir = os.path.join(str(mngr.directory), str(step), "state")
  restored = _restore_subtree(state_dir, "gen" if kind == "raw" else "ema")
  params = restored["gen"] if kind == "raw" else restored["ema"][k]
  return params, config, int(restored["step"]), (kind, k)


def _restore_newest(mngr, candidates, which):
  """_restore_params of the first readable step, newest first; unreadable ones are skipped."""
  for i, step in enumerate(candidates):
    try:
      return _restore_params(mngr, step, which)
    except SampleError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (corrupt / truncated files)
      if i + 1 == len(candidates):
        raise SampleError(f"Cannot read the checkpoint at step {step} under "
                          f"{mngr.directory}: {e}") from e
      _LOG.warning("Skipping unreadable checkpoint at step %d: %s", step, e)


def restore_generator_params(workdir, which="ema", step=None):
  """Generator parameters of a training workdir, without the teacher.

  Args:
    workdir: a training workdir (checkpoints/<step>/{state,config}).
    which: 'ema' (the first EMA copy), 'ema:K' or 'raw'.
    step: checkpoint step; default the newest readable one.

  Returns:
    (params as numpy arrays, info dict: step, which, ema_decay, divergence,
    sigma_init, source).
  """
  mngr = _manager(workdir)
  try:
    params, config, saved_step, (kind, k) = _restore_newest(
        mngr, _steps_to_try(mngr, step), which)
  finally:
    mngr.close()
  info = {"step": saved_step, "which": "raw" if kind == "raw" else f"ema:{k}",
          "ema_decay": None if kind == "raw" else float(config["ema_decays"][k]),
          "divergence": config.get("divergence"),
          "sigma_init": float(config.get("loss", {}).get("sigma_init", DEFAULT_SIGMA_INIT)),
          "source": os.path.abspath(workdir)}
  return params, info


def _is_export(path):
  return os.path.isfile(os.path.join(path, EXPORT_FILE))


def load_generator(path, *, which="ema", step=None):
  """(module, params, info) from an exported directory or a training workdir.

  `which` and `step` select the weights of a training workdir; an exported
  directory holds one set and ignores them. `info` has the export.json fields
  plus 'spec', 'sample_shape' and 'num_classes'.
  """
  if not os.path.isdir(path):
    raise SampleError(f"Generator directory {path!r} does not exist: expected a training "
                      f"workdir ({SPEC_FILE}, {CHECKPOINTS_DIR}/) or an exported generator "
                      f"({SPEC_FILE}, {PARAMS_DIR}/, {EXPORT_FILE}).")
  spec = _read_json(os.path.join(path, SPEC_FILE), "Generator architecture")
  if _is_export(path):
    info = _read_json(os.path.join(path, EXPORT_FILE), "Export record")
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_DIR))
  else:
    params, info = restore_generator_params(path, which, step)
  module, sample_shape, num_classes = models_lib.student_from_spec(spec)
  info = dict(info, spec=spec, sample_shape=list(sample_shape), num_classes=int(num_classes))
  return module, params, info


# ----------------------------------------------------------------------------
# Export.


def _check_out_dir(out_dir, overwrite):
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SampleError(f"Export target {out_dir} exists and is not a directory.")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise SampleError(f"Export directory {out_dir} exists and is not empty: choose another "
                      "directory or pass overwrite=True (--overwrite).")


def _replace_dir(src, dst):
  """Renames src to dst; an existing dst is moved aside first, then deleted."""
  old = None
  if os.path.isdir(dst):
    old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
  os.rename(src, dst)
  if old is not None:
    shutil.rmtree(old)


def export_generator(workdir, out_dir, *, which="ema", step=None, overwrite=False):
  """Writes the generator alone: generator_spec.json, params/ (orbax), export.json.

  The directory appears complete or not at all (temporary directory, then
  rename). EMA weights by default (`which` as in `restore_generator_params`).

  Returns:
    The absolute path of `out_dir`.
  """
  out_dir = os.path.abspath(out_dir)
  _check_out_dir(out_dir, overwrite)
  spec = _read_json(os.path.join(workdir, SPEC_FILE), "Generator architecture")
  params, info = restore_generator_params(workdir, which, step)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    with open(os.path.join(tmp, SPEC_FILE), "w") as f:
      json.dump(spec, f, indent=1)
    with open(os.path.join(tmp, EXPORT_FILE), "w") as f:
      json.dump(info, f, indent=1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(tmp) / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    _check_out_dir(out_dir, overwrite)
    _replace_dir(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return out_dir


# ----------------------------------------------------------------------------
# Per-sample randomness (see the module docstring).


def sample_keys(seed, indices):
  """key_i = fold_in(PRNGKey(seed), i) for each global sample index i."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def sample_noise(seed, indices, shape):
  """z_i = normal(fold_in(key_i, 0), shape), stacked: [len(indices), *shape]."""
  keys = sample_keys(seed, indices)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, NOISE), shape))(keys)


def sample_labels(seed, indices, num_classes, classes=None):
  """Integer labels: uniform from fold_in(key_i, 1), classes[i % len], or -1 if unconditional."""
  if not num_classes:
    return jnp.full(indices.shape, -1, jnp.int32)
  if classes is not None:
    return jnp.asarray(classes, jnp.int32)[indices % len(classes)]
  keys = sample_keys(seed, indices)
  draw = lambda k: jax.random.randint(jax.random.fold_in(k, LABEL), (), 0, num_classes)
  return jax.vmap(draw)(keys).astype(jnp.int32)


def parse_labels(spec, num_classes):
  """'uniform' -> None; '3' or '0,3,7' -> tuple of classes, checked against num_classes."""
  if spec in (None, "", "uniform"):
    return None
  try:
    classes = tuple(int(t) for t in str(spec).split(","))
  except ValueError as e:
    raise SampleError(f"--labels={spec!r}; expected 'uniform', a class index or a "
                      "comma-separated list of class indices such as '0,3,7'.") from e
  if not num_classes:
    raise SampleError(f"--labels={spec!r} but the model is unconditional (no classes); "
                      "omit --labels.")
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise SampleError(f"--labels has class(es) {bad} outside [0, {num_classes - 1}]: the "
                      f"model has {num_classes} classes.")
  return classes


def _one_hot(labels, num_classes):
  return jax.nn.one_hot(labels, num_classes) if num_classes else None


# ----------------------------------------------------------------------------
# Batched, sharded sampling.


def generator_batch_fn(module, sample_shape, num_classes, sigma_init, classes=None):
  """fn(params, seed, indices) -> (x, labels): one-step samples of these indices."""
  models = models_lib.Models(teacher=None, student=module, heads=None, feature_keys=(),
                             sample_shape=tuple(sample_shape), num_classes=num_classes)
  def fn(params, seed, indices):
    z = sample_noise(seed, indices, tuple(sample_shape))
    labels = sample_labels(seed, indices, num_classes, classes)
    return steps.generate(models, params, z, _one_hot(labels, num_classes), sigma_init), labels
  return fn


def teacher_batch_fn(module, sampler_kwargs, classes=None):
  """fn(variables, seed, indices) -> (x, labels) with EDM's Heun sampler, per-sample keys."""
  shape = (module.img_resolution, module.img_resolution, module.img_channels)
  num_classes = int(module.label_dim)
  def fn(variables, seed, indices):
    z = sample_noise(seed, indices, shape)
    labels = sample_labels(seed, indices, num_classes, classes)
    churn = jax.vmap(lambda k: jax.random.fold_in(k, CHURN))(sample_keys(seed, indices))
    denoise = lambda x, s, y: module.apply(variables, x, s, y)
    def one(key, z_i, y_i):
      y = None if y_i is None else y_i[None]
      return edm_sampler.edm_sampler(denoise, key, (1,) + shape, class_labels=y,
                                     latents=z_i[None], **sampler_kwargs)[0]
    return jax.vmap(one)(churn, z, _one_hot(labels, num_classes)), labels
  return fn


def to_uint8(x):
  """EDM's conversion of [-1, 1] images: (x * 127.5 + 128).clip(0, 255) -> uint8."""
  return np.clip(np.asarray(x, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def sample_all(batch_fn, variables, num, *, seed=0, batch=256, devices=None,
               postprocess=None):
  """Runs batch_fn over sample indices 0..num-1, sharded over `devices`.

  The batch is rounded up to a multiple of the device count and the last one
  is padded (extra samples are dropped). Returns numpy (x, labels), x after
  `postprocess` (applied per batch on the host).
  """
  if num <= 0:
    raise SampleError(f"num={num}; the number of samples must be positive.")
  devices = list(jax.devices() if devices is None else devices)
  mesh = Mesh(np.asarray(devices), ("data",))
  batch = math.ceil(max(1, min(batch, num)) / len(devices)) * len(devices)
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  def run(variables, seed, start):
    indices = jax.lax.with_sharding_constraint(start + jnp.arange(batch, dtype=jnp.int32), data)
    return batch_fn(variables, seed, indices)
  fn = jax.jit(run, in_shardings=(repl, repl, repl), out_shardings=(data, data))
  variables = jax.device_put(variables, repl)
  xs, labels, t0 = [], [], time.time()
  starts = list(range(0, num, batch))
  pending = fn(variables, jnp.int32(seed), jnp.int32(0))
  for i, start in enumerate(starts):
    x, y = pending
    if i + 1 < len(starts):      # dispatch the next batch before fetching this one
      pending = fn(variables, jnp.int32(seed), jnp.int32(starts[i + 1]))
    n = min(batch, num - start)
    x = np.asarray(jax.device_get(x))[:n]
    xs.append(postprocess(x) if postprocess else x)
    labels.append(np.asarray(jax.device_get(y))[:n])
    _LOG.info("sampled %d / %d (%.1f samples/s)", start + n, num,
              (start + n) / max(time.time() - t0, 1e-9))
  return np.concatenate(xs), np.concatenate(labels)


def generate_samples(module, params, num, *, sample_shape, num_classes, sigma_init,
                     seed=0, batch=256, classes=None, devices=None, postprocess=None):
  """One-step generator samples (float [N, *shape], or postprocessed) and int labels [N]."""
  fn = generator_batch_fn(module, sample_shape, num_classes, sigma_init, classes)
  return sample_all(fn, params, num, seed=seed, batch=batch, devices=devices,
                    postprocess=postprocess)


def sampler_settings(preset="cifar10", num_steps=None):
  """EDM Heun sampler keyword arguments: a preset, optionally with num_steps replaced."""
  if preset not in edm_sampler.EDM_SAMPLER_PRESETS:
    raise SampleError(f"teacher_preset={preset!r}; expected one of "
                      f"{sorted(edm_sampler.EDM_SAMPLER_PRESETS)}.")
  kwargs = dict(edm_sampler.EDM_SAMPLER_PRESETS[preset])
  if num_steps is not None:
    if num_steps < 2:
      raise SampleError(f"num_steps={num_steps}; EDM's Heun sampler needs at least 2.")
    kwargs["num_steps"] = int(num_steps)
  return kwargs


def teacher_samples(module, variables, num, *, sampler_kwargs, seed=0, batch=256,
                    classes=None, devices=None, postprocess=None):
  """EDM teacher samples with the Heun sampler (Karras et al. 2022, Algorithm 2)."""
  fn = teacher_batch_fn(module, sampler_kwargs, classes)
  return sample_all(fn, variables, num, seed=seed, batch=batch, devices=devices,
                    postprocess=postprocess)


# ----------------------------------------------------------------------------
# Output files.


def _atomic_write(path, write):
  """write(tmp_path), then rename onto `path`: the file appears only complete."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_npz(path, **arrays):
  """np.savez written atomically (no '.npz' is appended to `path`)."""
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  return _atomic_write(path, write)


def save_grid(path, x, max_images=64):
  """PNG of the first images (uint8 NHWC) or, for the toy, the samples over the mixture."""
  from fdistill_jax import plots  # pylint: disable=g-import-not-at-top
  from fdistill_jax import toy  # pylint: disable=g-import-not-at-top
  if x.ndim == 4:
    images = (x[:max_images].astype(np.float32) - 127.5) / 127.5
    ncols = int(math.ceil(math.sqrt(len(images))))
    return _atomic_write(path, lambda tmp: plots.save_image_grid(images, tmp, ncols))
  title = f"one-step samples (n={len(x)})"
  return _atomic_write(path, lambda tmp: plots.plot_toy(tmp, toy.default_mixture(), x,
                                                        title=title))


def write_samples(out, x, labels, grid=None):
  """`images` (uint8 NHWC) or `samples` (float32 [N, 2]) plus int `labels` to npz."""
  key = "images" if x.ndim == 4 else "samples"
  save_npz(out, **{key: x, "labels": labels.astype(np.int32)})
  if grid:
    save_grid(grid, x)


# ----------------------------------------------------------------------------
# Command line.


def _parser():
  p = argparse.ArgumentParser(prog="python -m fdistill_jax.sample", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="training workdir or exported generator directory")
  p.add_argument("--teacher", help="sample this EDM teacher (snapshot .pkl or converted "
                 "directory) with the Heun sampler instead of a generator")
  p.add_argument("--export", metavar="OUT_DIR", help="write the generator alone to OUT_DIR "
                 "and exit (no sampling)")
  p.add_argument("--overwrite", action="store_true", help="--export: replace OUT_DIR")
  p.add_argument("--num", type=int, default=50000, help="number of samples")
  p.add_argument("--out", help="output .npz")
  p.add_argument("--grid", help="optional PNG of the first 64 samples (toy: scatter plot)")
  p.add_argument("--which", default="ema", help="ema (first EMA copy) | ema:K | raw")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--labels", default="uniform", help="uniform | class index | e.g. 0,3,7")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch", type=int, default=256, help="global batch (all devices)")
  p.add_argument("--teacher_preset", default="cifar10",
                 choices=sorted(edm_sampler.EDM_SAMPLER_PRESETS))
  p.add_argument("--num_steps", type=int, default=None, help="override the preset's steps")
  return p


def _sample_generator(args):
  module, params, info = load_generator(args.workdir, which=args.which, step=args.step)
  classes = parse_labels(args.labels, info["num_classes"])
  _LOG.info("Sampling %s weights of step %s (%s).", info["which"], info["step"],
               info["source"])
  images = len(info["sample_shape"]) == 3
  return generate_samples(module, params, args.num, sample_shape=info["sample_shape"],
                          num_classes=info["num_classes"], sigma_init=info["sigma_init"],
                          seed=args.seed, batch=args.batch, classes=classes,
                          postprocess=to_uint8 if images else None)


def _sample_teacher(args):
  kwargs = sampler_settings(args.teacher_preset, args.num_steps)
  if not os.path.exists(args.teacher):
    raise SampleError(f"Teacher {args.teacher!r} does not exist: expected an EDM snapshot "
                      "(.pkl) or a directory written by python -m fdistill_jax.convert.")
  module, variables = convert.load_edm(args.teacher)
  classes = parse_labels(args.labels, int(module.label_dim))
  return teacher_samples(module, variables, args.num, sampler_kwargs=kwargs, seed=args.seed,
                         batch=args.batch, classes=classes, postprocess=to_uint8)


def run(args):
  """Export, or sample the generator / teacher into args.out (checked before any work)."""
  if bool(args.workdir) == bool(args.teacher):
    raise SampleError("Give exactly one of --workdir (generator) and --teacher (EDM teacher).")
  if args.export:
    if args.teacher:
      raise SampleError("--export writes a generator: use it with --workdir, not --teacher.")
    return export_generator(args.workdir, args.export, which=args.which, step=args.step,
                            overwrite=args.overwrite)
  if not args.out:
    raise SampleError("--out=PATH.npz is required (or --export=OUT_DIR).")
  if args.num <= 0 or args.batch <= 0:
    raise SampleError(f"--num={args.num} and --batch={args.batch} must both be positive.")
  x, labels = _sample_teacher(args) if args.teacher else _sample_generator(args)
  write_samples(args.out, x, labels, args.grid)
  return os.path.abspath(args.out)


def main(argv=None):
  _LOG.setLevel(logging.INFO)                 # progress lines, not orbax's INFO chatter
  if not logging.getLogger().handlers:
    logging.basicConfig(format="%(asctime)s %(message)s")
  args = _parser().parse_args(argv)
  try:
    out = run(args)
  except (SampleError, FileNotFoundError, convert.ConversionError) as e:
    print(f"sample: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
