r"""Stable Diffusion (SD 1.x and SDXL) teacher samples from the command line.

The library is `fdistill_jax.pipelines.sd_sampling`; `--model` is an SD 1.x or SDXL
diffusers folder (the family is read from the folder: SDXL has text_encoder_2/)
or an SD 1.x single-file checkpoint.

  python -m fdistill_jax.tools.sample_t2i --model=stable-diffusion-v1-5 \
      --prompt="a photo of an astronaut riding a horse" --steps=50 --cfg=7.5 --out=x.png
  python -m fdistill_jax.tools.sample_t2i --model=DIR --prompts_file=prompts.txt --num_per_prompt=4 \
      --out=grid.png --npz=samples.npz --seed=0
  python -m fdistill_jax.tools.sample_t2i --model=v1-5-pruned-emaonly.safetensors \
      --tokenizer_dir=DIR/tokenizer --prompt="..." --sampler=euler --steps=30 --out=x.png
  python -m fdistill_jax.tools.sample_t2i --model=stable-diffusion-xl-base-1.0 \
      --prompt="a photo of a cat" --height=1024 --width=1024 --cfg=5 --out=x.png

Outputs: a PNG grid (row-major; OUT.txt lists each tile's prompt) and/or an
npz with `images` (uint8 NHWC), `prompt_index`, `prompts` and `seed`. Sample i
(prompt i // num_per_prompt) depends only on (seed, i); see
`fdistill_jax.pipelines.sd_sampling` for the samplers.
"""

import math
import os

from absl import flags

from fdistill_jax import console
from fdistill_jax.io import atomic
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.pipelines import denoisers as denoiser_lib
from fdistill_jax.pipelines import sd as pipeline_lib
from fdistill_jax.pipelines import sd_sampling as sampling
from fdistill_jax.problems.t2i import run_sampling
from fdistill_jax.tools import cli
from fdistill_jax.train.teacher import DTYPES


FLAGS = cli.new_flags()
flags.DEFINE_string("model", None, "diffusers model folder, or a single-file .safetensors/.ckpt.",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", [], "Prompt (repeatable).", flag_values=FLAGS)
flags.DEFINE_string("prompts_file", None, "A .txt (one prompt per line; blank lines "
                    "skipped) or .jsonl ('caption' field) of prompts.", flag_values=FLAGS)
MAX_SIDE = 2048              # pixels; SDXL's native size is 1024
MAX_PER_PROMPT = 10_000
flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.", lower_bound=1,
                     upper_bound=MAX_PER_PROMPT, flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Sampling steps (network evaluations: 2 x steps with CFG).",
                     lower_bound=1, upper_bound=1000, flag_values=FLAGS)
flags.DEFINE_float("cfg", 7.5, "Classifier-free guidance weight (1: none).", flag_values=FLAGS)
flags.register_validator("cfg", lambda w: math.isfinite(w) and 0 <= w <= 100,
                         "--cfg must be a finite guidance weight in [0, 100] (1: none)",
                         flag_values=FLAGS)
flags.DEFINE_enum("sampler", "ddim", sampling.SAMPLERS, "Noise levels: DDIM timesteps or Karras.",
                  flag_values=FLAGS)
flags.DEFINE_enum("timestep", "interpolate", denoiser_lib.TIMESTEP_MODES, "sigma -> timestep.",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed; sample i uses fold_in(PRNGKey(seed), i).",
                     flag_values=FLAGS)
flags.DEFINE_integer("height", 512, "Image height (multiple of 8; SDXL's native size is 1024).",
                     lower_bound=8, upper_bound=MAX_SIDE, flag_values=FLAGS)
flags.DEFINE_integer("width", 512, "Image width (multiple of 8; SDXL's native size is 1024).",
                     lower_bound=8, upper_bound=MAX_SIDE, flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "Samples per jitted call (rounded up to the device count).",
                     flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Compute dtype of the networks.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "PNG grid to write (prompts as captions, and in OUT.txt).",
                    flag_values=FLAGS)
flags.DEFINE_string("npz", None, "npz to write: images (uint8 NHWC), prompt_index, prompts, "
                    "seed.", flag_values=FLAGS)
flags.DEFINE_string("config_dir", None, "Single files: folder with the config.json files.",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace an existing --out / --npz file (never an input "
                  "or a file of a run).", flag_values=FLAGS)
flags.DEFINE_string("tokenizer_dir", None, "Tokenizer folder (default: MODEL/tokenizer).",
                    flag_values=FLAGS)


def check_outputs(f):
  """--out (and its OUT.txt) and --npz: never an input or a file of a run; an existing file
  only with --overwrite; --npz names an .npz. Checked before any model is loaded."""
  inputs = [f.model, f.prompts_file, f.config_dir, f.tokenizer_dir]
  for what, path, suffix in (("--out", f.out, ""), ("--out", f.out and f.out + ".txt", ""),
                             ("--npz", f.npz, ".npz")):
    if not path:
      continue
    if suffix and not path.endswith(suffix):
      raise ValueError(f"{what}={path}: name a {suffix} file.")
    atomic.check_output_file(path, overwrite=f.overwrite, inputs=inputs,
                             protected=ckpt_lib.is_run_workdir, what=what)
  if f.out and f.npz and os.path.abspath(f.out) == os.path.abspath(f.npz):
    raise ValueError(f"--out and --npz are the same file {f.out}; give two paths.")


def main(argv):
  """Samples and writes the outputs."""
  del argv
  if not FLAGS.model:
    raise ValueError("--model is required (a diffusers folder or a checkpoint file).")
  if not (FLAGS.out or FLAGS.npz):
    raise ValueError("give --out=FILE.png and/or --npz=FILE.npz.")
  check_outputs(FLAGS)
  prompts = run_sampling.prompts_from_flags(FLAGS.prompt, FLAGS.prompts_file)
  pipe = pipeline_lib.load_pipeline(FLAGS.model, dtype=DTYPES[FLAGS.dtype],
                                    config_dir=FLAGS.config_dir, tokenizer_dir=FLAGS.tokenizer_dir)
  images, prompt_index = sampling.sample(
      pipe, prompts, num_per_prompt=FLAGS.num_per_prompt, steps=FLAGS.steps, cfg=FLAGS.cfg,
      sampler=FLAGS.sampler, seed=FLAGS.seed, height=FLAGS.height, width=FLAGS.width,
      batch=FLAGS.batch, timestep=FLAGS.timestep)
  run_sampling.write_outputs(images, prompt_index, prompts, FLAGS.seed, FLAGS.out,
                           FLAGS.npz)
  for path in (FLAGS.out, FLAGS.npz):
    if path:
      console.say("wrote %s", os.path.abspath(path))


cli_main = cli.entry_point(main, "sample_t2i", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
