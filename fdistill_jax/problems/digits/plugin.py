"""The digits problem's plugin: data source, evaluator and sweep table.

Its teachers are EDM networks trained here (method='edm'), loaded by the image
problem's 'edm' and 'init' teachers: a digits run needs both plugins.
"""

from fdistill_jax.problems.digits import data
from fdistill_jax.problems.digits import report
from fdistill_jax.train import registry

PLUGIN = registry.Registry(
    sources={"digits": data.make_source},
    evaluators={"digits": report.DigitsReport},
    # The first sampler's row (the one-step generator); the whole digits table, with the
    # teacher's rows and wall times, is `fdistill_jax.tools.digits_sweep`.
    tables={"digits": registry.Table(report.METRICS_FILE, lambda r: r["rows"][0],
                                     report.COLUMNS)},
)
