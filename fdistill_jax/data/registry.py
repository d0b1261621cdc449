"""The generic data sources: `config.data.kind` -> source builder.

Problems add their own kinds (the toy's mixture samples, the digits) through
their plugins; `fdistill_jax.plugins` merges them with these into the registry
the engine receives (`train.registry.Registry.sources`).
"""

from typing import Any, Callable, Mapping

from fdistill_jax.data import edm_dataset
from fdistill_jax.data import sources
from fdistill_jax.data import tfds
from fdistill_jax.data import webdataset

SOURCES: dict[str, Callable[[Any], sources.Source]] = {
    "tfds": tfds.tfds_source,
    "edm": edm_dataset.edm_source,
    "memory": sources.memory_source,
    "webdataset": webdataset.webdataset_source,
    "captions": webdataset.captions_source,
}


def make_source(config, kinds: Mapping[str, Callable[[Any], sources.Source]] = SOURCES
                ) -> sources.Source:
  """The source that `config.kind` names among `kinds` (`config` is a run's `config.data`;
  `kinds` defaults to the generic sources above)."""
  kind = sources.field(config, "kind")
  if kind not in kinds:
    raise ValueError(f"Unknown data.kind={kind!r}; known kinds: {sorted(kinds)}.")
  return kinds[kind](config)
