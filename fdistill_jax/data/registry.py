"""The data-source registry: `config.data.kind` -> source builder."""

from typing import Any, Callable

from fdistill_jax.data import edm_dataset
from fdistill_jax.data import sources
from fdistill_jax.data import tfds
from fdistill_jax.data import webdataset
from fdistill_jax.problems.digits import data as digits_data
from fdistill_jax.problems.toy import problem as toy_problem

SOURCES: dict[str, Callable[[Any], sources.Source]] = {
    "tfds": tfds.tfds_source,
    "edm": edm_dataset.edm_source,
    "memory": sources.memory_source,
    "toy": toy_problem.make_source,
    "webdataset": webdataset.webdataset_source,
    "captions": webdataset.captions_source,
    "digits": digits_data.make_source,
}


def make_source(config) -> sources.Source:
  """The source that `config.kind` names (`config` is a run's `config.data`)."""
  kind = sources.field(config, "kind")
  if kind not in SOURCES:
    raise ValueError(f"Unknown data.kind={kind!r}; known kinds: {sorted(SOURCES)}.")
  return SOURCES[kind](config)
