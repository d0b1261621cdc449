"""Pieces shared by the experiment configs.

Every config is `get_config(arg)` with `arg` a comma-separated list of
variant tokens, e.g. "js", "fkl,runlocal", "js,no_gan". Tokens:

  rkl | softened_rkl | js | squared_hellinger | fkl | jeffreys   the divergence
  no_gan     ablation: GAN loss off (f-distill loss only)
  gan_only   ablation: f-distill loss off (adversarial distillation only)
  runlocal   shrink the run to fit a laptop CPU
"""

import ml_collections

DIVERGENCES = ("rkl", "softened_rkl", "js", "squared_hellinger", "fkl", "jeffreys")
ABLATIONS = ("no_gan", "gan_only")


def parse_arg(arg, default_divergence):
  """Splits "js,runlocal" into (divergence, set of other tokens); checks names."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  known = set(DIVERGENCES) | set(ABLATIONS) | {"runlocal"}
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


def base_config():
  """Defaults every setting starts from; experiment files override them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.divergence = "js"
  c.total_steps = 1000
  c.batch_size = 64                   # global batch, all devices and hosts
  c.fake_score_update_freq = 5        # critic updates per generator update
  c.ema_decays = (0.9999,)
  c.compute_dtype = "float32"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "edm"              # edm (snapshot/converted dir) | random | toy
  c.teacher.path = ""
  c.teacher.arch = ml_collections.ConfigDict()   # used by kind=random

  c.loss = ml_collections.ConfigDict()
  c.loss.fdistill_weight = 1.0
  c.loss.gan_weight = 1e-3
  c.loss.r1_gamma = 0.0
  c.loss.time_weighting = "dmd"
  c.loss.normalize_ratio = True
  c.loss.normalize_weight = True
  c.loss.num_bins = 10
  c.loss.logit_clip = 0.0             # 0: off
  c.loss.ratio_clip = 0.0             # 0: off
  c.loss.sigma_init = 80.0            # generator input noise level
  c.loss.sigma_min = 0.002
  c.loss.sigma_max = 80.0
  c.loss.num_sigmas = 1000            # Karras schedule for the f-distill and GAN terms
  c.loss.min_index = 20
  c.loss.max_index = 980
  c.loss.p_mean = -1.2                # EDM log-normal, fake-score denoising loss
  c.loss.p_std = 1.2
  c.loss.cfg_weight = 1.0             # 1: no classifier-free guidance

  c.disc = ml_collections.ConfigDict()
  c.disc.resolutions = (8,)
  c.disc.channels = 256
  c.disc.features_from = "teacher"    # teacher | fake_score (DMD2's choice)

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
  c.optim.grad_clip = 10.0            # global-norm clip; 0: off

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

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1                     # >1: shard params/opt states over this many devices

  c.log_every = 100
  c.sample_every = 1000               # PNG grid of one-step samples
  c.num_sample_images = 64
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval = ml_collections.ConfigDict()
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
