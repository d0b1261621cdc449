r"""Per-device memory of the SD1.5 f-distill steps, from XLA's buffer assignment; no weights.

  python -m benchmarks.sd15_memory --devices=8 --per_device_batch=1 --out=sd15_memory.json

Builds the run of `configs/sd15.py:js` (or `--variant`) with the full-size SD 1.5
architecture from the config.json files of `--configs` (default: the shared fixtures'
`sd15/` folder, no weights), abstract parameters (`jax.eval_shape`), a mesh of
`--devices` devices (simulated CPU devices unless real ones exist) with
`mesh.fsdp=--fsdp` (default: all devices), the global batch
`per_device_batch x devices`, and compiles the generator step and the critic step
(`jax.jit(...).lower(abstract inputs).compile()`) to read
`compiled.memory_analysis()`: arguments (state, teacher, batch), outputs, temporaries,
and their sum minus donated aliases, per device. Writes JSON.

The number is XLA's plan for the backend it compiles on: on CPU it is an estimate
for a GPU/TPU (other fusion and layout decisions; the CPU backend does not turn
remat into savings, see README "Stable Diffusion v1.5"); on a GPU it is that GPU's.
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--per_device_batch", type=int, default=1)
  p.add_argument("--fsdp", type=int, default=0, help="0: all devices")
  p.add_argument("--variant", default="js")
  p.add_argument("--configs", default=str(REPO.parent / "shared" / "fixtures" / "sd15"))
  p.add_argument("--steps", default="gen,critic")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", type=int, default=1)
  p.add_argument("--out", default="sd15_memory.json")
  return p.parse_args(argv)


def _memory(compiled):
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "temp_size_in_bytes", "alias_size_in_bytes",
                                           "generated_code_size_in_bytes")}
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  out["peak_estimate_gib"] = out["peak_estimate_bytes"] / 2**30
  return out


def main(argv=None):
  args = _parse(argv if argv is not None else sys.argv[1:])
  if "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO))
  from configs import sd15  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import diffusers as names
  from fdistill_jax.pipelines import sd as pipeline
  from fdistill_jax.loaders import tokenizer  # pylint: disable=g-import-not-at-top
  from fdistill_jax.problems.t2i import teachers as sd_teacher  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import teacher as base  # pylint: disable=g-import-not-at-top
  from fdistill_jax.train import loop, models as models_lib, state as state_lib, steps  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f"--devices={args.devices} but JAX has {len(devices)}.")
  c = sd15.get_config(args.variant)
  c.batch_size = args.per_device_batch * args.devices
  c.mesh.fsdp = args.fsdp or args.devices
  c.compute_dtype, c.teacher.remat = args.dtype, bool(args.remat)
  config = ml_collections.FrozenConfigDict(c)
  cfgs = pipeline.read_configs(args.configs)
  modules = pipeline.build_modules(cfgs, base.compute_dtype(config), bool(args.remat))
  shapes = {k: names.param_shapes(modules[k]) for k in ("unet", "text_encoder", "vae")}
  tok = tokenizer.CLIPTokenizer(pathlib.Path(args.configs) / "tokenizer")
  pipe = pipeline.Pipeline.from_modules(modules, {k: {"params": v} for k, v in shapes.items()}, tok)
  teacher = sd_teacher.pipeline_teacher("sd15", pipe, config, cfgs["unet"], {})
  models = models_lib.from_teacher(teacher, config.disc)
  optimizers = state_lib.make_optimizers(config.optim)
  mesh = loop.make_mesh(config, devices)
  tv = teacher.variables
  heads = jax.eval_shape(lambda v: models_lib.init_heads(models, v, jax.random.PRNGKey(0)), tv)
  state = jax.eval_shape(lambda s, h: state_lib.create_state(
      jax.random.PRNGKey(0), s, s, h, optimizers, len(config.ema_decays), config.loss.num_bins),
      teacher.student_params, heads)
  state_sh, teacher_sh = loop.tree_sharding(mesh, state), loop.tree_sharding(mesh, tv)
  batch_sh, repl = NamedSharding(mesh, P(loop.BATCH_AXES)), NamedSharding(mesh, P())
  res = config.data.resolution
  batch = {"images": jax.ShapeDtypeStruct((c.batch_size, res, res, 3), jax.numpy.float32),
           "tokens": jax.ShapeDtypeStruct((c.batch_size, 77), jax.numpy.int32)}
  kw = dict(models=models, optimizers=optimizers, config=config, sharding=batch_sh)
  fns = {"gen": steps.generator_step, "critic": steps.critic_step}
  result = {"command": "python -m benchmarks.sd15_memory " + " ".join(argv or sys.argv[1:]),
            "backend": jax.default_backend(), "device": str(devices[0].device_kind),
            "devices": args.devices, "per_device_batch": args.per_device_batch,
            "global_batch": c.batch_size, "fsdp": c.mesh.fsdp, "dtype": args.dtype,
            "remat": bool(args.remat), "variant": args.variant, "steps": {}}
  for name in args.steps.split(","):
    start = time.time()
    jitted = jax.jit(functools.partial(fns[name], **kw),
                     in_shardings=(state_sh, teacher_sh, batch_sh),
                     out_shardings=(state_sh, repl), donate_argnums=0)
    compiled = jitted.lower(state, tv, batch).compile()
    result["steps"][name] = {**_memory(compiled), "compile_s": time.time() - start}
    print(name, json.dumps(result["steps"][name]), flush=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
