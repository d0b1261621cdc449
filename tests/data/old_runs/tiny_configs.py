"""The configs of the runs in this folder: configs/toy2d.py:js and configs/digits.py:teacher,
shrunk so that a checkpoint takes kilobytes. get_config("toy") or get_config("digits")."""

import copy

from configs import digits
from configs import toy2d


def get_config(arg):
  if arg == "toy":
    c = toy2d.get_config("js")
    c.toy.update(width=16, depth=2, fit_steps=20, fit_batch=64)
    c.disc.resolutions, c.disc.channels = (0, 1), 8
    c.fake_score_update_freq = 2
  elif arg == "digits":
    c = digits.get_config("teacher")
    c.teacher.arch = dict(copy.deepcopy(digits.ARCH), model_channels=8, channel_mult=[1],
                          dropout=0.0)   # deep: FrozenConfigDict refuses a list held twice
    c.edm.lr_warmup, c.edm.sampler_steps = 2, 0
    c.ema_decays = (0.9,)
  else:
    raise ValueError(f"get_config({arg!r}): expected 'toy' or 'digits'.")
  c.total_steps, c.checkpoint_every, c.batch_size = 6, 3, 16
  c.sample_every, c.log_every, c.num_sample_images = 0, 50, 4
  # A 2x2 sample grid at the end: an empty tuple here and the digits' empty
  # attn_resolutions would be the same object, which FrozenConfigDict refuses.
  c.eval.evaluators = ("grid",)
  return c
