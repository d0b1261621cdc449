r"""How many of the package's modules an import loads, as JSON.

  python -m benchmarks.import_count --out /tmp/import_count.json
  python -m benchmarks.import_count --repo /path/to/other/checkout --probes train_loop

prints one line per probe and writes the JSON report (with the list of modules
each probe loaded) to `--out`. Each probe runs in a fresh interpreter (cwd and
PYTHONPATH: `--repo`, default this checkout) and reports the fdistill_jax
modules in `sys.modules` afterwards, over the package's total (its .py files),
how many of them are Stable Diffusion code, and whether transformers,
tokenizers or torch were imported:

  train_loop        import fdistill_jax.train.loop (the engine)
  toy_registry      fdistill_jax.plugins.registry(["toy"]) (the toy's plugin alone)
  default_registry  fdistill_jax.plugins.default_registry() (every problem)

The numbers of docs/design.md were measured this way.
"""

import datetime
import json
import os
import pathlib
import subprocess
import sys

from absl import flags

from fdistill_jax.io import atomic
from fdistill_jax.tools import cli

PROBES = {
    "train_loop": "import fdistill_jax.train.loop",
    "toy_registry": "from fdistill_jax import plugins; plugins.registry(['toy'])",
    "default_registry": "from fdistill_jax import plugins; plugins.default_registry()",
}
# Stable Diffusion code: these modules and everything under them.
SD_PREFIXES = ("fdistill_jax.models.sd", "fdistill_jax.problems.t2i", "fdistill_jax.metrics.t2i",
               "fdistill_jax.pipelines.sd", "fdistill_jax.pipelines.sd_sampling",
               "fdistill_jax.pipelines.sdxl", "fdistill_jax.loaders.diffusers",
               "fdistill_jax.loaders.ldm", "fdistill_jax.loaders.tokenizer",
               "fdistill_jax.loaders.sd_configs",
               # the pre-plugin layout's names
               "fdistill_jax.sd", "fdistill_jax.networks.sd", "fdistill_jax.teachers.sd",
               "fdistill_jax.teachers.sdxl")
HEAVY = ("transformers", "tokenizers", "torch")
CHILD = """
import json, sys
{probe}
print(json.dumps(sorted(m for m in sys.modules
                        if m == "fdistill_jax" or m.startswith("fdistill_jax."))))
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
"""

FLAGS = cli.new_flags()
flags.DEFINE_string("repo", str(pathlib.Path(__file__).resolve().parents[1]),
                    "Checkout whose fdistill_jax is measured.", flag_values=FLAGS)
flags.DEFINE_list("probes", list(PROBES), f"Which imports to measure: {sorted(PROBES)}.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "Write the JSON report here as well.", flag_values=FLAGS)


def package_modules(repo):
  """Every module of fdistill_jax under `repo` (one per .py file)."""
  root = pathlib.Path(repo)
  out = []
  for path in (root / "fdistill_jax").rglob("*.py"):
    parts = path.relative_to(root).with_suffix("").parts
    out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return sorted(out)


def is_sd(module):
  return any(module == p or module.startswith(p + ".") for p in SD_PREFIXES)


def measure(repo, probe):
  """{'modules': n, 'sd_modules': n, 'heavy': [...], 'loaded': [...]} of one probe."""
  env = {**os.environ, "PYTHONPATH": str(repo), "JAX_PLATFORMS": "cpu",
         "TF_ENABLE_ONEDNN_OPTS": "0"}
  result = subprocess.run([sys.executable, "-c", CHILD.format(probe=PROBES[probe], heavy=HEAVY)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
  if result.returncode:
    raise RuntimeError(f"probe {probe!r} failed in {repo}:\n{result.stderr[-2000:]}")
  lines = result.stdout.strip().splitlines()
  loaded, heavy = json.loads(lines[-2]), json.loads(lines[-1])
  return {"modules": len(loaded), "sd_modules": sum(map(is_sd, loaded)),
          "third_party_heavy": heavy, "loaded": loaded}


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.probes) - set(PROBES))
  if unknown:
    raise ValueError(f"--probes has unknown names {unknown}; known: {sorted(PROBES)}.")
  repo = os.path.abspath(FLAGS.repo)
  total = len(package_modules(repo))
  report = {"repo": repo, "date": datetime.date.today().isoformat(),
            "python": sys.version.split()[0], "total_modules": total, "probes": {}}
  for probe in FLAGS.probes:
    result = measure(repo, probe)
    report["probes"][probe] = result
    print(f"{probe}: {result['modules']} of {total} fdistill_jax modules "
          f"({result['sd_modules']} Stable Diffusion; heavy third-party: "
          f"{result['third_party_heavy'] or 'none'})")
  if FLAGS.out:
    atomic.write_json(FLAGS.out, report)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  cli.entry_point(main, "benchmarks.import_count", FLAGS, __doc__)()
