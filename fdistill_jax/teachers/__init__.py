"""Teachers: what a run distils from, reached through `registry.TEACHERS`.

`registry.build(config)` returns a `base.Teacher` for `config.teacher.kind`:
'edm' (an EDM snapshot, state dict, converted directory or the workdir of a
teacher trained with method='edm'), 'init' (EDM's initialisation of an
architecture: what method='edm' starts from), 'random' (an EDM network with
random weights), 'toy' (the exact 2-D mixture teacher), 'sd15' (Stable
Diffusion 1.x, text-conditional, in latent space), 'sd15_random' (its
networks with random weights), 'sdxl' or 'sdxl_random' (SDXL: two text
towers, pooled text and size/crop conditioning as a pytree). The training engine knows teachers only
through this record.
"""
