"""The config schema: defaults, variant tokens, and the one validator.

Experiment files in `configs/` import this module from the installed package
(so `--config=/any/path/configs/toy2d.py` works from any directory). Every
config is `get_config(arg)` with `arg` a comma-separated list of variant
tokens, e.g. "js", "fkl,runlocal", "js,no_gan". Tokens:

  rkl | softened_rkl | js | squared_hellinger | fkl | jeffreys   the divergence
  no_gan     ablation: GAN loss off (f-distill loss only)
  gan_only   ablation: f-distill loss off (adversarial distillation only)
  runlocal   shrink the run to fit a laptop CPU
"""

import difflib
import importlib.util
import os

from flax import traverse_util
import ml_collections

from fdistill_jax import divergences
from fdistill_jax import losses
from fdistill_jax.models import attention as attention_lib

DIVERGENCES = tuple(divergences.DIVERGENCES)
ABLATIONS = ("no_gan", "gan_only")


def set_field(config, dotted, value):
  """config.a.b = value for dotted = 'a.b', as `--config.a.b=value` does (ml_collections'
  `update_from_flattened_dict`); an unknown field is a one-line ValueError naming the nearest
  valid fields. The one dotted setter (tools.sweep's --set, tests)."""
  message = unknown_field(config, dotted)
  if message:
    raise ValueError(message)
  config.update_from_flattened_dict({dotted: value})


def parse_arg(arg, default_divergence, extra_tokens=()):
  """Splits "js,runlocal" into (divergence, set of other tokens); checks names.

  `extra_tokens`: a config file's own variant tokens (e.g. 'cfg5' in configs/sd15.py,
  'teacher' in configs/digits.py).
  """
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  known = set(DIVERGENCES) | set(ABLATIONS) | {"runlocal"} | set(extra_tokens)
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"Unknown config variant(s) {unknown}; valid tokens are "
                     f"{sorted(known)} (comma-separated, e.g. 'js,runlocal').")
  divs = [t for t in tokens if t in DIVERGENCES]
  if len(divs) > 1:
    raise ValueError(f"Config variant names several divergences {divs}; pick one.")
  flags = set(tokens) - set(divs)
  if flags >= set(ABLATIONS):
    raise ValueError("'no_gan' and 'gan_only' together would switch off every loss.")
  return (divs[0] if divs else default_divergence), flags


def load_config_file(spec):
  """`get_config(arg)` of 'path/to/config.py[:arg]', as --config=SPEC loads it (unlocked)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; expected "
                            "PATH.py[:VARIANT], e.g. configs/cifar10.py:fkl.")
  module_spec = importlib.util.spec_from_file_location("fdistill_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def base_config():
  """Defaults every setting starts from; experiment files override them."""
  c = ml_collections.ConfigDict()
  c.method = "fdistill"               # fdistill (distil a teacher) | edm (train one from data)
  c.seed = 0
  c.divergence = "js"
  c.total_steps = 1000
  c.batch_size = 64                   # global batch, all devices and hosts
  c.fake_score_update_freq = 5        # critic updates per generator update
  c.ema_decays = (0.9999, 0.99995, 0.9996)   # per iteration (FastGen); ema:0 samples/exports
  c.student_dropout = 0.0             # dropout of generator and fake score (DMD2/FastGen: 0)
  c.compute_dtype = "float32"
  c.attention = "auto"                # auto | xla (reference) | jax | cudnn | pallas
  c.frozen_dtype = "float32"          # storage of teacher, VAE, text towers (bfloat16: half)
  c.init_from = ""                    # a run's workdir: warm start gen/fake/disc from it
  c.warm_start_advised = False        # js/fkl without init_from: say how the paper warm-starts

  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "edm"              # edm (snapshot/converted dir) | random | toy
  c.teacher.path = ""
  c.teacher.arch = ml_collections.ConfigDict()   # used by kind=random
  c.teacher.allow_mismatch = False    # resume although the teacher differs from the run's

  c.loss = ml_collections.ConfigDict()
  c.loss.fdistill_weight = 1.0
  c.loss.gan_weight = 1e-3
  c.loss.r1_gamma = 0.0
  c.loss.r1_form = "exact"            # exact (||grad||^2, gamma/2) | approx (FastGen: MSE of logits)
  c.loss.r1_alpha = 0.1               # r1_form=approx: the perturbation x + alpha n (FastGen)
  c.loss.time_weighting = "dmd"
  c.loss.normalize_ratio = True
  c.loss.normalize_weight = True
  c.loss.num_bins = 10
  c.loss.logit_clip = 10.0            # clamp of the head-mean logit (FastGen); 0: off
  c.loss.ratio_clip = (0.1, 20.0)     # (lo, hi) clamp of r before stage 1 (FastGen); (): off
  c.loss.ratio_ema_rate = 0.0         # running per-bin mean of r for stage 1 (FastGen IN64: 0.5)
  c.loss.bin_spacing = losses.DEFAULT_BIN_SPACING   # clock=karras: bins of sigma (linear) | log
  c.loss.clock = "karras"             # noise levels: karras (EDM teachers) | ddpm (SD 1.5, SDXL)
  c.loss.t_fdistill = (20, 980)       # clock=ddpm: DDPM timesteps drawn, inclusive (DMD2)
  c.loss.t_fake_score = (0, 999)
  c.loss.t_gan = (0, 999)
  c.loss.ddpm = ml_collections.ConfigDict({   # clock=ddpm: the teacher's scheduler (SD's)
      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "num_train_timesteps": 1000})
  c.loss.sigma_init = 80.0            # generator input noise level
  c.loss.sigma_min = 0.002
  c.loss.sigma_max = 80.0
  c.loss.num_sigmas = 1000            # Karras schedule for the f-distill and GAN terms
  c.loss.min_index = 2                # FastGen: min/max_step_percent 0.002 / 0.998
  c.loss.max_index = 998
  c.loss.fake_sigma = "karras"        # fake-score sigma: karras (as the gen loss) | lognormal
  c.loss.fake_score_weighting = "edm"  # fake-score loss: edm (lambda) | x0 (FastGen) | eps (DMD2)
  c.loss.p_mean = -1.2                # EDM log-normal (loss.fake_sigma="lognormal")
  c.loss.p_std = 1.2
  c.loss.cfg_weight = 1.0             # 1: no classifier-free guidance

  c.disc = ml_collections.ConfigDict()
  c.disc.resolutions = (8,)
  c.disc.channels = 256
  c.disc.features_from = "teacher"    # teacher | fake_score (DMD2: GAN loss trains its encoder)
  c.disc.head = "dmd2"                # dmd2 (DMD2/FastGen head, as wide as the feature) | light
  c.disc.fake_score_gan_weight = 1e-2  # features_from=fake_score: GAN weight on the fake score

  c.optim = ml_collections.ConfigDict()
  c.optim.gen_lr = 1e-4
  c.optim.fake_lr = 1e-4
  c.optim.disc_lr = 1e-4
  c.optim.lr_decay_step = 0           # >0: multiply every lr by lr_decay_factor from this step
  c.optim.lr_decay_factor = 1.0
  c.optim.weight_decay = 1e-2
  c.optim.b1 = 0.9                    # AdamW as in DMD2
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 10.0            # global-norm clip of the generator; 0: off
  c.optim.clip_critic = False         # also clip fake score and heads (DMD2); FastGen: off

  c.data = ml_collections.ConfigDict()
  c.data.kind = "tfds"
  c.data.name = "cifar10"
  c.data.split = "train"
  c.data.data_dir = ""                # "" = TFDS's default directory
  c.data.path = ""                    # kind=edm: dataset_tool.py zip or folder
  c.data.resolution = 32
  c.data.channels = 3
  c.data.num_classes = 10
  c.data.seed = 0
  c.data.prefetch = 2
  c.data.cache = False                # tfds / edm: decode the whole dataset into memory once
  c.data.num_threads = 8              # threads that read and decode examples
  c.data.image_key = "image"          # tfds feature names
  c.data.label_key = "label"
  c.data.skip_unreadable = False      # edm: skip (and count) corrupt images instead of stopping

  c.edm = ml_collections.ConfigDict()   # method=edm: EDM training of the teacher network
  c.edm.lr = 1e-3                     # Adam learning rate (EDM: 1e-3 for CIFAR-10)
  c.edm.lr_warmup = 0                 # iterations of linear learning-rate ramp-up
  c.edm.ema_rampup = 0.05             # EMA half-life <= this x iterations done (EDM); 0: off
  c.edm.sampler_steps = 18            # Heun steps of the evaluators' teacher samples; 0: none

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                     # >1: shard params/opt states over this many devices

  c.log_every = 100
  c.sample_every = 1000               # PNG grid of one-step samples
  c.num_sample_images = 64
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval = ml_collections.ConfigDict()
  c.eval.evaluators = ("grid", "fid")  # registry evaluator names (fdistill_jax.plugins)
  c.eval.fid_every = 0                # >0: periodic FID (needs eval.inception and eval.ref)
  c.eval.num_samples = 10000
  c.eval.inception = ""
  c.eval.ref = ""
  return c


def apply_variant(c, divergence, flags):
  """Applies the divergence and ablation tokens to a config in place."""
  c.divergence = divergence
  if "no_gan" in flags:
    c.loss.gan_weight = 0.0
  if "gan_only" in flags:
    c.loss.fdistill_weight = 0.0
  return c


def _check(ok, msg):
  if not ok:
    raise ValueError(msg)


def validate(config, num_devices, process_count=1):
  """Fails before any teacher is loaded or anything compiles, saying what to change."""
  b = config.batch_size
  _check(b > 0 and b % num_devices == 0,
         f"batch_size={b} does not divide the {num_devices} devices; set "
         f"--config.batch_size to a multiple of {num_devices}.")
  _check(b % process_count == 0,
         f"batch_size={b} does not divide the {process_count} processes.")
  _check(config.mesh.fsdp >= 1 and num_devices % config.mesh.fsdp == 0,
         f"mesh.fsdp={config.mesh.fsdp} must be >= 1 and divide the {num_devices} devices.")
  divergences.get_divergence(config.divergence)   # ValueError listing the names
  attention_lib.check_setting(config.get("attention", "auto"))
  _check(config.get("frozen_dtype", "float32") in ("float32", "bfloat16"),
         f"frozen_dtype={config.get('frozen_dtype')!r}; expected 'float32' or 'bfloat16'.")
  _check(config.total_steps > 0, f"total_steps={config.total_steps} must be positive.")
  _check(config.fake_score_update_freq >= 1,
         f"fake_score_update_freq={config.fake_score_update_freq} must be >= 1.")
  for name in ("gen_lr", "fake_lr", "disc_lr"):
    _check(config.optim[name] > 0, f"optim.{name}={config.optim[name]} must be positive.")
  _check(config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0.")
  lc = config.loss
  for name in ("fdistill_weight", "gan_weight", "r1_gamma"):
    _check(lc[name] >= 0, f"loss.{name}={lc[name]} must be >= 0.")
  _check(lc.fdistill_weight > 0 or lc.gan_weight > 0,
         "loss.fdistill_weight and loss.gan_weight are both 0: nothing would train.")
  losses.check_sigma_indices(lc.num_sigmas, lc.min_index, lc.max_index)
  _check(0 < lc.sigma_min < lc.sigma_max, "need 0 < loss.sigma_min < loss.sigma_max.")
  _check(lc.time_weighting in ("dmd", "none"),
         f"loss.time_weighting={lc.time_weighting!r}; expected 'dmd' or 'none'.")
  _check(config.disc.features_from in ("teacher", "fake_score"),
         f"disc.features_from={config.disc.features_from!r}; expected 'teacher' or 'fake_score'.")
  _check(len(config.disc.resolutions) > 0, "disc.resolutions is empty.")
  _validate_recipe(config)
  ec = config.eval
  _check(ec.fid_every <= 0 or (ec.inception and ec.ref)
         or (ec.get("clip") and "fid" not in ec.evaluators),
         "eval.fid_every > 0 needs eval.inception (Inception weights) and eval.ref "
         "(reference statistics .npz), or for text-to-image runs eval.clip alone (CLIP "
         "score); set them or set eval.fid_every=0.")
  _check(all(0 <= d < 1 for d in config.ema_decays),
         f"ema_decays={tuple(config.ema_decays)} must each lie in [0, 1).")
  _check_safety(config)
  if "edm" in config:
    _validate_edm(config.edm)


def _check_safety(config):
  """Settings that would lose checkpoints or divide by zero (issue: no path loses work)."""
  lc = config.loss
  _check(isinstance(lc.num_bins, int) and lc.num_bins >= 1,
         f"loss.num_bins={lc.num_bins} must be an integer >= 1 (the ratio normalisation "
         "averages over this many sigma bins).")
  _check(0 < lc.sigma_init < float("inf"),
         f"loss.sigma_init={lc.sigma_init} must be a positive finite noise level (the "
         "generator's input is sigma_init * z; EDM's sigma_max is 80).")
  _check(isinstance(config.keep_checkpoints, int) and config.keep_checkpoints >= 1,
         f"keep_checkpoints={config.keep_checkpoints} must be >= 1: 0 would delete every "
         "checkpoint. To keep them all, set a number above total_steps / checkpoint_every.")
  _check(config.checkpoint_every >= 0,
         f"checkpoint_every={config.checkpoint_every} must be >= 0 (0: only at the end).")


def _validate_recipe(config):
  """Checks of the recipe fields (clamps, running mean, fake-score sigma, heads, dropout)."""
  lc = config.loss
  _check(lc.logit_clip >= 0, f"loss.logit_clip={lc.logit_clip} must be >= 0 (0: off).")
  clip = tuple(lc.ratio_clip)
  _check(clip == () or (len(clip) == 2 and 0 < clip[0] < clip[1]),
         f"loss.ratio_clip={clip}; expected (lo, hi) with 0 < lo < hi, or () for off.")
  _check(0 <= lc.ratio_ema_rate < 1,
         f"loss.ratio_ema_rate={lc.ratio_ema_rate} must lie in [0, 1).")
  _check(lc.bin_spacing in losses.BIN_SPACINGS,
         f"loss.bin_spacing={lc.bin_spacing!r}; expected one of {losses.BIN_SPACINGS}.")
  _check(lc.fake_sigma in ("karras", "lognormal"),
         f"loss.fake_sigma={lc.fake_sigma!r}; expected 'karras' or 'lognormal'.")
  _check(lc.fake_score_weighting in losses.FAKE_SCORE_WEIGHTINGS,
         f"loss.fake_score_weighting={lc.fake_score_weighting!r}; expected one of "
         f"{losses.FAKE_SCORE_WEIGHTINGS}.")
  _check(lc.r1_form in ("exact", "approx") and lc.r1_alpha > 0,
         f"loss.r1_form={lc.r1_form!r}, loss.r1_alpha={lc.r1_alpha}; expected 'exact' or "
         "'approx' and alpha > 0.")
  _validate_clock(lc)
  _check(0 <= config.student_dropout < 1,
         f"student_dropout={config.student_dropout} must lie in [0, 1).")
  _check(config.disc.head in ("dmd2", "light"),
         f"disc.head={config.disc.head!r}; expected 'dmd2' or 'light'.")
  _check(config.disc.fake_score_gan_weight >= 0,
         f"disc.fake_score_gan_weight={config.disc.fake_score_gan_weight} must be >= 0.")


def _validate_clock(lc):
  """loss.clock and, for 'ddpm', its timestep ranges and schedule."""
  _check(lc.clock in ("karras", "ddpm"),
         f"loss.clock={lc.clock!r}; expected 'karras' (EDM teachers) or 'ddpm' "
         "(discrete-time teachers: SD 1.5, SDXL).")
  if lc.clock != "ddpm":
    return
  num = lc.ddpm.num_train_timesteps
  for name in ("t_fdistill", "t_fake_score", "t_gan"):
    r = tuple(lc[name])
    _check(len(r) == 2 and 0 <= r[0] <= r[1] < num,
           f"loss.{name}={r}; expected (lo, hi) with 0 <= lo <= hi < {num} (DDPM timesteps).")
  _check(lc.bin_spacing == "linear",
         f"loss.bin_spacing={lc.bin_spacing!r} with loss.clock='ddpm': the stage-1 bins are "
         "equal-width in the timestep t (FastGen); set --config.loss.bin_spacing=linear.")


def _validate_edm(ec):
  """Checks of the method=edm fields (teacher training)."""
  _check(ec.lr > 0, f"edm.lr={ec.lr} must be positive.")
  _check(ec.lr_warmup >= 0, f"edm.lr_warmup={ec.lr_warmup} must be >= 0 (0: no ramp-up).")
  _check(ec.ema_rampup >= 0, f"edm.ema_rampup={ec.ema_rampup} must be >= 0 (0: off).")
  _check(ec.sampler_steps == 0 or ec.sampler_steps >= 2,
         f"edm.sampler_steps={ec.sampler_steps}: EDM's Heun sampler needs >= 2 steps (0: none).")


def flat_scalars(config):
  """{'loss.gan_weight': 0.001, ...}: the config's scalar fields, flattened (hparams)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}



_DICTS = (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)


def field_names(config, leaves_only=False):
  """Every field of a config as a dotted name ('seed', 'loss', 'loss.gan_weight', ...).

  With `leaves_only`, the sections ('loss') are left out; an empty section
  ('teacher.arch' of a config that sets none) counts as a leaf.
  """
  paths = traverse_util.flatten_dict(config.to_dict(), keep_empty_nodes=True)
  names = {".".join(p) for p in paths}
  if not leaves_only:
    names |= {".".join(p[:i]) for p in paths for i in range(1, len(p))}
  return sorted(names)


def unknown_field(config, dotted):
  """None when `dotted` ('loss.gan_weight') names a field of `config`; else a one-line
  error naming the nearest valid fields (every field is listed in docs/config.md)."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, _DICTS) or part not in node:
      break
    node = node[part]
  else:
    return None
  names = field_names(config, leaves_only=True)
  last = dotted.rsplit(".", 1)[-1]
  by_last = {}
  for name in names:
    by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
  near = difflib.get_close_matches(dotted, names, n=4, cutoff=0.6)
  for key in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.75):
    near += by_last[key]
  near = list(dict.fromkeys(near))[:5]
  hint = f"nearest: {', '.join(near)}" if near else "no field has a similar name"
  return (f"unknown config field {dotted!r} ({hint}); every field is listed in "
          "docs/config.md.")


def summary(config):
  """One line for the console: what this run is, at a glance."""
  if config.get("method", "fdistill") == "edm":
    return (f"EDM training of teacher {config.teacher.kind} | {config.total_steps} iterations "
            f"x batch {config.batch_size} | data {config.data.kind} | lr {config.edm.lr:g}, "
            f"warm-up {config.edm.lr_warmup} | EMA {tuple(config.ema_decays)} | evaluators "
            f"{','.join(config.eval.evaluators)}")
  return (f"{config.divergence} | {config.total_steps} iterations x batch {config.batch_size}"
          f" | generator step every {config.fake_score_update_freq} | teacher "
          f"{config.teacher.kind}{':' + config.teacher.path if config.teacher.path else ''}"
          f" | data {config.data.kind}"
          f" | lr {config.optim.gen_lr:g}/{config.optim.fake_lr:g}/{config.optim.disc_lr:g}"
          f" | loss weights f-distill {config.loss.fdistill_weight:g}, GAN "
          f"{config.loss.gan_weight:g} | evaluators {','.join(config.eval.evaluators)}")
