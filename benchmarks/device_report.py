r"""One prepared device report: everything a lent accelerator should measure, in one command.

  python -m benchmarks.device_report --out=DIR                 # full size, ~10 min on one GPU
  python -m benchmarks.device_report --out=DIR --tiny          # tiny networks, CPU, a minute

Writes DIR/device_report.json and DIR/device_report.md (one table). Sections:

  training      the full f-distill update cycle (`benchmarks.train_step`, each setting in
                its own process): images/s, MFU, peak device memory and compile times of
                the CIFAR-10 DDPM++, ImageNet-64 ADM and SD 1.5 configs, bfloat16 and
                float32, remat on and off (SD 1.5), each attention kernel that differs
                from the reference here; the per-device batch is the largest of
                `BATCHES` whose estimate (`benchmarks.memory`) fits 80% of the device's
                memory, halved while the run still runs out of memory;
  sd15_latency  one-step SD 1.5 text-to-image at 512 px, batch 1: text encoding +
                one generator call + VAE decode, one jitted function (the paper's
                latency column);
  torch         the Flax networks' forward beside PyTorch's on the same device: the
                diffusers SD 1.5 U-Net (`benchmarks.sd15`), and EDM's own networks when
                NVlabs/edm is importable (`--edm_repo`; its code is not shipped here).

A section that cannot run says why in the report (`skipped`), and one that fails
records its error; the settings run in priority order until `--budget_s` is spent.
Weights are random throughout (speed and memory do not depend on them).
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks.report import REPO
from benchmarks.report import SD15_CONFIGS

GIB = 2 ** 30
BATCHES = {"cifar10": (512, 256, 128, 64, 32), "imagenet64": (256, 128, 64, 32, 16),
           "sd15": (16, 8, 4, 2, 1)}
# --tiny: the tests' networks, fixed small batches.
TINY = {"tiny": ("configs/tiny.py", None, 2), "sd15": ("configs/sd15.py", "js,tiny", 1)}
FULL = {"cifar10": ("configs/cifar10.py", None, None),
        "imagenet64": ("configs/imagenet64.py", None, None),
        "sd15": ("configs/sd15.py", None, None)}


def attention_kernels(dtype):
  """The attention settings worth timing here: the reference, and `auto` where it differs."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models import attention  # pylint: disable=g-import-not-at-top
  impl, why = attention.choose("auto", (1, 4096, 8, 64), 4096, jnp.dtype(dtype))
  if impl == "xla":
    return ["xla"], f"auto = xla for {dtype} here ({why})"
  return ["auto", "xla"], None


def _settings(tiny, names=None, dtypes=("bfloat16", "float32")):
  """(config name, dtype, remat, attention) in priority order, and the skipped ones."""
  runs, skipped = [], []
  for name in names or (TINY if tiny else FULL):
    remats = [1, 0] if name == "sd15" else [None]
    for dtype in dtypes:
      kernels, why = attention_kernels(dtype)
      if why:
        skipped.append({"config": name, "dtype": dtype, "attention": "auto", "skipped": why})
      for remat in remats:
        for kernel in kernels:
          runs.append((name, dtype, remat, kernel))
  first = [r for r in runs if r[1] == "bfloat16" and r[3] == runs[0][3]]
  return first + [r for r in runs if r not in first], skipped


def device_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def planned_batch(name, dtype, remat, limit):
  """The largest of BATCHES[name] whose memory estimate fits 80% of `limit` bytes."""
  from benchmarks import memory  # pylint: disable=g-import-not-at-top
  config, cname = memory.configure(FULL[name][0] + ":js" if name == "sd15" else FULL[name][0],
                                   remat, dtype)
  est = memory.estimate(config, cname, [1, 2])
  fixed = {s: est["rows"][0]["total"][s] - est["rows"][0]["per_example"][s] for s in ("gen", "critic")}
  for b in BATCHES[name]:
    need = max(fixed[s] + b * est["rows"][0]["per_example"][s] for s in ("gen", "critic"))
    if need < 0.8 * limit:
      return b, need
  return BATCHES[name][-1], None


def train_step_run(name, dtype, remat, kernel, batch, cycles, timeout_s, tiny):
  """One `benchmarks.train_step` run in its own process; (result or None, error text)."""
  spec = (TINY if tiny else FULL)[name]
  config_name = pathlib.Path(spec[0]).stem
  args = [sys.executable, "-m", "benchmarks.train_step", f"--config={config_name}",
          f"--dtype={dtype}", f"--per_device_batch={batch}", f"--cycles={cycles}",
          "--warmup=1", f"--attention={kernel}"]
  if spec[1]:
    args.append(f"--variant={spec[1]}")
  if remat is not None:
    args.append(f"--remat={remat}")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    try:
      proc = subprocess.run(args + [f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
      return None, f"timed out after {timeout_s:.0f} s"
    if proc.returncode:
      return None, (proc.stderr or proc.stdout)[-1500:]
    return json.loads(pathlib.Path(out).read_text())["results"][0], ""


def training(args, deadline):
  """The training section: one row per setting (run, skipped or failed)."""
  table = TINY if args.tiny else FULL
  unknown = [n for n in args.configs if n not in table]
  if unknown:
    raise ValueError(f"--configs={','.join(args.configs)}: {unknown} not among {sorted(table)}"
                     f"{' (--tiny)' if args.tiny else ''}.")
  runs, rows = _settings(args.tiny, args.configs, args.dtypes)
  limit = None if args.tiny else device_bytes()
  for name, dtype, remat, kernel in runs:
    row = {"config": name, "dtype": dtype, "remat": remat, "attention": kernel}
    left = deadline - time.time()
    if left < 30:
      rows.append({**row, "skipped": "time budget (--budget_s) spent"})
      continue
    if args.tiny:
      batch, need = TINY[name][2], None
    elif limit is None:
      rows.append({**row, "skipped": "the device reports no memory limit (memory_stats)"})
      continue
    else:
      try:
        batch, need = planned_batch(name, dtype, remat, limit)
      except Exception as e:  # pylint: disable=broad-except
        rows.append({**row, "failed": f"memory estimate: {type(e).__name__}: {e}"[-1500:]})
        continue
    row["estimate_gib"] = None if need is None else need / GIB
    while True:
      result, error = train_step_run(name, dtype, remat, kernel, batch, args.cycles, left,
                                     args.tiny)
      if result or "RESOURCE_EXHAUSTED" not in error or batch == 1:
        break
      batch //= 2                              # out of memory: halve and retry
    row["per_device_batch"] = batch
    if result is None:
      rows.append({**row, "failed": error})
      continue
    rows.append({**row, "gen_images_per_s": result["gen_images_per_s"],
                 "critic_images_per_s": result["critic_images_per_s"], "mfu": result["mfu"],
                 "peak_gib": result["memory"]["peak_bytes"] / GIB,
                 "peak_from": result["memory"]["from"], "compile_s": result["compile_s"],
                 "cycle_ms": result["cycle_ms"]})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def sd15_latency(args):
  """One-step text-to-image latency at batch 1: text encoder + generator + VAE decode."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks.report import time_jit  # pylint: disable=g-import-not-at-top
  from configs import sd15  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import diffusers as names  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import sd_configs  # pylint: disable=g-import-not-at-top
  from fdistill_jax.pipelines import sd as sd_pipeline  # pylint: disable=g-import-not-at-top
  cfgs = ({**sd15.TINY_ARCH, "scheduler": sd_configs.SD15_CONFIGS["scheduler"]} if args.tiny
          else sd_configs.SD15_CONFIGS)
  res = 16 if args.tiny else 512
  rows = []
  for dtype in args.dtypes:
    for kernel in attention_kernels(dtype)[0]:
      m = sd_pipeline.build_modules(cfgs, jnp.dtype(dtype), False, kernel)
      variables = {k: names.random_variables(m[k]) for k in ("unet", "text_encoder", "vae")}
      sigmas = tuple(float(x) for x in m["schedule"].sigmas)
      net = sd_pipeline.LatentDenoiser(m["unet"], sigmas, text_encoder=m["text_encoder"],
                                       vae=m["vae"], scaling_factor=m["scaling_factor"],
                                       shift_factor=m["shift_factor"])
      factor = sd_pipeline.vae_factor(m["vae"])
      shape = (1, res // factor, res // factor, m["unet"].in_channels)
      params = {"params": {k: v["params"] for k, v in variables.items()}}

      def one_step(v, tokens, z, net=net, sigma=sigmas[-1]):
        context = net.apply(v, tokens, method="encode_text")
        x0 = net.apply(v, sigma * z, sigma, context)       # the one-step generator
        return net.apply(v, x0, method="decode")

      tokens = jnp.asarray(np.random.default_rng(0).integers(0, 49407, (1, 77)), jnp.int32)
      z = jax.random.normal(jax.random.PRNGKey(0), shape)
      compile_s, step_s, _ = time_jit(one_step, (params, tokens, z), 1, args.iters)
      rows.append({"dtype": dtype, "attention": kernel, "resolution": res,
                   "latency_ms": 1e3 * step_s, "compile_s": compile_s})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def torch_comparison(args):
  """Flax beside PyTorch on the same device: diffusers' SD 1.5 U-Net, EDM when importable."""
  rows = []
  if args.tiny:
    return [{"network": "sd15 unet / EDM", "skipped": "--tiny: the comparison runs the "
             "full-size networks only"}]
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return [{"network": "all", "skipped": "PyTorch is not installed"}]
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import sd15  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders import sd_configs  # pylint: disable=g-import-not-at-top
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and not torch.cuda.is_available():
    rows.append({"network": "sd15 unet", "skipped": "JAX runs on the GPU but this PyTorch "
                 "has no CUDA: not the same device"})
  else:
    cfg = sd_configs.SD15_CONFIGS
    variables = sd15._variables("unet_fwd", cfg)  # pylint: disable=protected-access
    for dtype in ("bfloat16", "float32"):
      rows.append({"network": "sd15 unet forward", "dtype": dtype, "batch": args.torch_batch,
                   "flax": sd15.bench_jax("unet_fwd", cfg, dtype, args.torch_batch, 1,
                                          args.iters, variables),
                   "torch": sd15.bench_torch("unet_fwd", cfg, dtype, args.torch_batch, 1,
                                             args.iters)})
      print(json.dumps(rows[-1]), flush=True)
  rows.append(_edm_comparison(args))
  return rows


def _edm_comparison(args):
  """EDM's own PyTorch networks need NVlabs/edm's code (`--edm_repo`), not shipped here."""
  if not args.edm_repo:
    return {"network": "EDM (cifar10, imagenet64)", "skipped": "NVlabs/edm is not importable: "
            "pass --edm_repo=PATH to a clone (its code is not shipped with this project)"}
  sys.path.insert(0, args.edm_repo)
  try:
    from training import networks  # pylint: disable=g-import-not-at-top,import-error
  except ImportError as e:
    return {"network": "EDM", "skipped": f"--edm_repo={args.edm_repo}: {e}"}
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import teacher  # pylint: disable=g-import-not-at-top
  from fdistill_jax.models.edm import ARCHS  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  out = {"network": "EDM forward", "results": []}
  for arch_name in ("cifar10", "imagenet64"):
    arch = {k: v for k, v in ARCHS[arch_name].items() if k != "precond"}
    net = networks.EDMPrecond(**arch).to(device).eval()
    b = teacher.DEFAULT_BATCH[arch_name]
    r, c = arch["img_resolution"], arch["img_channels"]
    x = torch.randn(b, c, r, r, device=device)
    sigma = torch.ones(b, device=device)
    labels = torch.eye(arch["label_dim"], device=device)[torch.zeros(b, dtype=torch.long)]
    with torch.no_grad():
      net(x, sigma, labels)
      if device == "cuda":
        torch.cuda.synchronize()
      start = time.perf_counter()
      for _ in range(args.iters):
        net(x, sigma, labels)
      if device == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.iters
    flax = teacher.benchmark(arch_name, "float32", b, 1, args.iters)["forward"]
    out["results"].append({"arch": arch_name, "batch": b, "torch_images_per_s": b / step_s,
                           "flax_images_per_s": flax["images_per_s"]})
  return out


def markdown(report):
  """One table: section | setting | numbers (or why it was skipped)."""
  lines = [f"Device: {report['device']} ({report['backend']}), {report['date']}, "
           f"`{report['command']}`", "",
           "| section | setting | result |", "|---|---|---|"]
  for r in report["training"]:
    setting = (f"{r['config']} {r['dtype']} remat={r.get('remat')} attention={r['attention']}"
               + (f" batch/device={r['per_device_batch']}" if "per_device_batch" in r else ""))
    if "gen_images_per_s" in r:
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
      result = (f"{r['gen_images_per_s']:.1f} gen img/s, {r['critic_images_per_s']:.1f} critic "
                f"img/s, MFU {mfu}, peak {r['peak_gib']:.2f} GiB ({r['peak_from']}), compile "
                f"gen {r['compile_s']['gen']:.0f} s / critic {r['compile_s']['critic']:.0f} s")
    else:
      result = "skipped: " + r["skipped"] if "skipped" in r else "failed: " + r["failed"][-200:]
    lines.append(f"| training | {setting} | {_cell(result)} |")
  for r in report["sd15_latency"]:
    if "latency_ms" in r:
      lines.append(f"| one-step SD 1.5 | {r['resolution']} px {r['dtype']} attention="
                   f"{r['attention']} | {r['latency_ms']:.1f} ms (compile {r['compile_s']:.0f} s) |")
    else:
      lines.append(f"| one-step SD 1.5 | | {_cell(r.get('skipped') or r.get('failed'))} |")
  for r in report["torch"]:
    if "flax" in r:
      lines.append(f"| Flax vs PyTorch | {r['network']} {r['dtype']} batch {r['batch']} | "
                   f"Flax {r['flax']['images_per_s']:.1f} img/s, PyTorch "
                   f"{r['torch']['images_per_s']:.1f} img/s ({r['torch']['device']}) |")
    elif "results" in r:
      for e in r["results"]:
        lines.append(f"| Flax vs PyTorch | EDM {e['arch']} batch {e['batch']} | Flax "
                     f"{e['flax_images_per_s']:.1f} img/s, PyTorch {e['torch_images_per_s']:.1f} "
                     "img/s |")
    else:
      lines.append(f"| Flax vs PyTorch | {r['network']} | "
                   f"{_cell('skipped: ' + r['skipped'] if 'skipped' in r else r.get('failed'))} |")
  return "\n".join(lines) + "\n"


def _cell(text):
  return str(text).replace("|", "/").replace("\n", " ")


def _section(fn, *a):
  try:
    return fn(*a)
  except Exception as e:  # pylint: disable=broad-except
    return [{"failed": f"{type(e).__name__}: {e}"[-1500:]}]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for device_report.json and .md")
  p.add_argument("--tiny", action="store_true", help="tiny networks (tests, CPU)")
  p.add_argument("--budget_s", type=float, default=480, help="seconds for the training runs")
  p.add_argument("--configs", default="", help="subset of the training configs (default: all)")
  p.add_argument("--dtypes", default="bfloat16,float32")
  p.add_argument("--cycles", type=int, default=3)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--torch_batch", type=int, default=4)
  p.add_argument("--edm_repo", default="", help="a clone of NVlabs/edm, for EDM's PyTorch nets")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  args.configs = [c for c in args.configs.split(",") if c]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  # The training runs are child processes: this one must not take the device's memory first.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top
  start = time.time()
  report = {"command": "python -m benchmarks.device_report " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "devices": jax.device_count(), "jax": jax.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "sd15_configs": SD15_CONFIGS}
  report["training"] = training(args, start + args.budget_s)
  report["sd15_latency"] = _section(sd15_latency, args)
  report["torch"] = _section(torch_comparison, args)
  report["seconds"] = time.time() - start
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "device_report.json").write_text(json.dumps(report, indent=1))
  (out / "device_report.md").write_text(markdown(report))
  print(markdown(report), flush=True)
  return report


if __name__ == "__main__":
  main()
