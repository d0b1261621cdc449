r"""Speed of the full f-distill update cycle (Algorithm 1), as JSON.

  python -m benchmarks.train_step --config=tiny --per_device_batch=2 --cycles=3 \
      --out=/tmp/train_step_tiny.json
  python -m benchmarks.train_step --config=cifar10 --per_device_batch=64 \
      --dtype=float32,bfloat16 --cycles=10 --out=train_step_c10.json
  python -m benchmarks.train_step --config=sd15 --per_device_batch=8 \
      --dtype=float32,bfloat16 --remat=0,1 --cycles=3 --out=train_step_sd15.json

Run from the repository root. One cycle is what the training loop does per
generator update: `Trainer.iteration` for `fake_score_update_freq` steps, i.e.
one generator step and `fake_score_update_freq` critic (fake score +
discriminator) steps, on the Trainer's own jitted, sharded steps fed by its
own prefetcher. The image configs run full-size networks with random teacher
weights (speed does not depend on them), drawn in numpy because compiling
`module.init` for a full U-Net is slow on CPU. `sd15` (configs/sd15.py) runs the
full-size SD 1.5 networks with random weights (`teacher.kind='sd15_random'`, the
architecture of the config.json files in `--sd_configs`, SD 1.5's tokenizer
there), or with `--variant=js,tiny` the tests' tiny SD networks; the data are
random images with captions in memory. `--remat` sets `teacher.remat` (nn.remat
on every U-Net block of the teacher, generator and fake score: they share the
module). Per dtype (and remat setting) it reports:

  compile_s           gen / critic: `.lower(...).compile()` wall time;
  step_ms             gen / critic: one step alone (steady state, blocked);
  cycle_ms            one cycle including input, mean over --cycles after
                      --warmup cycles (cycle_ms_min: the fastest one);
  gen_images_per_s    global_batch / cycle time (generator samples updated);
  critic_images_per_s freq * global_batch / cycle time (real images consumed);
  flops               gen / critic / cycle per device, XLA cost analysis of the
                      partitioned program;
  flops_per_s_per_device, mfu   cycle flops / cycle time (/ peak; null when the
                      peak is unknown, e.g. on CPU; see PEAK_TFLOPS);
  memory              peak bytes: device memory_stats() where available (the
                      largest local device, and the sum), else the process's
                      max RSS (host); xla_memory: XLA's per-step argument /
                      output / temp bytes per device;
  input               images/s of `source.batch` alone and of the Trainer's
                      prefetcher (batch + transfer to the devices).

With several dtypes or remat settings each combination runs in its own process,
so peak memory is per combination.
"""

import contextlib
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

from absl import flags
from clu import parameter_overview
import jax
import ml_collections
import numpy as np

from benchmarks.report import SD15_CONFIGS
from benchmarks.report import write_report
from configs import cifar10, imagenet64, sd15, tiny, toy2d
from fdistill_jax import console
from fdistill_jax.models import attention as attention_lib
from fdistill_jax import plugins
from fdistill_jax.models.edm import CIFAR10_ARCH
from fdistill_jax.models.edm import IMAGENET64_ARCH
from fdistill_jax.data import registry as data_registry
from fdistill_jax.data import webdataset
from fdistill_jax.train import teacher as base
from fdistill_jax.tools import cli
from fdistill_jax.train import loop

CONFIGS = {"cifar10": cifar10, "imagenet64": imagenet64, "sd15": sd15, "tiny": tiny,
           "toy2d": toy2d}
FULL_ARCHS = {"cifar10": CIFAR10_ARCH, "imagenet64": IMAGENET64_ARCH}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s per JAX device from the vendors' spec sheets, keyed by a
# substring of `device.device_kind`; first match wins. GPU float32 uses the
# TF32 tensor-core peak; TPU float32 matmuls run as bfloat16 passes at default
# precision. TPU v2/v3 list a chip's peak halved: each core is one JAX device.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v3", {"bfloat16": 61.5, "float32": 61.5}),
)


def peak_tflops(device_kind, dtype, override=None):
  """Peak TFLOP/s of one device for `dtype`: `override`, else PEAK_TFLOPS, else None."""
  if override:
    return float(override)
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def make_config(name, dtype, per_device_batch, variant=None, fsdp=1, remat=None,
                sd_configs=SD15_CONFIGS, attention=None):
  """The named config at full size, random teacher, global batch = per-device x devices."""
  module = CONFIGS[name]
  c = module.get_config(variant) if variant else module.get_config()
  c.batch_size = per_device_batch * jax.device_count()
  c.compute_dtype = dtype
  c.mesh.fsdp = fsdp
  if attention:
    c.attention = attention
  if name in FULL_ARCHS:
    c.teacher.kind = "random"
    c.teacher.arch = ml_collections.ConfigDict(FULL_ARCHS[name])
  if name == "sd15":
    _sd15_teacher(c, sd_configs)
  if remat is not None:
    if "remat" not in c.teacher:
      raise ValueError(f"--remat: config {name!r} has no teacher.remat.")
    c.teacher.remat = bool(remat)
  return c


def _sd15_teacher(c, sd_configs):
  """Random SD 1.5 networks: the full architecture of `sd_configs`/*/config.json (or tiny)."""
  tokenizer = os.path.join(sd_configs, "tokenizer")
  if not os.path.isdir(tokenizer):
    raise ValueError(f"--sd_configs={sd_configs}: no tokenizer/ folder there; point it at an "
                     "SD 1.5 folder (config.json files and tokenizer suffice, no weights).")
  c.teacher.tokenizer = tokenizer
  if c.teacher.kind == "sd15_random":        # the tiny variant: its own arch
    return
  arch = {}
  for part in ("unet", "text_encoder", "vae"):
    with open(os.path.join(sd_configs, part, "config.json")) as f:
      arch[part] = json.load(f)
  c.teacher.kind, c.teacher.path = "sd15_random", ""
  c.teacher.arch = ml_collections.ConfigDict(arch)


def make_source(config, kind):
  """In-memory uint8 images of the config's resolution, or the config's own source."""
  if kind == "config" or config.data.kind == "toy":
    return plugins.default_registry().source(config.data)
  d = config.data
  n = max(1024, 2 * config.batch_size)
  rng = np.random.default_rng(0)
  if d.kind == "webdataset":                 # text-to-image: images with captions
    n = max(64, 2 * config.batch_size)
    images = rng.integers(0, 256, (n, d.resolution, d.resolution, 3), np.uint8)
    captions = np.asarray([f"a photo of thing {i}" for i in range(n)])
    return webdataset.TextSource(lambda idx: (images[idx], captions[idx]), num_examples=n,
                                 image_shape=images.shape[1:], num_classes=0, seed=0,
                                 name="memory image-text pairs")
  images = rng.integers(0, 256, (n, d.resolution, d.resolution, d.channels), np.uint8)
  labels = rng.integers(0, max(d.num_classes, 1), n)
  return data_registry.make_source(ml_collections.ConfigDict(dict(
      kind="memory", images=images, labels=labels, resolution=d.resolution,
      channels=d.channels, num_classes=d.num_classes)))


def _compile(jitted, *args):
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _xla_memory(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp")}


def _time_step(trainer, name, args, reps):
  """Mean seconds of `reps` blocked calls of one compiled step on the live state."""
  fn = getattr(trainer, name)
  start = time.perf_counter()
  for _ in range(reps):
    trainer.state, metrics = fn(trainer.state, *args)
    jax.block_until_ready(trainer.state)
  return (time.perf_counter() - start) / reps, metrics


def _time_cycles(trainer, batches, start_step, cycles):
  """Seconds of each full cycle (Trainer.iteration x freq, input included)."""
  freq, step, times, metrics = trainer.config.fake_score_update_freq, start_step, [], {}
  for _ in range(cycles):
    start = time.perf_counter()
    for _ in range(freq):
      metrics = trainer.iteration(step, next(batches))
      step += 1
    jax.block_until_ready(trainer.state)
    times.append(time.perf_counter() - start)
  return times, metrics, step


def input_throughput(trainer, steps):
  """images/s of `source.batch` alone and of the Trainer's prefetcher (to devices)."""
  b = trainer.config.batch_size
  trainer.source.batch(10_000, global_batch_size=b)          # warm-up
  start = time.perf_counter()
  for i in range(steps):
    trainer.source.batch(10_001 + i, global_batch_size=b)
  source_rate = b * steps / (time.perf_counter() - start)
  with contextlib.closing(trainer.batches(20_000)) as prefetch:
    jax.block_until_ready(next(prefetch))
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(prefetch))
    prefetch_rate = b * steps / (time.perf_counter() - start)
  return {"source_images_per_s": source_rate, "prefetcher_images_per_s": prefetch_rate}


def peak_memory():
  """Device peak_bytes_in_use (largest device, and summed), else the host's max RSS."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    peaks = [int(s["peak_bytes_in_use"]) for s in stats]
    return {"peak_bytes": max(peaks), "peak_bytes_all_local_devices": sum(peaks),
            "from": "device_peak_bytes_in_use"}
  return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "from": "host_max_rss"}


def build(args, dtype):
  config = make_config(args.config, dtype, args.per_device_batch, args.variant, args.fsdp,
                       None if args.remat == [] else int(args.remat[0]), args.sd_configs,
                       args.attention)
  start = time.perf_counter()     # teacher.kind='random': numpy-drawn weights, no compiled init
  trainer = loop.build_trainer(config, make_source(config, args.data),
                               registry=plugins.default_registry())
  jax.block_until_ready(trainer.state)
  return trainer, time.perf_counter() - start


def benchmark(args, dtype):
  """All numbers for one dtype (see the module docstring)."""
  trainer, setup_s = build(args, dtype)
  c, tv = trainer.config, trainer.teacher_vars
  batches = trainer.batches(0)
  try:
    batch = next(batches)
    gen, gen_compile = _compile(trainer.gen_step, trainer.state, tv, batch)
    critic, critic_compile = _compile(trainer.critic_step, trainer.state, tv, batch)
    trainer.gen_step, trainer.critic_step = gen, critic    # Trainer.iteration runs these
    _, _, step = _time_cycles(trainer, itertools.chain([batch], batches), 0, args.warmup)
    cycle_times, metrics, step = _time_cycles(trainer, batches, step, args.cycles)
  finally:
    batches.close()
  gen_s, gen_metrics = _time_step(trainer, "gen_step", (tv, batch), args.cycles)
  critic_s, _ = _time_step(trainer, "critic_step", (tv, batch), args.cycles)
  flops = {"gen": _flops(gen), "critic": _flops(critic)}
  return _report(trainer, dtype, args, dict(
      setup_s=setup_s, compile_s={"gen": gen_compile, "critic": critic_compile},
      step_ms={"gen": 1e3 * gen_s, "critic": 1e3 * critic_s}, cycle_s=float(np.mean(cycle_times)),
      cycle_ms_min=1e3 * min(cycle_times), flops=flops,
      xla_memory={"gen": _xla_memory(gen), "critic": _xla_memory(critic)},
      finite=_finite({**metrics, **gen_metrics}),
      input=input_throughput(trainer, max(4, args.cycles * c.fake_score_update_freq))))


def _finite(metrics):
  return bool(all(np.all(np.isfinite(np.asarray(v))) for v in jax.device_get(metrics).values()))


def _report(trainer, dtype, args, r):
  c = trainer.config
  freq, b, cycle_s = c.fake_score_update_freq, c.batch_size, r.pop("cycle_s")
  flops = r["flops"]
  if None not in flops.values():
    flops["cycle"] = flops["gen"] + freq * flops["critic"]
  per_s = flops["cycle"] / cycle_s if "cycle" in flops else None
  peak = peak_tflops(jax.devices()[0].device_kind, dtype, args.peak_tflops)
  return dict(
      dtype=dtype, remat=c.teacher.get("remat"), attention=c.get("attention"), global_batch=b, fake_score_update_freq=freq, cycle_ms=1e3 * cycle_s,
      gen_images_per_s=b / cycle_s, critic_images_per_s=freq * b / cycle_s, **r,
      flops_per_s_per_device=per_s, peak_tflops=peak,
      mfu=per_s / (peak * 1e12) if per_s and peak else None,
      memory=peak_memory(),
      params={"student": int(parameter_overview.count_parameters(trainer.initial_params)),
              "disc": int(parameter_overview.count_parameters(trainer.state.disc))})


def _run_isolated(argv, dtype, remat=None):
  """This script for one dtype (and remat) in a child process (peak memory per
  combination); its results."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    extra = [] if remat is None else [f"--remat={remat}"]
    subprocess.run([sys.executable, "-m", "benchmarks.train_step", *argv[1:], f"--dtype={dtype}",
                    *extra, f"--out={out}"], check=True, cwd=REPO)
    with open(out) as f:
      return json.load(f)["results"]


def _child_argv(args):
  keep = ("config", "variant", "per_device_batch", "cycles", "warmup", "data", "fsdp",
          "peak_tflops", "sd_configs", "attention")
  return ["benchmarks.train_step"] + [f"--{k}={getattr(args, k)}" for k in keep
                                      if getattr(args, k) is not None]


FLAGS = cli.new_flags()
flags.DEFINE_enum("config", "tiny", sorted(CONFIGS), "Config to benchmark.", flag_values=FLAGS)
flags.DEFINE_string("variant", None, "Config variant, e.g. 'js' (default: the config's own "
                    "divergence).", flag_values=FLAGS)
flags.DEFINE_integer("per_device_batch", 1, "Per-device batch.", flag_values=FLAGS)
flags.DEFINE_list("dtype", ["float32", "bfloat16"], "Compute dtypes (each in its own process "
                  "when several).", flag_values=FLAGS)
flags.DEFINE_integer("cycles", 3, "Timed cycles.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "Untimed cycles before them.", flag_values=FLAGS)
flags.DEFINE_enum("data", "memory", ["memory", "config"], "memory: random uint8 images of the "
                  "right size; config: the config's data source (must be prepared).",
                  flag_values=FLAGS)
flags.DEFINE_integer("fsdp", 1, "config.mesh.fsdp.", flag_values=FLAGS)
flags.DEFINE_list("remat", [], "teacher.remat settings (0/1; each in its own process when "
                  "several); default: the config's own (configs with teacher.remat: sd15).",
                  flag_values=FLAGS)
flags.DEFINE_string("sd_configs", SD15_CONFIGS, "sd15: an SD 1.5 folder whose unet/, "
                    "text_encoder/, vae/ config.json and tokenizer/ give the full-size "
                    "architecture (no weights needed).", flag_values=FLAGS)
flags.DEFINE_enum("attention", None, list(attention_lib.SETTINGS), "config.attention (default: "
                  "the config's, 'auto').", flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: "
                   "PEAK_TFLOPS by device kind).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "JSON output file.", flag_values=FLAGS)


def parse_args(argv):
  """The benchmark's settings from `argv` (program name first), checked."""
  FLAGS.unparse_flags()
  cli.parse(FLAGS, argv, "benchmarks.train_step", __doc__)
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  args.dtypes = [d.strip() for d in args.dtype if d.strip()]
  bad = [d for d in args.dtypes if d not in base.DTYPES]
  if bad or not args.dtypes:
    raise ValueError(f"--dtype={','.join(args.dtype)}: expected a comma-separated subset of "
                     f"{sorted(base.DTYPES)}.")
  if any(r not in ("0", "1") for r in args.remat):
    raise ValueError(f"--remat={','.join(args.remat)}: expected 0, 1 or 0,1.")
  return args


def main(argv=None):
  argv = sys.argv if argv is None else argv
  args = parse_args(argv)
  device = jax.devices()[0]
  report = dict(command=" ".join(["python -m benchmarks.train_step", *argv[1:]]),
                device_kind=device.device_kind, platform=device.platform,
                num_devices=jax.device_count(), num_processes=jax.process_count(),
                jax=jax.__version__, host=platform.node(), cpu_count=os.cpu_count(),
                load_average_start=os.getloadavg(), config=args.config,
                variant=args.variant, per_device_batch=args.per_device_batch,
                cycles=args.cycles, data=args.data, results=[])
  report["remat"] = args.remat or None
  if len(args.dtypes) > 1 or len(args.remat) > 1:
    for dtype, remat in itertools.product(args.dtypes, args.remat or [None]):
      report["results"] += _run_isolated(_child_argv(args), dtype, remat)
  else:
    report["results"].append(benchmark(args, args.dtypes[0]))
    print(json.dumps(report["results"][-1]), flush=True)
  report["load_average_end"] = os.getloadavg()
  write_report(report, args.out)


if __name__ == "__main__":
  console.quiet_console()
  sys.exit(cli.call(main, "benchmarks.train_step", sys.argv))
