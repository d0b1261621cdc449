r"""Text-to-image: one-step Stable Diffusion v1.5 (paper Table 5, SD1.5 column; App. D).

  python -m fdistill_jax.main --config=configs/sd15.py:js --workdir=runs/sd15_js \
      --config.teacher.path=/path/to/stable-diffusion-v1-5 \
      --config.data.path=/path/to/coyo_shards

Teacher: a diffusers SD 1.5 folder (unet/, text_encoder/, vae/, scheduler/,
tokenizer/). Data: image-text WebDataset shards as img2dataset writes them
(`NNNNN.jpg` + `NNNNN.txt` per example), center-cropped and resized to 512;
or a captions-only file (`--config.data.kind=captions`, for `rkl,no_gan`).

Table 5: batch 1024, fake-score update frequency 10, GAN weight 1e-3, heads on
the frozen teacher U-Net's 8x8 features, 60k iterations, CFG 1.75 on the
teacher's score in the f-distill term (`cfg5`: 5), Adam lr 1e-5 with weight
decay 1e-2. The 8x8 features are the mid block's output at 512 px
(`disc.resolutions = (MID,)`), as FastGen's `Discriminator_SD15_Res512_Config`
and DMD2 ("we only use the bottleneck layer") read them. Table 5's R1 row is
off here, as in FastGen's SD configs (docs/t2i_settings.md).

The paper's protocol (Sec. 5) is two runs: an `rkl` run first, then `js` (or
`fkl`) with `--config.init_from=RUN_DIR` of it (docs/t2i_settings.md):

  python -m fdistill_jax.main --config=configs/sd15.py:rkl --workdir=runs/sd15_rkl ...
  python -m fdistill_jax.main --config=configs/sd15.py:js --workdir=runs/sd15_js \
      --config.init_from=runs/sd15_rkl ...

Shared with configs/sdxl.py (`fdistill_jax/problems/t2i/run_config.py`): bf16
compute, remat, SD's own clock for the noise levels (DDPM timesteps uniform in
[20, 980] for the f-distill term, [0, 999] for the fake score and the GAN;
`fdistill_jax.train.noise`), no EMA, R1 off, data and evaluation. The fake
score's loss is FastGen's unweighted x0-MSE (its SD 1.5 f-distill config sets
`fake_score_pred_type='x0'`): the paper's authors' recipe for this teacher,
and the error in the x0 prediction the f-distill gradient reads (DMD2's eps-MSE
weights it by 1 / sigma^2, about 1200 at t = 0; `loss.fake_score_weighting=eps`).

Evaluation: 't2i_grid' every `sample_every` = 1000 iterations: the paper's Fig. 7 prompts, the frozen
teacher's 50-step guided DDIM image beside the one-step student's (fdistill_jax/problems/t2i/grid.py;
`python -m fdistill_jax.tools.sample --workdir=DIR --prompt=...` samples a run); 't2i'
every `eval.fid_every` iterations (0 here: set it with eval.prompts and eval.ref /
eval.inception and/or eval.clip): FID and CLIP score of one-step images of
`eval.num_samples` prompts (fdistill_jax/problems/t2i/evaluator.py).

Variants: any divergence, 'no_gan' / 'gan_only', 'cfg5' (CFG 5), 'runlocal'
(a short run of the real model), 'tiny' (random tiny SD networks for tests:
set teacher.tokenizer to a CLIP tokenizer folder and data.path to shards of
16x16 images).
"""

from fdistill_jax import config_lib
from fdistill_jax.problems.t2i import run_config

EXTRA_TOKENS = ("cfg5", "tiny")
MID = 0  # disc.resolutions key of the U-Net's mid block (models.sd.unet.MID)
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
  run_config.text_to_image(c, teacher_kind="sd15", teacher_path="stable-diffusion-v1-5",
                           resolution=512, grid_figure="fig7")
  c.total_steps = 60_000
  c.batch_size = 1024
  c.fake_score_update_freq = 10
  c.loss.gan_weight = 1e-3
  c.loss.cfg_weight = 5.0 if "cfg5" in flags else 1.75
  c.disc.resolutions = (MID,)             # 8x8 at 512 px: FastGen's and DMD2's bottleneck
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 1e-5
  if "runlocal" in flags:
    run_config.runlocal(c)
  if "tiny" in flags:
    run_config.tiny(c, teacher_kind="sd15_random", arch=TINY_ARCH)
  return config_lib.apply_variant(c, divergence, flags)
