"""Teachers: what a run distils from, reached through `registry.TEACHERS`.

`registry.build(config)` returns a `base.Teacher` for `config.teacher.kind`:
'edm' (an EDM snapshot, state dict, converted directory or the workdir of a
teacher trained with method='edm'), 'init' (EDM's initialisation of an
architecture: what method='edm' starts from), 'random' (an EDM network with
random weights), 'toy' (the exact 2-D mixture teacher), 'sd15' (Stable
Diffusion 1.x, text-conditional, in latent space) or 'sd15_random' (its
networks with random weights). The training engine knows teachers only
through this record.
"""
