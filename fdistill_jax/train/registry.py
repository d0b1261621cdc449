"""The registry type: what the engine looks up by config string, and how registries merge.

The engine knows no problem by name. A `Registry` maps

  teachers     `config.teacher.kind` -> loader(config) -> `train.teacher.Teacher`
  students     a generator spec's 'kind' -> builder(spec, dtype) -> (module,
               sample_shape, num_classes)
  sources      `config.data.kind` -> builder(config.data) -> `data.sources.Source`
  evaluators   a name in `config.eval.evaluators` -> builder(EvalContext) ->
               Evaluator, or None when the config switches it off
  tables       an evaluator name -> `Table` (how `tools.sweep` makes a table row)
  samplers     a generator spec's 'kind' -> sample(flags, registry) -> path: `tools.sample`
               for generators sampled their own way (text-to-image: prompts)
  plots        a generator spec's 'kind' -> plot(path, x, labels, spec): the
               `tools.sample --grid` figure of samples that are not images
  checks       functions(config) that raise ValueError on a config the problem
               cannot run (called with the engine's own checks, before any
               teacher loads)

Each problem ends in one `Registry` (`problems/<name>/plugin.py: PLUGIN`); the
composition root (`fdistill_jax.plugins`) merges them with the generic entries
and hands the result to the engine (`train.loop.train_and_evaluate(...,
registry=...)`). This module imports no problem.
"""

import dataclasses
import types
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp

from fdistill_jax.data import registry as data_registry

_TABLES = ("teachers", "students", "sources", "evaluators", "tables", "samplers", "plots")


class Table:
  """How a problem's runs become a sweep table row: result file, measures, seed fields,
  figure, and optionally `reference(config) -> measures` with its row name.

  `figure(path, runs, config)`, if given, draws the variants side by side from
  `runs` = {variant: run directory} (one seed) and the first run's config.
  """

  def __init__(self, result_file: str, read: Callable[[dict], dict], columns,
               seed_fields=(), figure: Optional[Callable] = None, reference=None,
               reference_name="reference"):
    self.result_file, self.read, self.columns, self.seed_fields, self.figure = (
        result_file, read, columns, seed_fields, figure)
    self.reference, self.reference_name = reference, reference_name


def _frozen(mapping):
  return types.MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class Registry:
  """Named entries of one problem, or of all of them merged (see the module docstring)."""
  teachers: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  students: Mapping[str, Callable[..., tuple]] = dataclasses.field(default_factory=dict)
  sources: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  evaluators: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
  tables: Mapping[str, Table] = dataclasses.field(default_factory=dict)
  samplers: Mapping[str, Callable[..., str]] = dataclasses.field(default_factory=dict)
  plots: Mapping[str, Callable[..., str]] = dataclasses.field(default_factory=dict)
  checks: tuple = ()

  def __post_init__(self):
    for name in _TABLES:
      object.__setattr__(self, name, _frozen(getattr(self, name)))
    object.__setattr__(self, "checks", tuple(self.checks))

  def merge(self, other: "Registry") -> "Registry":
    """Both registries' entries; a key both define is refused (one home per name)."""
    merged = {}
    for name in _TABLES:
      ours, theirs = getattr(self, name), getattr(other, name)
      both = sorted(set(ours) & set(theirs))
      if both:
        raise ValueError(f"Two registries both define {name} {both}; each name must have one "
                         "home: rename one of them or leave one problem out of the merge.")
      merged[name] = {**ours, **theirs}
    return Registry(**merged, checks=self.checks + other.checks)

  def teacher(self, config):
    """The teacher `config.teacher.kind` names, loaded."""
    kind = config.teacher.kind
    if kind not in self.teachers:
      raise ValueError(f"teacher.kind={kind!r}; expected one of {sorted(self.teachers)}.")
    return self.teachers[kind](config)

  def student_from_spec(self, spec, dtype=jnp.float32):
    """(module, sample_shape, num_classes) of the generator a spec describes."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in self.students:
      raise ValueError(f"Unknown generator kind {kind!r} in the generator spec; expected one "
                       f"of {sorted(self.students)}.")
    return self.students[kind](spec, dtype)

  def source(self, data_config):
    """The data source `data_config.kind` names (`data_config` is a run's `config.data`)."""
    return data_registry.make_source(data_config, self.sources)

  def table_for(self, config) -> Table:
    """The sweep table of the first evaluator of `config` that has one."""
    for name in config.eval.evaluators:
      if name in self.tables:
        return self.tables[name]
    raise ValueError(f"No sweep table for evaluators {tuple(config.eval.evaluators)}; known: "
                     f"{sorted(self.tables)}.")

  def check(self, config):
    """Runs every problem's config checks (each raises ValueError saying what to change)."""
    for check in self.checks:
      check(config)


def merge(*registries: Registry) -> Registry:
  """One registry holding every entry of `registries`; duplicate keys are refused."""
  out = Registry()
  for r in registries:
    out = out.merge(r)
  return out
