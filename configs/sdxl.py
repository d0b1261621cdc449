r"""Text-to-image: one-step SDXL (paper Table 5, SDXL column; App. D).

  python -m fdistill_jax.main --config=configs/sdxl.py:js --workdir=runs/sdxl_js \
      --config.teacher.path=/path/to/stable-diffusion-xl-base-1.0 \
      --config.data.path=/path/to/laion_shards

Teacher: a diffusers SDXL folder (unet/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, vae/, scheduler/). Conditioning: the pytree
{'context': [B, 77, 2048], 'pooled': [B, 1280], 'time_ids': [B, 6]}
(`fdistill_jax.problems.t2i.distill`), time_ids (1024, 1024, 0, 0, 1024, 1024);
the CFG negative is zeros (SDXL base's force_zeros_for_empty_prompt). Data:
image-text WebDataset shards, centre-cropped and resized to 1024 (128x128x4
latents).

Table 5: batch 384, fake-score update frequency 5, GAN weight 5e-3, 25k
iterations, CFG 8 on the teacher's score in the f-distill term, Adam lr 5e-7
(generator, fake score and discriminator, as FastGen's
`configs/experiments/SDXL/config_f_distill.py`). Settings Table 5 does not
list for SDXL keep the SD 1.5 config's values (weight decay 1e-2, R1 off, SD's
own clock: DDPM timesteps uniform in [20, 980] / [0, 999] on the scaled-linear
schedule SDXL shares with SD 1.5, no EMA). The fake score's loss is the
unweighted eps-MSE (`loss.fake_score_weighting = 'eps'`): FastGen's SDXL
f-distill config leaves `fake_score_pred_type` unset, so it trains in the
U-Net's own eps parameterisation, as DMD2 does (SD 1.5: FastGen's x0-MSE);
docs/t2i_settings.md tabulates them with their sources. Grids use the paper's
Fig. 1 prompts (its SDXL samples).

Discriminator input: Table 5 lists resolution (16). At 1024 px the SDXL U-Net's
features have heights 128, 64 and 32 (its last block does not downsample), so
there is no 16x16 feature; the heads read the mid block's 32x32 output
(`disc.resolutions = (0,)`, MID), as FastGen's SDXL f-distill config does:
its `Discriminator_SDXL_Res1024_Config` (all_res [64, 32, 32, 32], no
feature_indices) reads only the last, bottleneck entry. At 512 px the same
bottleneck is 16x16 (FastGen's Res512 config), perhaps Table 5's (16).

Shared with configs/sd15.py (`fdistill_jax/problems/t2i/run_config.py`): bf16 compute,
remat, data, and evaluation ('t2i_grid' teacher | student grids every
`sample_every`; 't2i' FID / CLIP score every `eval.fid_every`).

Variants: any divergence, 'no_gan' / 'gan_only', 'runlocal', 'tiny' (random
tiny SDXL networks for tests: set teacher.tokenizer and teacher.tokenizer_2
to CLIP tokenizer folders and data.path to shards of 16x16 images).
"""

from fdistill_jax import config_lib
from fdistill_jax.problems.t2i import run_config

EXTRA_TOKENS = ("tiny",)
MID = 0  # disc.resolutions key of the U-Net's mid block (networks.sd.unet.MID)
# Tiny random SDXL networks (tests): 8x8 latents of 16x16 images, first block without
# attention, per-block depths, linear projections, the "text_time" added embedding.
TINY_ARCH = {
    "unet": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
             "attention_head_dim": [2, 2], "transformer_layers_per_block": [1, 2],
             "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 16 + 6 * 4,
             "cross_attention_dim": 16 + 16, "in_channels": 4, "out_channels": 4},
    "vae": {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
            "norm_num_groups": 4, "latent_channels": 4, "scaling_factor": 0.13025},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": 49407},
    "text_encoder_2": {"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2,
                       "max_position_embeddings": 77, "hidden_act": "gelu",
                       "projection_dim": 16, "eos_token_id": 2},
}


def get_config(arg="js"):
  divergence, flags = config_lib.parse_arg(arg, default_divergence="js",
                                           extra_tokens=EXTRA_TOKENS)
  c = config_lib.base_config()
  run_config.text_to_image(c, teacher_kind="sdxl", teacher_path="stable-diffusion-xl-base-1.0",
                           resolution=1024, grid_figure="fig1")
  c.teacher.tokenizer_2 = ""              # "" = the teacher folder's tokenizer_2/
  c.total_steps = 25_000
  c.batch_size = 384
  c.fake_score_update_freq = 5
  c.loss.gan_weight = 5e-3
  c.loss.cfg_weight = 8.0
  c.loss.fake_score_weighting = "eps"     # FastGen's SDXL config and DMD2: eps-MSE
  c.disc.resolutions = (MID,)
  c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 5e-7
  if "runlocal" in flags:
    run_config.runlocal(c)
  if "tiny" in flags:
    run_config.tiny(c, teacher_kind="sdxl_random", arch=TINY_ARCH)
    c.optim.gen_lr = c.optim.fake_lr = c.optim.disc_lr = 1e-3  # visible moves in two steps
  return config_lib.apply_variant(c, divergence, flags)
