r"""One config over several variants and seeds, through the same engine, as one table.

  python -m fdistill_jax.tools.sweep --config=configs/toy2d.py --workdir=/tmp/toy_sweep \
      --variants=rkl,softened_rkl,js,squared_hellinger,fkl,jeffreys --seeds=0,1,2 \
      --set=total_steps=3000

runs `--config:VARIANT` with each seed (the seed sets `seed`, `data.seed` and the
problem's own seed fields, the same for every variant), then writes
`table.md` (mean +- std over seeds of the problem's measures; a problem with a
reference, such as the toy's exact teacher samples, gets it as the first row,
measured with each seed), `sweep.json`
(every run's measures) and, where the problem has one, a figure of all
variants side by side (`figure.png`, the first seed's runs).

Each run lives in `WORKDIR/VARIANT/seedS_HASH`, HASH being a digest of its
full resolved config (also written there as `sweep_config.json`): a run is
reused only when a finished one with the same config exists, so changing any
setting (--set, the config file, the code's defaults) runs it again in a new
folder and keeps the old one. An unfinished run with the same config resumes
from its checkpoint. A teacher is built once per distinct teacher setting
(the toy's fitted MLP once per seed), not once per run. Console: "run k/N".
"""

import hashlib
import json
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from fdistill_jax import config_lib
from fdistill_jax.io import atomic
from fdistill_jax.tools import cli
from fdistill_jax import console
from fdistill_jax import plugins
from fdistill_jax.train import loop

FLAGS = cli.new_flags()
flags.DEFINE_string("config", None, "Config file path (without ':variant').", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Sweep directory (one run per variant and seed).", flag_values=FLAGS)
flags.DEFINE_list("variants", ["rkl", "softened_rkl", "js", "squared_hellinger", "fkl",
                               "jeffreys"], "Config variants (e.g. divergences), one row each.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each seeds the teacher, data and run.", flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE (Python literal), repeatable.", flag_values=FLAGS)

RUN_CONFIG = "sweep_config.json"
FIGURE = "figure.png"




def parse_overrides(config_path, texts) -> list:
  """[(field, value)] of `--set=FIELD=VALUE` texts, each value parsed by ml_collections as
  `--config.FIELD=VALUE` parses it (by the type of the field in the config file: numbers,
  booleans, tuples, strings); an unknown field is one line naming the nearest valid ones."""
  config = config_lib.load_config_file(config_path)
  for text in texts:
    if "=" not in text:
      raise ValueError(f"--set={text!r}; expected FIELD=VALUE, e.g. --set=total_steps=3000.")
    message = config_lib.unknown_field(config, text.split("=", 1)[0].strip())
    if message:
      raise ValueError(f"--set={text}: {message}")
  argv = ["sweep"] + [f"--config.{text.strip()}" for text in texts]
  parser = flags.FlagValues()
  # config_flags finds the --config.FIELD flags to define in the argv it is handed.
  config_flags.DEFINE_config_dict("config", config, flag_values=parser, sys_argv=argv)
  try:
    parser(argv)
  except flags.Error as e:
    raise ValueError(f"--set: {str(e).splitlines()[0]}") from None
  return sorted(config_flags.get_override_values(parser["config"]).items())


def run_config(config_path, variant, seed, overrides, table):
  """The resolved config of one run."""
  config = config_lib.load_config_file(f"{config_path}:{variant}")  # checks the variant
  for key, value in overrides:
    try:
      config_lib.set_field(config, key, value)
    except ValueError as e:
      raise ValueError(f"--set={key}=...: {e}") from None
  for field in ("seed", "data.seed") + tuple(table.seed_fields):
    config_lib.set_field(config, field, int(seed))
  return config


def _teacher_key(config):
  c = json.loads(config.to_json())
  return json.dumps([c.get("teacher"), c.get("toy"), c.get("seed"), c["data"].get("mixture"),
                     c.get("compute_dtype")], sort_keys=True)


def config_digest(resolved) -> str:
  """8 hex digits of sha256 over a resolved config's JSON (sorted keys)."""
  return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]


def run_dir_for(workdir, variant, seed, resolved) -> str:
  return os.path.join(workdir, variant, f"seed{seed}_{config_digest(resolved)}")


def sweep(config_path, workdir, variants, seeds, overrides=(), registry=None):
  """Runs every (variant, seed) not already done with the same config.

  `registry` (default `plugins.default_registry()`) supplies the teachers, the
  runs' pieces and the table (`Registry.table_for`: the first evaluator of the
  config with one). Returns ({variant: [measures per seed]}, table, {variant:
  [run dir per seed]}).
  """
  registry = registry or plugins.default_registry()
  base = config_lib.load_config_file(f"{config_path}:{variants[0]}")
  table = registry.table_for(base)
  jobs = [(v, s) for v in variants for s in seeds]
  results, dirs, teachers = {}, {}, {}
  if table.reference is not None:
    results[table.reference_name] = [
        table.reference(run_config(config_path, variants[0], s, overrides, table)) for s in seeds]
  for k, (variant, seed) in enumerate(jobs, 1):
    config = run_config(config_path, variant, seed, overrides, table)
    resolved = json.loads(config.to_json())
    run_dir = run_dir_for(workdir, variant, seed, resolved)
    done = os.path.join(run_dir, table.result_file)
    if os.path.exists(done):
      console.say("run %d/%d: %s seed %s (done earlier with this config: reused)", k,
                  len(jobs), variant, seed)
    else:
      console.say("run %d/%d: %s seed %s -> %s", k, len(jobs), variant, seed, run_dir)
      atomic.write_json(os.path.join(run_dir, RUN_CONFIG), resolved)
      key = _teacher_key(config)
      if key not in teachers:
        teachers[key] = registry.teacher(ml_collections.FrozenConfigDict(config))
      loop.train_and_evaluate(config, run_dir, registry=registry, teacher=teachers[key])
    results.setdefault(variant, []).append(table.read(_read(done)))
    dirs.setdefault(variant, []).append(run_dir)
  return results, table, dirs


def _read(path):
  with open(path) as f:
    return json.load(f)


def cell(values, decimals=3) -> str:
  """One table cell: '-' for no value, the value for one seed, else 'mean ± std'."""
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  v = np.asarray(values, np.float64)
  if len(v) == 1:
    return f"{v[0]:.{decimals}f}"
  return f"{v.mean():.{decimals}f} ± {v.std():.{decimals}f}"


def markdown(header, rows) -> str:
  """A GitHub markdown table (the project's one table writer); '|' in a cell is escaped."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


def seeds_note(seeds, what="") -> str:
  """'mean ± std over seeds 0, 1, 2' or, for one seed, 'seed 0' (no spread to show)."""
  if len(seeds) > 1:
    return f"{what}mean ± std over seeds {', '.join(map(str, seeds))}"
  return f"{what}seed {seeds[0]}"


def markdown_table(results, table, seeds):
  """mean ± std over seeds of each measure, one row per variant."""
  rows = [[name] + [cell([fn(m) for m in runs]) for _, fn in table.columns]
          for name, runs in results.items()]
  text = markdown(["variant"] + [c for c, _ in table.columns], rows)
  return f"{text}\n\n{seeds_note(seeds)}.\n"


def main(argv):
  del argv
  if not FLAGS.config or not FLAGS.workdir:
    raise ValueError("--config=PATH and --workdir=DIR are required.")
  overrides = parse_overrides(FLAGS.config, FLAGS.set)
  results, table, dirs = sweep(FLAGS.config, FLAGS.workdir, FLAGS.variants, FLAGS.seeds,
                               overrides)
  atomic.write_json(os.path.join(FLAGS.workdir, "sweep.json"),
                    {"results": results, "run_dirs": dirs})
  text = markdown_table(results, table, FLAGS.seeds)
  atomic.write_text(os.path.join(FLAGS.workdir, "table.md"), text)
  if table.figure is not None:
    first = {variant: runs[0] for variant, runs in dirs.items()}
    config = _read(os.path.join(next(iter(first.values())), RUN_CONFIG))
    path = table.figure(os.path.join(FLAGS.workdir, FIGURE), first, config)
    console.say("Figure of the variants (seed %s): %s", FLAGS.seeds[0], path)
  print(text)
  return 0


cli_main = cli.entry_point(main, "sweep", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
