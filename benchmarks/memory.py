r"""Memory a user can plan with: per-device bytes of the f-distill steps of a config.

  python -m benchmarks.memory --config=configs/sd15.py:js --per_device_batch=1,2 \
      --devices=1 --remat=0,1
  python -m benchmarks.memory --config=configs/cifar10.py:fkl --per_device_batch=64,128
  python -m benchmarks.memory --config=configs/sd15.py:js --per_device_batch=1 --xla_plan=1

Everything is traced with abstract shapes (`jax.eval_shape`, `jax.make_jaxpr`),
no weights and nothing compiled, so a full-size SD 1.5 run takes seconds on a
CPU. Full-size architectures: EDM's CIFAR-10 DDPM++ and ImageNet-64 ADM
(`models.edm`), SD 1.5 from the config.json files of `--sd_configs` (default:
the shared fixtures' layout-only folder), SDXL base from `SDXL_ARCH` below
(its public diffusers configs); a config's own `teacher.arch` when its teacher
is random (the `tiny` variants).

The estimate, per device, of one step (generator or critic) is the sum of:

  state       generator, fake score, heads (float32), their Adam moments and
              the EMA copies, each leaf divided as `mesh.fsdp` divides it;
  frozen      the teacher's variables (U-Net, and VAE and text towers of the
              text-to-image teachers) in `frozen_dtype`, divided the same way;
  grads       float32 gradients of what the step updates (generator; fake
              score + heads), divided the same way;
  residuals   the activations the step's VJP saves for its backward pass
              (`jax.vjp` traced; residuals that are the step's own inputs,
              i.e. parameters, are not counted twice), at the per-device batch:
              the critic step's fake-score and discriminator VJPs run one after
              the other, so the larger of the two counts;
  attention_scores  the largest attention score matrix of the batch (float32
              logits + weights, [B, heads, Lq, Lk]) where the reference attention
              runs (`attention=xla`, and `auto` on CPUs, as traced here): a
              transient the residuals do not show; fused kernels keep O(L);
  batch       the step's input batch on the device.

Not counted: XLA's temporaries (the transient buffers of one layer, e.g. a
materialised attention score matrix, workspace of fused kernels), FSDP's
all-gathered parameters of the layer being computed, and fragmentation; leave
10-20% headroom. `per_example` is the slope in the batch of residuals + attention
scores: the bytes each further example adds.

`--xla_plan=1` also compiles each step on this backend (a mesh of `--devices`
devices; simulated on CPU) and reports XLA's own buffer plan
(`compiled.memory_analysis()`): on a GPU that is the device's plan; on the CPU
backend it is the CPU's, which neither fuses like a GPU nor turns remat into
savings, so it is not a device estimate.
"""

import functools
import json
import os
import pathlib
import sys
import time

from benchmarks.report import SD15_CONFIGS
GIB = 2 ** 30

# stable-diffusion-xl-base-1.0's component configs (diffusers), the keys that differ from
# the library defaults; the memory estimate needs architectures only.
SDXL_ARCH = {
    "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
             "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
             "cross_attention_dim": 2048, "in_channels": 4, "out_channels": 4,
             "sample_size": 128},
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
            "norm_num_groups": 32, "scaling_factor": 0.13025, "sample_size": 1024},
    "text_encoder": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                     "num_hidden_layers": 12, "num_attention_heads": 12,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "eos_token_id": 2},
    "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                       "num_hidden_layers": 32, "num_attention_heads": 20,
                       "max_position_embeddings": 77, "hidden_act": "gelu",
                       "projection_dim": 1280, "eos_token_id": 2},
}


def _nbytes(tree, fsdp=1):
  """Bytes per device of a tree of arrays/ShapeDtypeStructs, leaves divided as FSDP shards."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import runner  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += size // fsdp if runner.fsdp_axis(leaf.shape, fsdp) is not None else size
  return total


def _abstract(tree, dtype=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  def leaf(x):
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    return jax.ShapeDtypeStruct(x.shape, dtype if dtype is not None and floating else x.dtype)
  return jax.tree.map(leaf, tree)


def _edm_teacher(config, arch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import edm as edm_loader  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models.edm import build_edm  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import teacher as base  # pylint: disable=g-import-not-at-top
  module = build_edm(arch, base.DTYPES[config.compute_dtype], base.attention(config))
  r, c = module.img_resolution, module.img_channels
  labels = jnp.zeros((1, module.label_dim)) if module.label_dim else None
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, r, r, c)),
                                                 jnp.ones((1,)), labels))
  from fdistill_jax.problems.image import teachers as image_teachers  # pylint: disable=g-import-not-at-top
  return image_teachers._image_teacher(module, variables, "abstract", arch, {})  # pylint: disable=protected-access


def _sd_teacher(config, cfgs, tokenizer_dir, xl):
  from fdistill_jax.loaders import diffusers as names  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import sd_configs  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import tokenizer  # pylint: disable=g-import-not-at-top
  from fdistill_jax.pipelines import sd as sd_pipeline  # pylint: disable=g-import-not-at-top
  from fdistill_jax.problems.t2i import teachers as sd_teacher  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import teacher as base  # pylint: disable=g-import-not-at-top
  cfgs = {**cfgs, "scheduler": sd_configs.SD15_CONFIGS["scheduler"]}
  dtype, remat = base.compute_dtype(config), bool(config.teacher.get("remat", False))
  modules = sd_pipeline.build_modules(cfgs, dtype, remat, base.attention(config))
  parts = ("unet", "text_encoder", "vae") + (("text_encoder_2",) if xl else ())
  shapes = {k: {"params": names.param_shapes(modules[k])} for k in parts}
  tok = tokenizer.CLIPTokenizer(tokenizer_dir)
  pipe = sd_pipeline.Pipeline.from_modules(modules, shapes, tok, tok if xl else None)
  return sd_teacher.pipeline_teacher("sdxl" if xl else "sd15", pipe, config, cfgs["unet"], {})


def _read_sd_configs(folder):
  out = {}
  for part in ("unet", "text_encoder", "vae"):
    out[part] = json.loads((pathlib.Path(folder) / part / "config.json").read_text())
  return out


def abstract_teacher(config, name, sd_configs=SD15_CONFIGS):
  """The config's Teacher record at full size with abstract variables (nothing allocated)."""
  from fdistill_jax.models import edm  # pylint: disable=g-import-not-at-top
  kind, arch = config.teacher.kind, config.teacher.arch.to_dict()
  tok_dir = config.teacher.get("tokenizer") or str(pathlib.Path(sd_configs) / "tokenizer")
  if kind in ("sd15_random", "sdxl_random"):
    return _sd_teacher(config, arch, tok_dir, kind == "sdxl_random")
  if kind == "sd15":
    return _sd_teacher(config, _read_sd_configs(sd_configs), tok_dir, False)
  if kind == "sdxl":
    return _sd_teacher(config, SDXL_ARCH, tok_dir, True)
  if kind in ("random", "init") and arch:
    return _edm_teacher(config, arch)
  full = {"cifar10": edm.CIFAR10_ARCH, "imagenet64": edm.IMAGENET64_ARCH}
  if kind == "edm" and name in full:
    return _edm_teacher(config, full[name])
  raise ValueError(f"benchmarks.memory knows no full-size architecture for teacher.kind="
                   f"{kind!r} of config {name!r}; use cifar10, imagenet64, sd15, sdxl or a "
                   "config whose teacher is random with teacher.arch set.")


def _abstract_batch(models, config, b):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cond = models.conditioning
  if hasattr(cond, "image_shape"):           # text-to-image: images and token ids
    tokens = jax.ShapeDtypeStruct((b, 77), jnp.int32)
    batch = {"images": jax.ShapeDtypeStruct((b, *cond.image_shape), jnp.float32),
             "tokens": tokens}
    if hasattr(cond, "tokenizer_2"):
      batch["tokens_2"] = tokens
    return batch
  return {"images": jax.ShapeDtypeStruct((b, *models.sample_shape), jnp.float32),
          "labels": jax.ShapeDtypeStruct((b, models.num_classes), jnp.float32)}


def residual_bytes(loss, diff_args, *rest):
  """Bytes of the residuals `jax.vjp(loss, *diff_args)` saves, beyond the inputs themselves.

  Everything is traced (`jax.make_jaxpr` of the vjp): residual variables that are
  the function's inputs (parameters, teacher weights, batch) are aliases, not new
  memory, and are left out; each residual is counted once.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = len(diff_args)
  def outer(*args):
    return jax.vjp(lambda *d: loss(*d, *args[n:]), *args[:n])[1]
  closed = jax.make_jaxpr(outer)(*diff_args, *rest)
  jaxpr = closed.jaxpr
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  seen, total = set(), 0
  for v in jaxpr.outvars:
    if type(v).__name__ == "Literal":         # a constant, not a buffer
      continue
    if v in inputs or v in seen:
      continue
    seen.add(v)
    total += int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize
  return total


def attention_scores_per_example():
  """Bytes per example of the largest attention score matrix the traced steps build.

  The reference ('xla', 'jax') materialises float32 logits and the weights in the
  compute dtype, [heads, Lq, Lk] each, one attention at a time: a transient the
  residuals do not show (remat recomputes it in the backward pass too). Fused
  kernels ('cudnn', 'pallas') keep O(L) instead: 0 here.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models import attention  # pylint: disable=g-import-not-at-top
  sizes = [heads * lq * lk * (4 + np.dtype(dtype).itemsize)
           for _, impl, _, heads, _, lq, lk, dtype in attention.traced_calls()
           if impl in ("xla", "jax")]
  return max(sizes, default=0)


def _step_residuals(models, optimizers, config, state, tv, batch):
  """{'gen': bytes, 'critic': bytes}: the VJP residuals of each step at this batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import steps  # pylint: disable=g-import-not-at-top
  del optimizers
  key = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
  gen = residual_bytes(
      lambda p, st, tv, rng, data: steps.generator_loss(
          p, st, tv, rng, models=models, config=config, data=data)[0],
      (state.gen,), state, tv, key, batch)

  def samples(st, tv, rng, data):
    x, labels = steps.generator_samples(models, st.gen, rng, config.batch_size,
                                        config.loss.sigma_init, teacher_vars=tv, data=data)
    return jax.lax.stop_gradient(x), labels
  x, labels = jax.eval_shape(samples, state, tv, key, batch)
  fake = residual_bytes(
      lambda p, x, labels, rng: steps.fake_score_loss(p, models, x, labels, rng, config),
      (state.fake,), x, labels, key)
  real = jax.eval_shape(lambda tv, rng, b: models.conditioning.real(tv, rng, b), tv, key, batch)
  disc = 0
  if real is not None:                       # the GAN's real branch exists
    args = (tv, real[0], real[1], x, labels, key)
    if config.disc.features_from == "fake_score":   # the GAN loss also trains the fake score
      disc = residual_bytes(lambda d, f, *a: steps.disc_loss(d, f, models, *a, config)[0],
                            (state.disc, state.fake), *args)
    else:
      disc = residual_bytes(lambda d, f, *a: steps.disc_loss(
          d, jax.lax.stop_gradient(f), models, *a, config)[0], (state.disc,), state.fake, *args)
  return {"gen": gen, "critic": max(fake, disc), "critic_fake_score": fake,
          "critic_discriminator": disc}


def estimate(config, name, per_device_batches, devices=1, sd_configs=SD15_CONFIGS):
  """The estimate (module docstring) of one config at each per-device batch, in bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models import attention as attention_lib  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import models as models_lib  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import teacher as base  # pylint: disable=g-import-not-at-top
  fsdp = config.mesh.fsdp
  teacher = abstract_teacher(config, name, sd_configs)
  models = models_lib.from_teacher(teacher, config.disc, config.student_dropout)
  optimizers = state_lib.make_optimizers(config.optim)
  tv = _abstract(teacher.variables, base.DTYPES[config.get("frozen_dtype", "float32")])
  heads = jax.eval_shape(lambda v: models_lib.init_heads(models, v, jax.random.PRNGKey(0)), tv)
  student = _abstract(teacher.student_params)
  state = jax.eval_shape(lambda s, h: state_lib.create_state(
      jax.random.PRNGKey(0), s, s, h, optimizers, len(config.ema_decays), config.loss.num_bins),
      student, heads)
  fixed = {"trainable_params": _nbytes((state.gen, state.fake, state.disc), fsdp),
           "optimizer_moments": _nbytes((state.gen_opt, state.fake_opt, state.disc_opt), fsdp),
           "ema": _nbytes(state.ema, fsdp), "frozen": _nbytes(tv, fsdp),
           "grads": {"gen": _nbytes(state.gen, fsdp),
                     "critic": _nbytes((state.fake, state.disc), fsdp)}}
  rows = []
  for b in per_device_batches:
    c = ml_collections.ConfigDict(config.to_dict())
    c.batch_size = b
    c = ml_collections.FrozenConfigDict(c)
    batch = _abstract_batch(models, c, b)
    start = time.perf_counter()
    attention_lib.traced_calls(clear=True)
    res = _step_residuals(models, optimizers, c, state, tv, batch)
    scores = attention_scores_per_example()
    row = {"per_device_batch": b, "global_batch": b * devices, "residuals": res,
           "attention_scores": b * scores,
           "batch": _nbytes(batch), "trace_s": time.perf_counter() - start}
    state_bytes = fixed["trainable_params"] + fixed["optimizer_moments"] + fixed["ema"]
    row["total"] = {s: state_bytes + fixed["frozen"] + fixed["grads"][s] + res[s] + row["batch"]
                    + row["attention_scores"] for s in ("gen", "critic")}
    rows.append(row)
  for row in rows:
    row["per_example"] = _per_example(rows, row)
  return {"fixed": fixed, "rows": rows}


def _per_example(rows, row):
  """Bytes per further example (residuals + attention scores): the slope between the two
  extreme batches (one batch: its bytes / batch)."""
  lo, hi = rows[0], rows[-1]
  grow = lambda r, s: r["residuals"][s] + r["attention_scores"]
  if lo["per_device_batch"] == hi["per_device_batch"]:
    return {s: grow(row, s) / row["per_device_batch"] for s in ("gen", "critic")}
  db = hi["per_device_batch"] - lo["per_device_batch"]
  return {s: (grow(hi, s) - grow(lo, s)) / db for s in ("gen", "critic")}


def xla_plan(config, devices, per_device_batch, sd_configs=SD15_CONFIGS, name="sd15"):
  """XLA's per-device buffer plan of each step compiled on this backend (no weights)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import loop, models as models_lib, state as state_lib, steps  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import teacher as base  # pylint: disable=g-import-not-at-top
  devs = jax.devices()[:devices]
  if len(devs) < devices:
    raise ValueError(f"--devices={devices} but JAX has {len(devs)}; on CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={devices} before JAX starts.")
  c = ml_collections.ConfigDict(config.to_dict())
  c.batch_size = per_device_batch * devices
  config = ml_collections.FrozenConfigDict(c)
  teacher = abstract_teacher(config, name, sd_configs)
  models = models_lib.from_teacher(teacher, config.disc, config.student_dropout)
  optimizers = state_lib.make_optimizers(config.optim)
  mesh = loop.make_mesh(config, devs)
  tv = _abstract(teacher.variables, base.DTYPES[config.get("frozen_dtype", "float32")])
  heads = jax.eval_shape(lambda v: models_lib.init_heads(models, v, jax.random.PRNGKey(0)), tv)
  state = jax.eval_shape(lambda s, h: state_lib.create_state(
      jax.random.PRNGKey(0), s, s, h, optimizers, len(config.ema_decays), config.loss.num_bins),
      _abstract(teacher.student_params), heads)
  state_sh, teacher_sh = loop.tree_sharding(mesh, state), loop.tree_sharding(mesh, tv)
  batch_sh, repl = NamedSharding(mesh, P(loop.BATCH_AXES)), NamedSharding(mesh, P())
  batch = _abstract_batch(models, config, c.batch_size)
  kw = dict(models=models, optimizers=optimizers, config=config, sharding=batch_sh)
  out = {}
  for step_name, fn in (("gen", steps.generator_step), ("critic", steps.critic_step)):
    start = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, **kw), in_shardings=(state_sh, teacher_sh, batch_sh),
                     out_shardings=(state_sh, repl), donate_argnums=0)
    compiled = jitted.lower(state, tv, batch).compile()
    out[step_name] = {**memory_analysis(compiled), "compile_s": time.perf_counter() - start}
  return out


def memory_analysis(compiled):
  """XLA's argument / output / temp / alias bytes of a compiled step and their peak sum."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def configure(spec, remat=None, dtype=None, frozen_dtype=None, devices=1, fsdp=0):
  """(config, name) of 'configs/sd15.py:js' with the benchmark's overrides."""
  from fdistill_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(spec)
  name = pathlib.Path(spec.partition(":")[0]).stem
  if remat is not None:
    if "remat" not in c.teacher:
      raise ValueError(f"--remat: config {spec!r} has no teacher.remat (EDM U-Nets have no remat).")
    c.teacher.remat = bool(remat)
  if dtype:
    c.compute_dtype = dtype
  if frozen_dtype:
    c.frozen_dtype = frozen_dtype
  c.mesh.fsdp = fsdp or devices
  return c, name


def table(results):
  """Markdown rows: one per (config, settings, batch)."""
  lines = ["| config | dtype | remat | devices (fsdp) | per-device batch | state + frozen GiB "
           "| gen step GiB | critic step GiB | residuals/example gen, critic GiB "
           "| attention scores/example GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    f = r["estimate"]["fixed"]
    fixed = (f["trainable_params"] + f["optimizer_moments"] + f["ema"] + f["frozen"]) / GIB
    rows = r["estimate"]["rows"]
    for row in rows:
      b = row["per_device_batch"]
      scores = row["attention_scores"] / b
      lines.append(
          f"| {r['config']} | {r['dtype']} | {r['remat']} | {r['devices']} ({r['fsdp']}) | {b} | "
          f"{fixed:.2f} | {row['total']['gen'] / GIB:.2f} | {row['total']['critic'] / GIB:.2f} | "
          f"{(row['per_example']['gen'] - scores) / GIB:.3f}, "
          f"{(row['per_example']['critic'] - scores) / GIB:.3f} | {scores / GIB:.3f} |")
  return "\n".join(lines)


def run(spec, per_device_batches, devices_list, remats, dtype=None, frozen_dtype=None, fsdp=0,
        sd_configs=SD15_CONFIGS, with_xla_plan=False):
  """Estimates (and XLA plans) for every combination; a list of result dicts."""
  import jax  # pylint: disable=g-import-not-at-top
  results = []
  for devices in devices_list:
    for remat in remats:
      config, name = configure(spec, remat, dtype, frozen_dtype, devices, fsdp)
      start = time.perf_counter()
      est = estimate(config, name, per_device_batches, devices, sd_configs)
      r = {"config": spec, "dtype": config.compute_dtype,
           "frozen_dtype": config.get("frozen_dtype", "float32"),
           "remat": config.teacher.get("remat"), "devices": devices, "fsdp": config.mesh.fsdp,
           "attention": config.get("attention", "auto"), "estimate": est,
           "estimate_s": time.perf_counter() - start}
      if with_xla_plan:
        r["xla_plan"] = {"backend": jax.default_backend(),
                         "device": jax.devices()[0].device_kind,
                         "by_batch": {b: xla_plan(config, devices, b, sd_configs, name)
                                      for b in per_device_batches}}
      results.append(r)
  return results


def _parse(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/sd15.py:js", help="PATH.py[:VARIANT]")
  p.add_argument("--per_device_batch", default="1,2")
  p.add_argument("--devices", default="1", help="device counts, e.g. 1,8")
  p.add_argument("--fsdp", type=int, default=0, help="mesh.fsdp (0: all devices)")
  p.add_argument("--remat", default="", help="teacher.remat settings, e.g. 0,1 (default: config's)")
  p.add_argument("--dtype", default="", help="compute_dtype (default: the config's)")
  p.add_argument("--frozen_dtype", default="", help="frozen_dtype (default: the config's)")
  p.add_argument("--sd_configs", default=str(SD15_CONFIGS))
  p.add_argument("--xla_plan", type=int, default=0, help="1: also compile and read XLA's plan")
  p.add_argument("--out", default="", help="JSON file (a .md table is written beside it)")
  return p.parse_args(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
  devices = ints(args.devices)
  if args.xla_plan and "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(devices)}")
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks.report import write_report  # pylint: disable=g-import-not-at-top
  results = run(args.config, ints(args.per_device_batch), devices,
                ints(args.remat) or [None], args.dtype or None, args.frozen_dtype or None,
                args.fsdp, args.sd_configs, bool(args.xla_plan))
  md = table(results)
  print(md, flush=True)
  report = {"command": "python -m benchmarks.memory " + " ".join(argv),
            "backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d"),
            "jax": jax.__version__, "results": results, "table": md}
  if args.out:
    pathlib.Path(args.out).with_suffix(".md").write_text(md + "\n")
  write_report(report, args.out or None)
  return report


if __name__ == "__main__":
  main()
