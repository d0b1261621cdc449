"""The toy problem's plugin: teacher, student, data source, evaluator and sweep table."""

from fdistill_jax.problems.toy import problem
from fdistill_jax.problems.toy import report
from fdistill_jax.train import registry

PLUGIN = registry.Registry(
    teachers={"toy": problem.teacher_from_config},
    students={"toy": problem.student_from_spec},
    plots={"toy": problem.plot_samples},
    sources={"toy": problem.make_source},
    evaluators={"toy": report.ToyReport},
    tables={"toy": registry.Table(report.METRICS_FILE, lambda r: r["final"], report.COLUMNS,
                                  seed_fields=("toy.fit_seed",), figure=report.sweep_figure,
                                  reference=report.teacher_reference,
                                  reference_name="teacher (exact samples)")},
)
