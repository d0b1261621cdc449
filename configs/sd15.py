r"""Text-to-image: one-step Stable Diffusion v1.5 (paper Table 5, SD1.5 column; App. D).

  python -m fdistill_jax.main --config=configs/sd15.py:js --workdir=runs/sd15_js \
      --config.teacher.path=/path/to/stable-diffusion-v1-5 \
      --config.data.path=/path/to/coyo_shards

Teacher: a diffusers SD 1.5 folder (unet/, text_encoder/, vae/, scheduler/,
tokenizer/). Data: image-text WebDataset shards as img2dataset writes them
(`NNNNN.jpg` + `NNNNN.txt` per example), center-cropped and resized to 512;
or a captions-only file (`--config.data.kind=captions`, for `rkl,no_gan`).

Table 5: batch 1024, fake-score update frequency 10, GAN weight 1e-3, heads on
the frozen teacher U-Net's 8x8 features (the last down block of 64x64
latents), 60k iterations, CFG 1.75 on the teacher's score in the f-distill
term (`cfg5`: 5), Adam lr 1e-5 with weight decay 1e-2, R1 gamma 1. The paper's
warm start (Sec. 5) is `--config.init_from=RUN_DIR` of an `rkl` run.

Noise levels: SD's discrete schedule spans sigma in [0.0292, 14.61]; the
generator maps sigma_max z to a clean latent, and the f-distill / GAN / fake
score noise levels are the Karras schedule on that range (this engine's
choice; DMD2 samples discrete timesteps uniformly in [20, 980]).

Evaluation: 't2i_grid' every `sample_every` = 1000 iterations: fixed prompts, the frozen
teacher's 50-step guided DDIM image beside the one-step student's (fdistill_jax/sd/grid.py;
`python -m fdistill_jax.tools.sample --workdir=DIR --prompt=...` samples a run); 't2i'
every `eval.fid_every` iterations (0 here: set it with eval.prompts and eval.ref /
eval.inception and/or eval.clip): FID and CLIP score of one-step images of
`eval.num_samples` prompts (fdistill_jax/sd/t2i_evaluator.py).

Variants: any divergence, 'no_gan' / 'gan_only', 'cfg5' (CFG 5), 'runlocal'
(a short run of the real model), 'tiny' (random tiny SD networks for tests:
set teacher.tokenizer to a CLIP tokenizer folder and data.path to shards of
16x16 images).
"""

from fdistill_jax import config_lib
from fdistill_jax.sd import grid as sd_grid

EXTRA_TOKENS = ("cfg5", "tiny")
# Tiny random SD networks (tests): 8x8 latents of 16x16 images, U-Net features at 8 and 4.
TINY_ARCH = {
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 16, "attention_head_dim": 2, "in_channels": 4,
             "out_channels": 4},
    "vae": {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
            "norm_num_groups": 4, "latent_channels": 4},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": 49407},
}


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js",
                                           extra_tokens=EXTRA_TOKENS)
  c = config_lib.base_config()
  c.total_steps = 60_000
  c.batch_size = 1024
  c.fake_score_update_freq = 10
  c.compute_dtype = "bfloat16"            # parameters stay float32
  c.loss.gan_weight = 1e-3
  c.loss.r1_gamma = 1.0
  c.loss.cfg_weight = 5.0 if "cfg5" in flags else 1.75
  c.loss.sigma_min = 0.0292               # SD 1.5's discrete schedule, t = 0 .. 999
  c.loss.sigma_max = 14.6146
  c.loss.sigma_init = 14.6146             # the generator's input: pure noise at t = 999
  c.disc.resolutions = (8,)
  c.disc.head = "dmd2"
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 1e-5
  c.optim.weight_decay = 1e-2
  c.teacher.kind = "sd15"
  c.teacher.path = "stable-diffusion-v1-5"
  c.teacher.tokenizer = ""                # "" = the teacher folder's tokenizer/
  c.teacher.remat = True                  # nn.remat on every U-Net resnet/transformer block
  c.data.kind = "webdataset"
  c.data.path = ""                        # folder (or one .tar) of img2dataset shards
  c.data.resolution = 512
  c.data.num_classes = 0
  c.data.caption_key = "caption"          # kind=captions, .jsonl: the prompt's field
  c.eval.evaluators = ("t2i_grid", "t2i")  # teacher | student grids; FID / CLIP score
  c.eval.grid_prompts = sd_grid.DEFAULT_PROMPTS   # COCO-2014 captions (fdistill_jax/sd/grid.py)
  c.eval.grid_prompts_file = ""           # a text file, one prompt per line: replaces grid_prompts
  c.eval.grid_steps = 50                  # the teacher column: guided DDIM steps, made once
  c.eval.grid_sampler = "ddim"
  c.eval.grid_cfg = 0.0                   # 0: loss.cfg_weight (the teacher the student matches)
  c.eval.prompts = ""                     # 't2i' (every eval.fid_every): a prompts file (COCO)
  c.eval.num_samples = 5000               # its first N prompts, one image each
  c.eval.clip = ""                        # a transformers CLIPModel folder; "": no CLIP score
  c.eval.batch = 16                       # images per jitted sampling call
  c.sample_every = 1000
  c.checkpoint_every = 1000
  if "runlocal" in flags:
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 10, 8, 5, 10
  if "tiny" in flags:
    _tiny(c)
  return config_lib.apply_variant(c, divergence, flags)


def _tiny(c):
  """Random tiny SD networks, 16x16 images, a few steps (tests and smoke runs)."""
  c.total_steps, c.batch_size, c.fake_score_update_freq = 2, 8, 2
  c.compute_dtype = "float32"
  c.ema_decays = (0.9,)
  c.loss.r1_gamma = 0.0                   # R1's double backward through a U-Net: slow to compile
  c.loss.gan_weight = 1e-2
  c.loss.num_bins = 4
  c.disc.resolutions = (4,)
  c.teacher.kind = "sd15_random"
  c.teacher.path = ""
  c.teacher.remat = False
  c.teacher.arch = TINY_ARCH
  c.data.resolution = 16
  c.data.prefetch = 1
  c.log_every, c.checkpoint_every, c.keep_checkpoints = 1, 2, 2
  c.sample_every = 2
  c.eval.grid_prompts = sd_grid.DEFAULT_PROMPTS[:2]
  c.eval.grid_steps = 2
