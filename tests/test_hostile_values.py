"""Numbers that cannot be silently wrong (docs/security.md): schedules, VAE scaling, CFG,
reference features, tokenizer ids; each refused in one line naming the field."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from fdistill_jax.loaders import sd_configs
from fdistill_jax.metrics import distances
from fdistill_jax.pipelines import denoisers
from fdistill_jax.tools import cli
from fdistill_jax.tools import sample_t2i
from fdistill_jax.loaders.errors import ConversionError

FIXTURES = pathlib.Path(os.environ.get("FDISTILL_SHARED_FIXTURES", "/work/shared/fixtures"))
SD15 = FIXTURES / "sd15"


@pytest.mark.parametrize("change, fragment", [
    ({"beta_start": float("nan")}, "beta_start=nan"),
    ({"beta_end": 2}, "beta_end=2"),
    ({"num_train_timesteps": 3e8}, "num_train_timesteps=300000000.0"),
    ({"num_train_timesteps": 10.5}, "must be an integer"),
    ({"beta_start": "0.1"}, "beta_start='0.1'"),
    ({"trained_betas": [0.1, float("nan")]}, "every beta must be a finite number in (0, 1)"),
    ({"trained_betas": {"a": 1}}, "trained_betas must be a list"),
])
def test_bad_scheduler_values_are_refused(change, fragment):
  with pytest.raises(ConversionError) as e:
    denoisers.DiscreteSchedule.from_config({**_sd15_scheduler(), **change})
  assert fragment in str(e.value) and "\n" not in str(e.value)


def _sd15_scheduler():
  path = SD15 / "scheduler" / "scheduler_config.json"
  if not path.is_file():
    pytest.skip(f"{path} missing: the shared SD 1.5 fixtures (FDISTILL_SHARED_FIXTURES)")
  return json.loads(path.read_text())


def test_sd15_schedule_still_equals_an_independent_computation():
  """alpha_bar of SD 1.5's scaled_linear schedule, written out (tolerance 1e-12 relative)."""
  got = denoisers.DiscreteSchedule.from_config(_sd15_scheduler()).alphas_cumprod
  betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * t / 999) ** 2 for t in range(1000)]
  want, prod = [], 1.0
  for b in betas:
    prod *= 1.0 - b
    want.append(prod)
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("scale", [0, float("nan"), -0.2, float("inf"), "0.18", True])
def test_vae_scaling_factor_must_be_finite_and_positive(scale):
  with pytest.raises(ConversionError, match="VAE config: scaling_factor="):
    sd_configs.vae_from_config({"scaling_factor": scale})
  with pytest.raises(ConversionError, match="VAE config: shift_factor="):
    sd_configs.vae_from_config({"shift_factor": float("nan")})
  assert sd_configs.vae_from_config({"scaling_factor": 0.13025})[1:] == (0.13025, 0.0)


@pytest.mark.parametrize("flag, fragment", [
    ("--cfg=nan", "--cfg must be a finite guidance weight"),
    ("--cfg=inf", "--cfg must be a finite guidance weight"),
    ("--height=65536", "--height=65536"),
    ("--width=0", "--width=0"),
    ("--num_per_prompt=1000000000", "--num_per_prompt=1000000000"),
])
def test_sample_t2i_sizes_and_cfg_are_bounded_at_parse_time(flag, fragment, capsys):
  with pytest.raises(SystemExit) as e:
    cli.invoke(sample_t2i.main, "sample_t2i", sample_t2i.FLAGS,
               ["--model=/nonexistent", "--prompt=a cat", flag])
  err = capsys.readouterr().err
  assert e.value.code == 2 and fragment in err and err.count("\n") == 1, err


def test_reference_features_with_nan_are_refused(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(16, 4))
  mu, sigma = features.mean(0), np.cov(features, rowvar=False)
  np.savez(tmp_path / "ok.npz", mu=mu, sigma=sigma, features=features)
  assert distances.load_reference_stats(tmp_path / "ok.npz")["features"].shape == (16, 4)
  features[3, 1] = np.nan
  np.savez(tmp_path / "nan.npz", mu=mu, sigma=sigma, features=features)
  with pytest.raises(ValueError, match="nan.npz: features hold NaN"):
    distances.load_reference_stats(tmp_path / "nan.npz")


@pytest.fixture
def tokenizer_dir(tmp_path):
  pytest.importorskip("transformers")
  pytest.importorskip("ftfy")
  src = SD15 / "tokenizer"
  if not src.is_dir():
    pytest.skip(f"{src} missing: the shared SD 1.5 fixtures (FDISTILL_SHARED_FIXTURES)")
  dst = tmp_path / "tokenizer"
  shutil.copytree(src, dst)
  return dst


def test_tokenizer_ids_are_checked_against_the_text_encoder(tokenizer_dir):
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  ok = CLIPTokenizer(tokenizer_dir, 77, vocab_size=49408)
  assert ok("a cat").max() < 49408
  with pytest.raises(ValueError, match="outside the text encoder's vocabulary of 1000"):
    CLIPTokenizer(tokenizer_dir, 77, vocab_size=1000)


def test_empty_or_broken_tokenizer_folder_is_an_error(tmp_path, tokenizer_dir):
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds neither vocab.json"):
    CLIPTokenizer(tmp_path / "empty", 77, vocab_size=49408)
  (tokenizer_dir / "tokenizer.json").unlink()
  (tokenizer_dir / "vocab.json").write_text("[" * 100000)
  with pytest.raises(ValueError, match="cannot read it as a CLIP tokenizer"):
    CLIPTokenizer(tokenizer_dir, 77, vocab_size=49408)


SD_SPEC = {"kind": "sd15", "unet": {}, "sample_shape": [8, 8, 4], "sigmas": [0.1, 1.0]}


@pytest.mark.parametrize("spec, fragment", [
    ({"kind": "toy", "width": 10**12, "depth": 3}, "'width' is 1000000000000"),
    ({"kind": "toy", "width": "64", "depth": 3}, "'width' is '64'"),
    ({"kind": "toy", "width": 64, "depth": -1}, "'depth' is -1"),
    ({"kind": "toy", "width": 64}, "'depth' is None"),
    ({**SD_SPEC, "sample_shape": [8, 8]}, "'sample_shape' is [8, 8]"),
    ({**SD_SPEC, "sample_shape": [8, 8, 2**40]}, "'sample_shape' is 1099511627776"),
    ({**SD_SPEC, "sigmas": []}, "'sigmas' is []"),
    ({**SD_SPEC, "sigmas": [0.1, float("nan")]}, "finite positive numbers"),
    ({**SD_SPEC, "sigmas": [0.1, -1.0]}, "finite positive numbers"),
    ({**SD_SPEC, "sigmas": "0.1"}, "'sigmas' is '0.1'"),
])
def test_generator_spec_fields_are_checked_before_any_module_is_built(spec, fragment):
  """generator_spec.json of a workdir or export: every field the module is built from is
  checked for type and range; one line naming the file and the field."""
  from fdistill_jax import plugins  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="generator spec") as e:
    plugins.default_registry().student_from_spec(spec)
  assert fragment in str(e.value) and "\n" not in str(e.value)
