r"""The digits table in one command: teacher, every divergence, both ablations, as markdown.

  python -m fdistill_jax.tools.digits_sweep --workdir=runs/digits --seeds=0

trains (or reuses) the digits classifier in WORKDIR/classifier, the EDM teacher
(`configs/digits.py:teacher`, seed `--teacher_seed`, shared by every seed) and,
for each seed, a distillation run of each variant (`--variants`; default the
six divergences, 'no_gan' and 'gan_only') plus forward KL without the two-stage
normalisation ('fkl_unnormalised', for Fig. 5(b) of `tools.analysis`), all
through the same engine as `python -m fdistill_jax.main`. It then writes
WORKDIR/table.md and WORKDIR/sweep.json with one row per

  held-out vs train split (floor)     the measures of real digits
  teacher, Heun 18 steps (35 calls)   EDM's sampler on the teacher
  teacher, 1 step                     the teacher's denoiser at sigma_max (the
                                      student's starting point)
  each variant                        the one-step student (EMA weights)

and the columns FD, precision, recall, class accuracy (`digits.report`),
network calls per sample and the wall time of the run (seconds, compilation
and evaluation included; the teacher rows share the teacher run's). Runs are
kept in WORKDIR/VARIANT/seedS_HASH (`tools.sweep`: HASH digests the resolved
config), so a rerun reuses finished runs, resumes interrupted ones from their
checkpoints, and reruns what a changed setting affects. `--runlocal` makes every
run CI-sized. `--jobs=3` trains three students at a time, each in a spawned
process. With several seeds the table gains a paired column (each student's
FD minus reverse KL's at the same seed), and WORKDIR/fd_curves.png shows every
student's FD during training (`digits.eval_every`).
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

from absl import flags

from fdistill_jax import console
from fdistill_jax import plugins
from fdistill_jax.problems.digits import report as digits_report
from fdistill_jax.io import atomic
from fdistill_jax.tools import analysis
from fdistill_jax.tools import cli
from fdistill_jax.tools import sweep
from fdistill_jax.train import checkpoint as ckpt_lib
from fdistill_jax.train import loop
from fdistill_jax.train import registry

FLAGS = cli.new_flags()
flags.DEFINE_string("workdir", None, "Sweep directory (classifier, teacher, one run per "
                    "variant and seed, table.md).", flag_values=FLAGS)
flags.DEFINE_string("config", "configs/digits.py", "The digits config file.", flag_values=FLAGS)
flags.DEFINE_list("variants", ["rkl", "softened_rkl", "js", "squared_hellinger", "fkl",
                               "jeffreys", "no_gan", "gan_only"],
                  "Distillation variants of the config, one row each.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0"], "Seeds of the distillation runs (mean +- std over them).",
                  flag_values=FLAGS)
flags.DEFINE_integer("teacher_seed", 0, "Seed of the one teacher run.", flag_values=FLAGS)
flags.DEFINE_bool("unnormalised", True, "Also run forward KL without the two-stage "
                  "normalisation (Fig. 5(b)).", flag_values=FLAGS)
flags.DEFINE_bool("runlocal", False, "CI-sized runs (the configs' 'runlocal').",
                  flag_values=FLAGS)
flags.DEFINE_integer("jobs", 1, "Student runs trained at once, each in its own process (its "
                     "console in RUN_DIR/console.log). On a 2-core CPU, 3 finish the table "
                     "about 1.5x sooner than 1: one small run leaves cores idle.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "Config override FIELD=VALUE for every run, repeatable.",
                          flag_values=FLAGS)

TEACHER = "teacher"
UNNORMALISED = "fkl_unnormalised"      # forward KL, both normalisation stages off
UNNORMALISED_SET = (("loss.normalize_ratio", False), ("loss.normalize_weight", False))
RUN_TIME = "sweep_time.json"          # written into each run directory
TABLE_FILE, RESULTS_FILE = "table.md", "sweep.json"
CURVES_FILE = "fd_curves.png"         # with --config digits.eval_every > 0
_TABLE = registry.Table(digits_report.METRICS_FILE, lambda r: r, digits_report.COLUMNS)


def _token(variant, runlocal):
  return f"{variant},runlocal" if runlocal else variant


def _plan(config_path, workdir, name, variant, seed, overrides, runlocal):
  """(config, resolved config as JSON-ready dict, run directory) of one run."""
  config = sweep.run_config(config_path, _token(variant, runlocal), seed, overrides, _TABLE)
  resolved = json.loads(config.to_json())
  return config, resolved, sweep.run_dir_for(workdir, name, seed, resolved)


def run_one(config_path, workdir, name, variant, seed, overrides, runlocal):
  """Runs (or reuses, or resumes) one run; returns (run dir, its digits_metrics.json, seconds)."""
  config, resolved, run_dir = _plan(config_path, workdir, name, variant, seed, overrides,
                                    runlocal)
  done = os.path.join(run_dir, digits_report.METRICS_FILE)
  if os.path.exists(done) and os.path.exists(os.path.join(run_dir, RUN_TIME)):
    console.say("%s seed %s: done earlier with this config (reused).", name, seed)
  else:
    console.say("%s seed %s -> %s", name, seed, run_dir)
    atomic.write_json(os.path.join(run_dir, sweep.RUN_CONFIG), resolved)
    resumed = os.path.isdir(ckpt_lib.path(run_dir, ckpt_lib.CHECKPOINTS))
    load, start = os.getloadavg(), time.time()
    loop.train_and_evaluate(config, run_dir, registry=plugins.default_registry())
    atomic.write_json(os.path.join(run_dir, RUN_TIME), {
        "seconds": time.time() - start, "resumed": resumed,
        "load_average_1_5_15min_at_start": list(load),
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count()})
  return run_dir, _read(done), _read(os.path.join(run_dir, RUN_TIME))["seconds"]


def _read(path):
  with open(path) as f:
    return json.load(f)


def run_all(config_path, workdir, variants, seeds, teacher_seed, overrides=(), runlocal=False,
            unnormalised=True, jobs=1):
  """Every run of the table; returns ({row: [measures per seed]}, {row: [run dirs]}).

  The teacher trains first, here; then the students, `jobs` at a time (`_run_students`).
  """
  workdir = os.path.abspath(workdir)
  common = [("digits.classifier", os.path.join(workdir, "classifier"))] + list(overrides)
  teacher_dir, teacher, seconds = run_one(config_path, workdir, TEACHER, TEACHER, teacher_seed,
                                          common, runlocal)
  rows = {teacher["floor"]["name"]: [dict(teacher["floor"], seconds=None)]}
  for row in teacher["rows"]:
    rows[row["name"]] = [dict(row, seconds=seconds)]
  dirs = {TEACHER: [teacher_dir]}
  students = [(v, v, []) for v in variants]
  if unnormalised:
    students.append((UNNORMALISED, "fkl", list(UNNORMALISED_SET)))
  runs = [(config_path, workdir, name, variant, seed,
           common + [("teacher.path", teacher_dir)] + extra, runlocal)
          for name, variant, extra in students for seed in seeds]
  for (_, _, name, *_), (run_dir, result, seconds) in zip(runs, _run_students(runs, jobs)):
    rows.setdefault(name, []).append(dict(result["rows"][0], seconds=seconds))
    dirs.setdefault(name, []).append(run_dir)
  return rows, dirs


def _run_students(runs, jobs, run=None):
  """run(*args) (default `run_one`) of each entry of `runs`, in order: here, or in `jobs`
  processes; `run` must then be a module-level function (it is pickled)."""
  run = run or run_one
  if jobs <= 1 or len(runs) <= 1:
    return [run(*args) for args in runs]
  # 'spawn': a forked child would inherit this process's JAX runtime and its threads.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(min(jobs, len(runs)), mp_context=context) as pool:
    futures = [pool.submit(_run_in_worker, run, args) for args in runs]
    results = []
    for args, future in zip(runs, futures):
      results.append(future.result())
      console.say("%s seed %s finished: FD %.3f (%s).", args[2], args[4],
                  results[-1][1]["rows"][0]["fd"], results[-1][0])
    return results


CONSOLE_LOG = "console.log"           # a worker's output, in its run directory


def _run_in_worker(run, args):
  """run(*args) in a worker process, its stdout and stderr sent to RUN_DIR/console.log."""
  run_dir = _plan(*args)[2]
  os.makedirs(run_dir, exist_ok=True)
  sys.stdout.flush()
  sys.stderr.flush()
  with open(os.path.join(run_dir, CONSOLE_LOG), "a") as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
  console.quiet_console()      # log records at INFO go to the run's log.txt, not here too
  return run(*args)


COLUMNS = digits_report.COLUMNS + (("wall time (s)", lambda m: m["seconds"]),)
WHOLE_NUMBERS = ("calls / sample", "wall time (s)")     # printed without decimals


PAIRED_WITH = "rkl"                     # the paired column's reference row (DMD2)


def paired_cell(runs, reference):
  """FD minus the reference row's FD of the same seed: mean ± std over seeds ('-' when the
  row is not a student of every seed). Every student of one seed shares that seed's noise
  and data order, so these differences vary less between seeds than the FDs themselves."""
  if reference is None or len(runs) != len(reference) or len(runs) < 2:
    return "-"
  return sweep.cell([m["fd"] - r["fd"] for m, r in zip(runs, reference)])


def markdown_table(rows, seeds):
  """One row per entry of `rows`; each cell the value, or mean ± std over seeds; with
  several seeds, a last column of paired FD differences against `PAIRED_WITH`."""
  reference = rows.get(PAIRED_WITH)
  paired = len(seeds) > 1 and reference is not None
  def column_cell(column, values):
    if column == "calls / sample" and len(set(values)) == 1:
      return sweep.cell(values[:1], 0)             # a property of the sampler, no spread
    return sweep.cell(values, 0 if column in WHOLE_NUMBERS else 3)
  lines = [[name] + [column_cell(column, [fn(m) for m in runs]) for column, fn in COLUMNS]
           + ([paired_cell(runs, reference if len(runs) > 1 else None)] if paired else [])
           for name, runs in rows.items()]
  header = ["row"] + [c for c, _ in COLUMNS] + ([f"FD - {PAIRED_WITH} (same seed)"]
                                                 if paired else [])
  text = sweep.markdown(header, lines)
  return (f"{text}\n\n{sweep.seeds_note(seeds, 'Students: ')} (std with ddof 0); one "
          "teacher (its rows and the floor have no spread).\n")


def curves(dirs, names=None):
  """{row: {seed position: (iterations, FD)}} from the students' TensorBoard files; rows
  whose runs logged FD at fewer than two iterations (digits.eval_every=0) are left out."""
  out = {}
  for name in names or [n for n in dirs if n != TEACHER]:
    runs = {}
    for i, run_dir in enumerate(dirs[name]):
      try:
        steps, fds = analysis.read_scalar(run_dir, digits_report.FD_TAG)
      except ValueError:
        continue
      if len(steps) > 1:
        runs[i] = (steps, fds)
    if runs:
      out[name] = runs
  return out


def write_curves(path, rows, dirs, seeds):
  """`digits_report.curves_figure` of every student row, if the runs logged FD curves."""
  found = curves(dirs)
  if not found:
    return None
  found = {name: {seeds[i]: c for i, c in runs.items()} for name, runs in found.items()}
  fd = lambda name: next((r[0]["fd"] for n, r in rows.items() if n.startswith(name)), None)
  return digits_report.curves_figure(path, found, fd("teacher, Heun"), fd("teacher, 1 step"))


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise ValueError("--workdir=DIR is required (the sweep's directory).")
  overrides = sweep.parse_overrides(FLAGS.config, FLAGS.set)
  rows, dirs = run_all(FLAGS.config, FLAGS.workdir, FLAGS.variants, FLAGS.seeds,
                       FLAGS.teacher_seed, overrides, FLAGS.runlocal, FLAGS.unnormalised,
                       FLAGS.jobs)
  text = markdown_table(rows, FLAGS.seeds)
  atomic.write_json(os.path.join(FLAGS.workdir, RESULTS_FILE),
                    {"rows": rows, "run_dirs": dirs, "seeds": FLAGS.seeds})
  atomic.write_text(os.path.join(FLAGS.workdir, TABLE_FILE), text)
  figure = write_curves(os.path.join(FLAGS.workdir, CURVES_FILE), rows, dirs, FLAGS.seeds)
  if figure:
    console.say("FD during training, every variant and seed: %s", figure)
  print(text)
  return 0


cli_main = cli.entry_point(main, "digits_sweep", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
