"""Handwritten digits: a real-image problem small enough for a laptop CPU.

`data` (scikit-learn's bundled 8x8 digits, a fixed train / held-out split, the
'digits' data source), `classifier` (a small Flax CNN trained once on the
train split, cached; its features and class predictions are the measures'
space) and `report` (the 'digits' evaluator: Frechet distance, k-NN precision
and recall against the held-out set, class accuracy of the samples; the sweep
table's columns) and `plugin` (the 'digits' source, evaluator and table, which
`fdistill_jax.plugins` hands the engine).
"""
