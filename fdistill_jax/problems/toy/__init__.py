"""The 2-D toy problem: an exact Gaussian-mixture teacher distilled on a CPU.

`mixture` (the teacher's distribution and the MLP fitted to its denoiser),
`metrics` (measures against the exact teacher), `problem` (teacher, data
source, student spec), `report` (the 'toy' evaluator, figures and the sweep
table's measures) and `plugin` (all of these as one `Registry`). The engine
reaches the toy only through the registry `fdistill_jax.plugins` hands it.
"""
