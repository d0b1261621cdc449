r"""Plot the f-distill weight h(r) of every divergence against log r.

  python -m fdistill_jax.tools.plot_weights --out=h_of_r.png
  python -m fdistill_jax.tools.plot_weights --out=h.png --divergences=rkl,js,fkl --log_r_max=4

h(r) = f''(r) r^2 (Theorem 1 of Xu, Nie, Vahdat 2025; Table 1) weights the
generator's score difference at a point x_t by how the teacher's density
compares with the student's there, r = p_teacher(x_t) / q_student(x_t).
The curves come from the library's table (`fdistill_jax.divergences.DIVERGENCES`,
evaluated in log space), before the per-batch normalisation of Section 4.
"""

from absl import flags
import numpy as np

from fdistill_jax import divergences
from fdistill_jax.metrics import figures
from fdistill_jax.tools import cli

FLAGS = cli.new_flags()
flags.DEFINE_string("out", None, "Output PNG.", flag_values=FLAGS)
flags.DEFINE_list("divergences", list(divergences.DIVERGENCES),
                  "Divergences to draw (names of fdistill_jax.divergences.DIVERGENCES).",
                  flag_values=FLAGS)
flags.DEFINE_float("log_r_min", -6.0, "Left end of the log r axis.", flag_values=FLAGS)
flags.DEFINE_float("log_r_max", 6.0, "Right end of the log r axis.", flag_values=FLAGS)
flags.DEFINE_integer("points", 401, "Points per curve.", flag_values=FLAGS)


# h(r) of the built-in divergences as Table 1 writes it (legend text only).
FORMULAS = {"rkl": "1", "softened_rkl": "1/(r+1)", "js": "r/(r+1)",
            "squared_hellinger": "sqrt(r)/2", "fkl": "r", "jeffreys": "r+1"}


def weight_curves(names, log_r):
  """{name: h(r) at each log r} (numpy float64) from the divergence table."""
  return {name: np.exp(np.asarray(divergences.get_divergence(name).log_h(log_r), np.float64))
          for name in names}


def plot_weights(path, names=tuple(divergences.DIVERGENCES), log_r_min=-6.0, log_r_max=6.0,
                 points=401):
  """Writes the figure; returns its absolute path."""
  if not log_r_min < log_r_max or points < 2:
    raise ValueError(f"need log_r_min < log_r_max and points >= 2; got {log_r_min}, "
                     f"{log_r_max}, {points}.")
  log_r = np.linspace(log_r_min, log_r_max, points).astype(np.float32)
  curves = {f"{name}: h = {FORMULAS[name]}" if name in FORMULAS else name: h
            for name, h in weight_curves(names, log_r).items()}
  notes = [(0.0, "r = 1: student matches teacher")] if log_r_min < 0 < log_r_max else []
  return figures.plot_curves(
      path, log_r, curves, xlabel="log r,   r = p_teacher / q_student",
      ylabel="h(r) = f''(r) r^2  (log scale)", log_y=True, notes=notes, legend_loc="upper left",
      title="f-distill weight per divergence (Table 1; before batch normalisation)\n"
            "r < 1: the student puts too much mass here; r > 1: too little")


def main(argv):
  del argv
  if not FLAGS.out:
    raise ValueError("--out=PATH.png is required.")
  print(f"wrote {plot_weights(FLAGS.out, FLAGS.divergences, FLAGS.log_r_min, FLAGS.log_r_max, FLAGS.points)}")
  return 0


cli_main = cli.entry_point(main, "plot_weights", FLAGS, __doc__)

if __name__ == "__main__":
  cli_main()
