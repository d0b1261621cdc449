r"""One-step samples of a distilled generator, teacher samples, and generator export.

  # 50k samples of the EMA generator of a run (uint8 NHWC 'images' + 'labels')
  python -m fdistill_jax.tools.sample --workdir=DIR --num=50000 --out=samples.npz \
      --grid=grid.png
  # raw weights / the second EMA copy, a fixed checkpoint, chosen classes
  python -m fdistill_jax.tools.sample --workdir=DIR --which=raw --step=200000 \
      --labels=0,3,7 --num=64 --out=s.npz
  # the generator alone (EMA weights): spec + orbax params + export.json
  python -m fdistill_jax.tools.sample --workdir=DIR --export=generators/cifar10_js
  python -m fdistill_jax.tools.sample --workdir=generators/cifar10_js --num=50000 --out=s.npz
  # a text-to-image (sd15 or sdxl) run: one image per prompt (x4), the npz and a captioned grid
  python -m fdistill_jax.tools.sample --workdir=DIR --prompt="a photo of a cat" \
      --prompts_file=prompts.txt --num_per_prompt=4 --out=samples.npz --grid=grid.png
  # the EDM teacher with EDM's Heun sampler, same output format
  python -m fdistill_jax.tools.sample --teacher=teachers/cifar10 --teacher_preset=cifar10 \
      --num=50000 --out=teacher.npz
  # a plain state dict needs its architecture (EDMPrecond kwargs as JSON)
  python -m fdistill_jax.tools.sample --teacher=weights.npz --arch=arch.json --num=64 --out=t.npz

Sample i of seed s uses the noise and label of `fdistill_jax.pipelines.sampling`
(fold_in(PRNGKey(s), i)): the same images whatever the batch size or device
count. `--labels=3` gives every sample class 3; `--labels=0,3,7` cycles.
Unconditional models get label -1. The toy generator writes float32 `samples`
[N, 2] instead of `images`, and its --grid is a scatter plot.

Text-to-image runs (generator kind 'sd15' or 'sdxl') take prompts instead of labels and
--num: image i shows prompt i // num_per_prompt, from the noise of (seed, i)
(`fdistill_jax.problems.t2i.run_sampling`; the run's teacher supplies the text tower
and the VAE). The npz has `images` (uint8 NHWC), `prompt_index`, `prompts`
and `seed`, as `tools.sample_t2i` writes, and --grid captions each tile with
its prompt (prompts also in GRID.txt). An exported text-to-image generator holds the
U-Net alone and is sampled from its training workdir instead.
"""

import os

from absl import flags
import numpy as np

from fdistill_jax.data import pixels
from fdistill_jax.pipelines import edm_sampler
from fdistill_jax.metrics import figures
from fdistill_jax.pipelines import sampling
from fdistill_jax.io import atomic
from fdistill_jax.loaders import edm
from fdistill_jax.tools import cli
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax import console
from fdistill_jax import plugins

FLAGS = cli.new_flags()
flags.DEFINE_string("workdir", None, "Training workdir or exported generator directory.", flag_values=FLAGS)
flags.DEFINE_string("teacher", None, "Sample this EDM teacher (snapshot .pkl or converted "
                    "directory) with the Heun sampler instead of a generator.", flag_values=FLAGS)
flags.DEFINE_string("arch", None, "--teacher is a plain state dict (.npz, .pt, .pth, "
                    ".safetensors): its EDMPrecond kwargs as JSON (like tools.convert's --arch).",
                    flag_values=FLAGS)
flags.DEFINE_string("export", None, "Write the generator alone to this directory and exit.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "--export: replace a directory this tool exported before; "
                  "--out / --grid: replace an existing file (never an input or a file of a "
                  "run).", flag_values=FLAGS)
flags.DEFINE_integer("num", 50000, "Number of samples.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output .npz.", flag_values=FLAGS)
flags.DEFINE_string("grid", None, "Optional PNG of the first 64 samples (toy: scatter plot).", flag_values=FLAGS)
flags.DEFINE_string("which", "ema", "ema (first EMA copy; raw if the run keeps none) | ema:K | raw.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).", flag_values=FLAGS)
flags.DEFINE_string("labels", "uniform", "uniform | a class index | e.g. 0,3,7.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the noise and labels.", flag_values=FLAGS)
flags.DEFINE_integer("batch", None, "Global batch (all devices); default 256, 16 for "
                     "text-to-image runs.", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", [], "Text-to-image runs: a prompt (repeatable).",
                          flag_values=FLAGS)
flags.DEFINE_string("prompts_file", None, "Text-to-image runs: a .txt (one prompt per line) or .jsonl "
                    "of prompts.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_per_prompt", 1, "Text-to-image runs: images per prompt.",
                     upper_bound=10_000, flag_values=FLAGS)
flags.DEFINE_enum("teacher_preset", "cifar10", sorted(edm_sampler.EDM_SAMPLER_PRESETS),
                  "EDM sampler settings for --teacher.", flag_values=FLAGS)
flags.DEFINE_integer("num_steps", None, "Override the preset's number of steps.", flag_values=FLAGS)


def save_grid(path, x, labels, spec=None, max_images=64, registry=None):
  """PNG of the first images (uint8 NHWC), or the generator kind's own plot of other samples
  (the registry's `plots`: the toy's scatter over its mixture)."""
  if x.ndim == 4:
    shown = labels[:max_images] if labels is not None and np.all(labels >= 0) else None
    return figures.save_image_grid(x[:max_images], path, labels=shown,
                                   title=f"samples 0-{min(len(x), max_images) - 1}")
  registry = registry or plugins.default_registry()
  kind = (spec or {}).get("kind")
  if kind not in registry.plots:
    raise ValueError(f"--grid: samples of shape {x.shape[1:]} are not images and generator "
                     f"kind {kind!r} has no plot; drop --grid.")
  return registry.plots[kind](path, x, labels, spec)


def write_samples(out, x, labels, grid=None, spec=None):
  """`images` (uint8 NHWC) or `samples` (float32 [N, 2]) plus int `labels` to npz."""
  key = "images" if x.ndim == 4 else "samples"
  atomic.write_npz(out, **{key: x, "labels": labels.astype(np.int32)})
  if grid:
    save_grid(grid, x, labels, spec)


def sample_generator(workdir, num, *, which="ema", step=None, labels="uniform", seed=0,
                     batch=256, registry=None):
  """(x, labels, spec) of the generator in a workdir or export directory (its module built
  by `registry`, default `plugins.default_registry()`)."""
  registry = registry or plugins.default_registry()
  module, params, info = ckpt_lib.load_generator(
      workdir, which=which, step=step, student_from_spec=registry.student_from_spec)
  classes = sampling.parse_labels(labels, info["num_classes"])
  console.say("Sampling %s weights of step %s (%s).", info["which"], info["step"],
              info["source"])
  images = len(info["sample_shape"]) == 3
  x, y = sampling.generate_samples(
      module, params, num, sample_shape=info["sample_shape"], num_classes=info["num_classes"],
      sigma_init=info["sigma_init"], seed=seed, batch=batch, classes=classes,
      postprocess=pixels.to_uint8 if images else None)
  return x, y, info["spec"]


def sample_teacher(teacher, num, *, preset="cifar10", num_steps=None, labels="uniform",
                   seed=0, batch=256, arch=None):
  """(x, labels) of an EDM teacher with EDM's Heun sampler.

  `arch` (EDMPrecond kwargs: a JSON path or a mapping) is needed for plain
  state dicts, which record no architecture.
  """
  kwargs = sampling.sampler_settings(preset, num_steps)
  if not os.path.exists(teacher):
    raise FileNotFoundError(f"Teacher {teacher!r} does not exist: expected an EDM snapshot "
                            "(.pkl) or a directory written by fdistill_jax.tools.convert.")
  if arch is not None and not isinstance(arch, dict) and not os.path.isfile(arch):
    raise FileNotFoundError(f"--arch={arch!r} does not exist: expected a JSON file of "
                            "EDMPrecond kwargs.")
  console.say("Loading the teacher %s ...", teacher)
  module, variables = edm.load_edm(teacher, arch=arch)
  classes = sampling.parse_labels(labels, int(module.label_dim))
  return sampling.teacher_samples(module, variables, num, sampler_kwargs=kwargs, seed=seed,
                                  batch=batch, classes=classes, postprocess=pixels.to_uint8)


def check_outputs(f):
  """--out and --grid: never an input or a file of a run; an existing file only with
  --overwrite (checked before any sampling)."""
  inputs = [f.workdir, f.teacher, f.arch, f.prompts_file]
  for name in ("out", "grid"):
    if f[name].value:
      atomic.check_output_file(f[name].value, overwrite=f.overwrite, inputs=inputs,
                               protected=ckpt_lib.is_run_workdir, what=f"--{name}")


def run(f=FLAGS):
  """Export, or sample the generator / teacher into --out (checked before any work)."""
  if bool(f.workdir) == bool(f.teacher):
    raise ValueError("Give exactly one of --workdir (generator) and --teacher (EDM teacher).")
  if f.arch and not f.teacher:
    raise ValueError("--arch describes a --teacher state dict; a generator's workdir records "
                     "its own architecture (generator_spec.json).")
  if f.export:
    if f.teacher:
      raise ValueError("--export writes a generator: use it with --workdir, not --teacher.")
    return ckpt_lib.export_generator(f.workdir, f.export, which=f.which, step=f.step,
                                     overwrite=f.overwrite)
  if not f.out:
    raise ValueError("--out=PATH.npz is required (or --export=OUT_DIR).")
  check_outputs(f)
  registry = plugins.default_registry()
  kind = ckpt_lib.generator_kind(f.workdir) if f.workdir else None
  if kind in registry.samplers:          # sampled its own way (text-to-image: prompts)
    return registry.samplers[kind](f, registry)
  if f.prompt or f.prompts_file:
    raise ValueError("--prompt/--prompts_file are for text-to-image runs (generator kind "
                     "'sd15'); this model is conditioned on class labels: use --labels and "
                     "--num (tools.sample_t2i samples an SD model itself).")
  batch = 256 if f.batch is None else f.batch
  if f.num <= 0 or batch <= 0:
    raise ValueError(f"--num={f.num} and --batch={batch} must both be positive.")
  common = dict(labels=f.labels, seed=f.seed, batch=batch)
  if f.teacher:
    (x, y), spec = sample_teacher(f.teacher, f.num, preset=f.teacher_preset,
                                  num_steps=f.num_steps, arch=f.arch, **common), None
  else:
    x, y, spec = sample_generator(f.workdir, f.num, which=f.which, step=f.step, **common)
  write_samples(f.out, x, y, f.grid, spec)
  return os.path.abspath(f.out)


def main(argv):
  del argv
  print(f"wrote {run()}")
  if FLAGS.grid and not FLAGS.export:
    print(f"wrote {os.path.abspath(FLAGS.grid)}")


cli_main = cli.entry_point(main, "sample", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
