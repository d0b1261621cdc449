r"""All six divergences on the toy teacher, same seeds, one markdown table.

  python -m fdistill_jax.toy_sweep --workdir=/tmp/toy_sweep --seeds=0,1,2

runs `configs/toy2d.py:<divergence>` for every divergence and seed (each seed
seeds the teacher fit, the data and the run, identically across divergences),
then writes `table.md` (mean +- std over seeds of the toy measures) and
`sweep.json` (every run's metrics). Run it from the repository root.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np

from fdistill_jax import divergences
from fdistill_jax import toy_demo


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Sweep directory (one run per divergence and seed).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each seeds the teacher fit, data and run.")
flags.DEFINE_list("divergences", list(divergences.DIVERGENCES), "Divergences to compare.")
flags.DEFINE_integer("total_steps", None, "Override the toy config's total_steps.")

COLUMNS = (("modes covered", lambda m: m["modes_covered"]),
           ("rare-mode mass / true", lambda m: sum(m["mode_mass"][-2:]) / sum(m["mode_weights"][-2:])),
           ("off-mode", lambda m: m["off_mode_fraction"]),
           ("precision", lambda m: m["precision"]),
           ("recall", lambda m: m["recall"]),
           ("KL(p||q)", lambda m: m["forward_kl"]),
           ("KL(q||p)", lambda m: m["reverse_kl"]))


def sweep(workdir, seeds, names, total_steps=None):
  """Runs every (divergence, seed); returns {name: [final metrics per seed]}.

  Runs whose metrics.json already exists are read, not rerun.
  """
  from configs import toy2d  # pylint: disable=g-import-not-at-top
  results = {}
  for name in names:
    for seed in seeds:
      c = toy2d.get_config(name)
      c.seed = c.data.seed = c.toy.fit_seed = int(seed)
      if total_steps:
        c.total_steps = total_steps
      run_dir = os.path.join(workdir, name, f"seed{seed}")
      done = os.path.join(run_dir, "metrics.json")
      if os.path.exists(done):      # finished earlier: a sweep can be resumed
        with open(done) as f:
          metrics = json.load(f)
      else:
        metrics = toy_demo.run(c, run_dir)
      results.setdefault(name, []).append(metrics["final"])
  return results


def markdown_table(results, seeds):
  """mean +- std over seeds of each measure, one row per divergence."""
  head = "| divergence | " + " | ".join(c for c, _ in COLUMNS) + " |"
  rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
  for name, runs in results.items():
    cells = []
    for _, fn in COLUMNS:
      v = np.array([fn(m) for m in runs], np.float64)
      cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + f"\n\nmean ± std over seeds {', '.join(map(str, seeds))}.\n"


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  results = sweep(FLAGS.workdir, FLAGS.seeds, FLAGS.divergences, FLAGS.total_steps)
  with open(os.path.join(FLAGS.workdir, "sweep.json"), "w") as f:
    json.dump(results, f, indent=1)
  table = markdown_table(results, FLAGS.seeds)
  with open(os.path.join(FLAGS.workdir, "table.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
