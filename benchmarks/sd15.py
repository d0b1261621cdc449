"""Throughput of Stable Diffusion 1.5's networks in JAX, beside diffusers PyTorch, as JSON.

  python -m benchmarks.sd15 --size=small --out=/tmp/sd15_small.json
  python -m benchmarks.sd15 --size=full --parts=unet_fwd,text,vae_decode --out=/tmp/sd15.json
  python -m benchmarks.sd15 --size=full --batch=8 --out=sd15_gpu.json      # all parts, on a GPU

Parts, all at 64x64 latents (512x512 images), batch `--batch`, on jax.devices()[0]:
  unet_fwd:      eps = U-Net(z_t, t, context), context [B, 77, 768];
  unet_fwd_bwd:  value and gradient w.r.t. all U-Net parameters of mean(eps^2);
  text:          CLIP text encoder on [B, 77] token ids;
  vae_decode:    VAE decoder, latents -> 512x512 images.
Each runs in float32 and bfloat16 compute (JAX parameters stay float32; PyTorch casts the
model), with diffusers / transformers on the same device (CPU or CUDA) unless `--notorch`.
JAX compile time (lower + compile) is reported apart from the steady state (`--warmup`
calls, then the mean of `--iters` calls, block_until_ready / synchronize).

Memory of unet_fwd_bwd with and without `nn.remat` (resnet and transformer blocks): XLA's
buffer assignment of the compiled step (`memory_analysis()`: arguments + outputs + temporaries
- aliases, an upper bound of the device peak; available on CPU too), and on GPUs also the
device's measured peak. PyTorch's peak is measured on CUDA only. XLA's CPU backend does not
turn remat into savings (its buffer assignment for a checkpointed step is not smaller, even
for a plain stack of matmuls), so the remat comparison is meaningful on GPUs and TPUs only.

`--size=small` keeps the SD 1.5 layout with a quarter of the channels and fewer text
layers, for machines where the full networks are too slow. Weights are random.
"""

import json
import os
import platform
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import time_jit, write_report
from fdistill_jax.loaders import sd_configs as configs
from fdistill_jax.loaders import diffusers as names
from fdistill_jax.loaders import variables
from fdistill_jax.tools import cli
from fdistill_jax.train.teacher import DTYPES

PARTS = ("unet_fwd", "unet_fwd_bwd", "text", "vae_decode")
SMALL = {
    "unet": {**configs.SD15_CONFIGS["unet"], "block_out_channels": [64, 128, 256, 256]},
    "vae": {**configs.SD15_CONFIGS["vae"], "block_out_channels": [32, 64, 128, 128]},
    "text_encoder": {**configs.SD15_CONFIGS["text_encoder"], "num_hidden_layers": 4},
}
SIZES = {"full": configs.SD15_CONFIGS, "small": SMALL}


def _jax_module(part, cfg, dtype, remat=False):
  if part.startswith("unet"):
    return configs.unet_from_config(cfg["unet"], dtype, remat)
  if part == "text":
    return configs.text_from_config(cfg["text_encoder"], dtype, remat)
  return configs.vae_from_config(cfg["vae"], dtype, remat)[0]


def _inputs(part, batch, seed=0):
  rng = np.random.default_rng(seed)
  if part == "text":
    return (rng.integers(0, 49407, (batch, 77)).astype(np.int32),)
  z = rng.standard_normal((batch, 64, 64, 4)).astype(np.float32)
  if part == "vae_decode":
    return (z,)
  return z, np.full((batch,), 500.0, np.float32), rng.standard_normal((batch, 77, 768)).astype(np.float32)


def _jax_fn(part, module):
  if part == "unet_fwd_bwd":
    loss = lambda p, *a: jnp.mean(jnp.square(module.apply({"params": p}, *a)))
    grad = jax.value_and_grad(loss)
    return lambda v, *a: grad(v["params"], *a)
  if part == "vae_decode":
    return lambda v, z: module.apply(v, z, method="decode")
  return module.apply


def _memory(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)


def _device_peak():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_jax(part, cfg, dtype_name, batch, warmup, iters, variables):
  module = _jax_module(part, cfg, DTYPES[dtype_name])
  args = tuple(jnp.asarray(a) for a in _inputs(part, batch))
  compile_s, step_s, compiled = time_jit(_jax_fn(part, module), (variables,) + args, warmup,
                                         iters)
  return {"images_per_s": batch / step_s, "step_ms": 1e3 * step_s, "compile_s": compile_s,
          "xla_memory_bytes": _memory(compiled)}


def remat_memory(cfg, batch, dtype_name, variables):
  """XLA memory of the U-Net forward+backward with and without remat (compiled, not run)."""
  out = {}
  for remat in (False, True):
    module = _jax_module("unet_fwd_bwd", cfg, DTYPES[dtype_name], remat)
    args = (variables,) + tuple(jnp.asarray(a) for a in _inputs("unet_fwd_bwd", batch))
    compiled = jax.jit(_jax_fn("unet_fwd_bwd", module)).lower(*args).compile()
    out["remat" if remat else "no_remat"] = {"xla_memory_bytes": _memory(compiled)}
    if jax.devices()[0].platform == "gpu":
      jax.block_until_ready(compiled(*args))
      out["remat" if remat else "no_remat"]["device_peak_bytes"] = _device_peak()
  return out


def _torch_model(part, cfg, dtype, device):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
  if part.startswith("unet"):
    model = UNet2DConditionModel(**clean(cfg["unet"]))
  elif part == "text":
    model = CLIPTextModel(CLIPTextConfig(**clean(cfg["text_encoder"])))
  else:
    model = AutoencoderKL(**clean(cfg["vae"]))
  return model.to(device=device, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])


def bench_torch(part, cfg, dtype_name, batch, warmup, iters):
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = _torch_model(part, cfg, dtype_name, device)
  dtype = next(model.parameters()).dtype
  args = [torch.from_numpy(np.asarray(a)).to(device) for a in _inputs(part, batch)]
  if part == "text":
    args = [args[0].long()]
  else:
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    if part != "text":
      args[0] = args[0].permute(0, 3, 1, 2).contiguous()

  def run():
    if part == "unet_fwd_bwd":
      model.zero_grad(set_to_none=True)
      loss = model(*args).sample.float().square().mean()
      loss.backward()
      return loss
    with torch.no_grad():
      if part == "text":
        return model(*args).last_hidden_state
      if part == "vae_decode":
        return model.decode(args[0]).sample
      return model(*args).sample

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for _ in range(warmup):
    run()
  sync()
  start = time.perf_counter()
  for _ in range(iters):
    run()
  sync()
  step_s = (time.perf_counter() - start) / iters
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"images_per_s": batch / step_s, "step_ms": 1e3 * step_s, "device": device,
          "peak_bytes": peak}


def _report_header(args):
  device = jax.devices()[0]
  report = {"device_kind": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
            "size": args.size, "batch": args.batch, "warmup": args.warmup, "iters": args.iters,
            "results": []}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    report["torch"], report["torch_threads"] = torch.__version__, torch.get_num_threads()
  except ImportError:
    pass
  return report


def _variables(part, cfg):
  return names.random_variables(_jax_module(part, cfg, jnp.float32))


def run(args):
  cfg = SIZES[args.size]
  report = _report_header(args)
  dtypes = args.dtype or ["float32", "bfloat16"]
  for part in args.parts:
    variables = _variables(part, cfg)
    for dtype_name in dtypes:
      row = {"part": part, "dtype": dtype_name, "params": variables.count_params(variables),
             "jax": bench_jax(part, cfg, dtype_name, args.batch, args.warmup, args.iters, variables)}
      if args.torch:
        row["torch"] = bench_torch(part, cfg, dtype_name, args.batch, args.warmup, args.iters)
      report["results"].append(row)
      print(json.dumps(row), flush=True)
    if part == "unet_fwd_bwd" and args.remat_memory:
      report["unet_fwd_bwd_memory"] = remat_memory(cfg, args.batch, "float32", variables)
      print(json.dumps(report["unet_fwd_bwd_memory"]), flush=True)
    del variables
  write_report(report, args.out)


FLAGS = cli.new_flags()
flags.DEFINE_enum("size", "small", sorted(SIZES), "Network size.", flag_values=FLAGS)
flags.DEFINE_list("parts", list(PARTS), f"Subset of {PARTS}.", flag_values=FLAGS)
flags.DEFINE_multi_enum("dtype", [], sorted(DTYPES), "Compute dtype, repeatable; default: both.",
                        flag_values=FLAGS)
flags.DEFINE_integer("batch", 1, "Batch size.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "Untimed calls (after compilation).", flag_values=FLAGS)
flags.DEFINE_integer("iters", 2, "Timed calls.", flag_values=FLAGS)
flags.DEFINE_bool("torch", True, "Also time the diffusers / transformers PyTorch baseline.",
                  flag_values=FLAGS)
flags.DEFINE_bool("remat_memory", True, "Also compile the remat variant of unet_fwd_bwd.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output file.", flag_values=FLAGS)


def main(argv):
  del argv
  unknown = [s for s in FLAGS.parts if s not in PARTS]
  if unknown:
    raise ValueError(f"--parts has {unknown}; choose from {PARTS}.")
  run(FLAGS)


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.sd15", FLAGS, __doc__)()
