"""The 2-D toy problem: an exact Gaussian-mixture teacher distilled on a CPU.

`mixture` (the teacher's distribution and the MLP fitted to its denoiser),
`metrics` (measures against the exact teacher), `problem` (the registry
entries: teacher, data source, student spec) and `report` (the 'toy'
evaluator, figures and the sweep table). Nothing here imports the training
engine: the engine reaches the toy through its registries.
"""
