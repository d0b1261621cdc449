r"""Real images on a CPU: scikit-learn's 8x8 handwritten digits, teacher and students.

First train the class-conditional EDM teacher (DDPM++ U-Net, 0.7M parameters,
EDM's loss and preconditioning; 'edm' method of the same engine):

  python -m fdistill_jax.main --config=configs/digits.py:teacher --workdir=runs/digits_teacher

then distil it into a one-step generator with any divergence (or 'no_gan',
'gan_only'):

  python -m fdistill_jax.main --config=configs/digits.py:js --workdir=runs/digits_js \
      --config.teacher.path=runs/digits_teacher

The whole table (held-out floor, teacher with 35 and 1 network calls, every
divergence and both ablations): python -m fdistill_jax.tools.digits_sweep.
Both kinds of run end with the 'digits' evaluator (digits_metrics.json:
classifier-feature FD, precision, recall, class accuracy against the held-out
split). Add 'runlocal' for a CI-sized run (a minute or two of training each).
"""

import ml_collections

from fdistill_jax import config_lib

# DDPM++ (EDM's SongUNet) at the digits' native 8x8: levels 8 and 4, one block each.
ARCH = dict(
    precond="EDMPrecond", model_type="SongUNet", img_resolution=8, img_channels=1,
    label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
    dropout=0.1, embedding_type="positional", encoder_type="standard",
    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js",
                                           extra_tokens=("teacher",))
  c = config_lib.base_config()
  c.data.kind = "digits"
  c.data.split = "train"
  c.data.resolution = 8
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.prefetch = 2
  c.digits = ml_collections.ConfigDict(dict(
      classifier="",          # cache of the evaluation classifier; "": WORKDIR/digits_classifier
      num_samples=0,          # samples per measurement; 0: 4 x the train split (5,752)
      eval_seed=0,            # the evaluation's noise: the same for every run and seed
      eval_every=0))          # iterations between measurements; 0: after the last only
  c.eval.evaluators = ("grid", "digits")
  c.num_sample_images = 100
  c.log_every = 50
  if "teacher" in flags:
    _teacher(c)
  else:
    _student(c)
  if "runlocal" in flags:
    _runlocal(c, "teacher" in flags)
  return config_lib.apply_variant(c, divergence, flags - {"teacher"})


def _teacher(c):
  """EDM training of the teacher (EDM's loss, log-normal sigma, Adam, ramped EMA)."""
  c.method = "edm"
  c.teacher.kind = "init"
  c.teacher.arch = ARCH
  c.total_steps = 3000                 # ~14 min at ~4 it/s on the 2 shared, loaded cores
  c.batch_size = 64
  c.edm.lr = 2e-3
  c.edm.lr_warmup = 200
  c.ema_decays = (0.999,)
  c.sample_every = 1000
  c.checkpoint_every = 500


def _student(c):
  """f-distill of the digits teacher: the image configs' losses, heads, TTUR and EMA."""
  c.teacher.kind = "edm"
  c.teacher.path = ""                  # the teacher run's workdir: --config.teacher.path=DIR
  c.total_steps = 1200                 # 240 generator updates; ~5 min alone on 2 idle cores
  c.digits.eval_every = 200            # the FD curve (5,752 one-step samples: seconds)
  c.batch_size = 64
  c.fake_score_update_freq = 5         # TTUR: 5 critic updates per generator update
  c.ema_decays = (0.995,)              # per iteration (half-life ~140 iterations)
  c.loss.gan_weight = 1e-2
  c.loss.r1_gamma = 0.0
  c.loss.num_bins = 5                  # stage-1 bins: ~13 examples each in a batch of 64
  c.disc.resolutions = (8, 4)          # teacher features at both levels of the U-Net
  c.disc.channels = 64
  c.optim.gen_lr = 2e-4
  c.optim.fake_lr = 2e-4
  c.optim.disc_lr = 2e-4
  c.sample_every = 500
  c.checkpoint_every = 500


def _runlocal(c, teacher):
  c.total_steps = 300 if teacher else 200
  c.batch_size = 64
  c.log_every = 25
  c.sample_every = 0
  c.checkpoint_every = c.total_steps
  c.digits.num_samples = 500
  c.digits.eval_every = 0
  if teacher:
    c.edm.lr_warmup = 50
    c.ema_decays = (0.99,)
    c.edm.sampler_steps = 0            # the test compares one-step samples only
