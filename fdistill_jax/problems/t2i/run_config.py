r"""The settings SD 1.5 and SDXL text-to-image configs share (configs/sd15.py, configs/sdxl.py).

Each config file sets its Table 5 column (batch, fake-score frequency, GAN
weight, discriminator resolution, iterations, CFG, learning rate) and its
teacher; everything else is here, once:

* bf16 compute with float32 parameters, `nn.remat` on the U-Net blocks,
  weight decay 1e-2, DMD2's discriminator heads;
* SD's own clock (`fdistill_jax.train.noise`): the f-distill term draws DDPM
  timesteps uniformly in [20, 980], the fake score and the GAN in [0, 999]
  (DMD2's ranges), mapped to sigma on SD's scaled-linear schedule (SDXL's too:
  sigma in [0.0292, 14.61]); stage-1 bins are ten equal-width bins of t
  (FastGen's bins of its time t). The generator maps sigma_max z to a clean
  latent (pure noise at t = 999);
* the references' SD recipe: fake-score loss FastGen's unweighted x0-MSE
  (`fake_score_pred_type='x0'` of its SD 1.5 config; configs/sdxl.py sets
  DMD2's and FastGen-SDXL's eps-MSE, `loss.fake_score_weighting=eps`), no EMA copy (FastGen's SD configs and
  DMD2's SD training keep none; `--config.ema_decays='(0.9999,)'` adds one),
  R1 off as in FastGen's SD configs (`loss.r1_gamma` > 0 turns it on:
  `loss.r1_form=approx` is FastGen's form, 'exact' the EDM configs' one);
* js / fkl runs started without `init_from` say how the paper warm-starts
  (Sec. 5: from a reverse-KL run; `warm_start_advised`);
* data: image-text WebDataset shards (`data.kind='captions'` for prompts only);
* evaluation: 't2i_grid' (`sd.grid`, every `sample_every`; the prompts of the
  paper's figure `grid_figure`: fig7 for SD 1.5, fig1 for SDXL) and 't2i'
  (`sd.t2i_evaluator`, every `eval.fid_every`, off until set);
* `runlocal` (a short run of the real model) and `tiny` (random tiny networks,
  16x16 images, two iterations: tests and smoke runs).
"""

from fdistill_jax.problems.t2i import grid as sd_grid
from fdistill_jax.problems.t2i import run_sampling

SIGMA_MIN = 0.0292       # SD's discrete schedule, t = 0
SIGMA_MAX = 14.6146      # t = 999


def text_to_image(c, *, teacher_kind, teacher_path, resolution, grid_figure):
  """Sets the shared fields of `c` (a `config_lib.base_config()`) in place."""
  c.compute_dtype = "bfloat16"            # parameters stay float32
  c.ema_decays = ()                       # FastGen's SD configs and DMD2 keep no EMA
  c.warm_start_advised = True             # Sec. 5: js / fkl start from an rkl run
  c.loss.r1_gamma = 0.0                   # FastGen's SD configs: R1 off
  c.loss.r1_form = "approx"               # when on: FastGen's MSE of logits at x, x + 0.1 n
  c.loss.clock = "ddpm"                   # SD's own clock (fdistill_jax.train.noise)
  c.loss.t_fdistill = (20, 980)           # DMD2: min/max_step_percent 0.02 / 0.98
  c.loss.t_fake_score = (0, 999)          # DMD2: fake score and GAN on every timestep
  c.loss.t_gan = (0, 999)
  c.loss.fake_score_weighting = "x0"      # FastGen's SD 1.5 config (DMD2, FastGen SDXL: eps)
  c.loss.sigma_min = SIGMA_MIN
  c.loss.sigma_max = SIGMA_MAX
  c.loss.sigma_init = SIGMA_MAX           # the generator's input: pure noise at t = 999
  c.disc.head = "dmd2"
  c.optim.weight_decay = 1e-2
  c.teacher.kind = teacher_kind
  c.teacher.path = teacher_path
  c.teacher.tokenizer = ""                # "" = the teacher folder's tokenizer/
  c.teacher.remat = True                  # nn.remat on every U-Net resnet/transformer block
  c.data.kind = "webdataset"
  c.data.path = ""                        # folder (or one .tar) of img2dataset shards
  c.data.resolution = resolution
  c.data.num_classes = 0
  c.data.caption_key = "caption"          # kind=captions, .jsonl: the prompt's field
  c.eval.evaluators = ("t2i_grid", "t2i")  # teacher | student grids; FID / CLIP score
  c.eval.grid_prompts = sd_grid.paper_prompts(grid_figure)   # the paper's figure's prompts
  c.eval.grid_prompts_file = ""           # a text file, one prompt per line: replaces grid_prompts
  c.eval.grid_steps = 50                  # the teacher column: guided DDIM steps, made once
  c.eval.grid_sampler = "ddim"
  c.eval.grid_cfg = 0.0                   # 0: loss.cfg_weight (the teacher the student matches)
  c.eval.prompts = ""                     # 't2i' (every eval.fid_every): a prompts file (COCO)
  c.eval.num_samples = 5000               # its first N prompts, one image each
  c.eval.clip = ""                        # a transformers CLIPModel folder; "": no CLIP score
  c.eval.batch = run_sampling.DEFAULT_BATCH   # images per jitted sampling call
  c.sample_every = 1000
  c.checkpoint_every = 1000


def runlocal(c):
  """A short run of the real model."""
  c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 10, 8, 5, 10


def tiny(c, *, teacher_kind, arch):
  """Random tiny networks (`arch`), 16x16 images, two iterations (tests and smoke runs)."""
  c.total_steps, c.batch_size, c.fake_score_update_freq = 2, 8, 2
  c.compute_dtype = "float32"
  c.ema_decays = (0.9,)                   # the tests check EMA bookkeeping and which='ema'
  c.loss.gan_weight = 1e-2
  c.loss.num_bins = 4
  c.teacher.kind = teacher_kind
  c.teacher.path = ""
  c.teacher.remat = False
  c.teacher.arch = arch
  c.data.resolution = 16
  c.data.prefetch = 1
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 1, 2, 2
  c.sample_every = 2
  c.eval.grid_prompts = tuple(c.eval.grid_prompts[:2])
  c.eval.grid_steps = 2
