"""Test-session setup.

Eight simulated CPU devices so that sharding is exercised on any machine; tests
that want one device build a mesh over `jax.devices()[:1]`. This must run
before jax is imported anywhere. Shared fixtures live here, shared helpers in
tests/helpers.py, tests/sd_helpers.py and tests/t2i_helpers.py.

Two tiers (pyproject.toml): `python -m pytest -q -n 2 tests` runs the tests not
marked slow; `python -m pytest -q -n 2 -m slow tests` runs the slow ones.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA's optimisation passes cost more than they save on these tiny programs: measured on
# test_train's gradient and fsdp tests (cold compile cache, loaded 2-core CPU, 2026-12-06),
# 50.5 s of CPU with them off against 66.1 s on, same tolerances. Set here, not with
# jax.config, so that the `main` subprocesses the tests start compile the same programs
# (runs compared bitwise across processes); JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Compiles dominate these tests; many programs recur across tests (and across
# xdist workers), so share them through JAX's persistent compilation cache.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("FDISTILL_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "fdistill_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The reference fixtures (EDM and SD 1.5 outputs of the PyTorch code): ../shared/fixtures
# beside the repository, or wherever FDISTILL_SHARED_FIXTURES points.
FIXTURES_ENV = "FDISTILL_SHARED_FIXTURES"


def shared_fixtures() -> pathlib.Path:
  """$FDISTILL_SHARED_FIXTURES if set, else ../shared/fixtures beside the repository."""
  override = os.environ.get(FIXTURES_ENV)
  return pathlib.Path(override) if override else REPO_ROOT.parent / "shared" / "fixtures"


SHARED_FIXTURES = shared_fixtures()


@pytest.fixture(scope="session")
def edm_fixtures():
  """Directory of EDM reference outputs (SHARED_FIXTURES/edm), or skip."""
  path = SHARED_FIXTURES / "edm"
  if not path.is_dir():
    pytest.skip(f"EDM reference fixtures not found at {path}: check out the shared/ folder "
                f"beside the repository or set {FIXTURES_ENV}=/path/to/fixtures.")
  return path


def pytest_collection_modifyitems(items):
  """Tests marked slow run first (stable order otherwise): xdist hands the first tests out
  to the workers as they free up, so the minutes-long ones start early on both workers and
  the short ones fill the end, instead of one worker finishing a long test alone."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# ----------------------------------------------------------------------------
# Text-to-image fixtures (built by tests/t2i_helpers.py; imported lazily so that the
# other tests do not load the SD modules).


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Tiny img2dataset-style WebDataset shards (16 JPEGs with captions), or skip."""
  from tests import t2i_helpers  # pylint: disable=g-import-not-at-top
  if not t2i_helpers.TOKENIZER.is_dir():
    pytest.skip(f"SD 1.5 tokenizer fixture not found at {t2i_helpers.TOKENIZER}: check out "
                f"the shared/ folder beside the repository or set {FIXTURES_ENV}.")
  return t2i_helpers.write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def run8(shards, tmp_path_factory):
  """configs/sd15.py:js,tiny for 4 iterations through `main` on 8 devices, made once per
  session (xdist workers share it through a file lock); its workdir."""
  from tests import t2i_helpers  # pylint: disable=g-import-not-at-top
  return t2i_helpers.make_run8(shards, tmp_path_factory)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
  """Tiny CLIP folders ('untied' random, 'tied' colour <-> caption) and reference scores."""
  from tests import t2i_helpers  # pylint: disable=g-import-not-at-top
  return t2i_helpers.make_clip_folders(tmp_path_factory)
