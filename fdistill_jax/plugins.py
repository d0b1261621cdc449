"""The composition root: the only module that imports the problems.

`default_registry()` merges the generic entries (data sources of `data/`, the
'grid' and 'fid' evaluators of `train.evaluators`) with every problem's plugin;
`registry(names)` with the named problems only (a toy-only registry imports no
Stable Diffusion code). `main` and the tools take the registry from here and
pass it into the engine:

  train.loop.train_and_evaluate(config, workdir, registry=plugins.default_registry())

Adding a problem is a folder `problems/<name>/` ending in `plugin.py: PLUGIN = Registry(...)`
plus its entry in `PROBLEMS` below (a three-line loader function and one dict line).
"""

import functools

from fdistill_jax.data import registry as data_registry
from fdistill_jax.train import evaluators
from fdistill_jax.train import registry as registry_lib

# Each problem's plugin, imported only when asked for (a toy-only registry loads no Stable
# Diffusion code). pylint: disable=g-import-not-at-top


def _image():
  from fdistill_jax.problems.image import plugin as image
  return image.PLUGIN


def _toy():
  from fdistill_jax.problems.toy import plugin as toy
  return toy.PLUGIN


def _digits():
  from fdistill_jax.problems.digits import plugin as digits
  return digits.PLUGIN


def _t2i():
  from fdistill_jax.problems.t2i import plugin as t2i
  return t2i.PLUGIN


# problem name -> its plugin.
PROBLEMS = {"image": _image, "toy": _toy, "digits": _digits, "t2i": _t2i}

GENERIC = registry_lib.Registry(sources=data_registry.SOURCES, evaluators=evaluators.EVALUATORS)


def plugin(name) -> registry_lib.Registry:
  """The plugin of problem `name`."""
  if name not in PROBLEMS:
    raise ValueError(f"Unknown problem {name!r}; known: {sorted(PROBLEMS)}.")
  return PROBLEMS[name]()


def registry(names) -> registry_lib.Registry:
  """The generic entries merged with the plugins of the problems `names` (e.g. ['toy'])."""
  return _merged(tuple(names))


@functools.lru_cache(maxsize=None)
def _merged(names):
  return registry_lib.merge(GENERIC, *(plugin(n) for n in names))


def default_registry() -> registry_lib.Registry:
  """Every problem's entries and the generic ones: what `main` and the tools use."""
  return registry(PROBLEMS)
