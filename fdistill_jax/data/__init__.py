"""Data sources: deterministic, process-sharded batches of a run's real examples.

`registry.make_source(config.data)` builds the generic source `config.data.kind`
names (the problems add theirs through `fdistill_jax.plugins`); `sources` holds
the shared machinery (example order, checks, `IndexedSource`, `Prefetcher`),
`tfds`, `edm_dataset` and `webdataset` (image-text shards and prompt files) the
file formats, `pixels` the uint8 <-> [-1, 1] convention.
"""
