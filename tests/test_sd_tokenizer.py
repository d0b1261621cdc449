"""Our CLIP tokenizer (transformers' CLIPTokenizer + CLIP's text cleaning) against open_clip.

The reference is open_clip's `tokenize` (its `SimpleTokenizer`, a port of openai/CLIP's, with
the BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` that its wheel ships). Its module is loaded
from the installed wheel on its own, because `import open_clip` also imports torchvision,
which a CPU-only torch install may lack. open_clip pads with 0 after the end token while
Hugging Face pads with the end token itself (49407): ids are compared up to and including
the end token, and the padding is checked separately.
"""

import importlib.util
import shutil

import numpy as np
import pytest

from fdistill_jax.loaders.tokenizer import CLIPTokenizer
from sd_helpers import FIXTURES, require_fixtures

pytest.importorskip("transformers")
pytest.importorskip("ftfy")

PROMPTS = [
    "A photo of an astronaut riding a horse on Mars.",
    "a corgi wearing a red bowtie and a purple party hat, digital art",
    "A bowl of ramen with a soft-boiled egg, studio photograph, 85mm, f/1.8, high detail",
    "Two dogs playing in the snow",
    "An oil painting of a lighthouse at dusk in the style of J.M.W. Turner",
    "",
    "   ",
    "Ein Hund im Café — naïve façade, Straße in München",
    "東京の夜景、ネオンの光 🌃 and a 猫",
    "emoji 👩‍🚀🚀 ☃ and ½ ﬁne Ｆｕｌｌ-width",
    "fish &amp; chips &lt;3 — mojibake cafÃ©",
    "It's   a\ttest\nwith  WHITESPACE and CAPITALS, isn't it? We'll see: 3.14159, 2024-05-01!",
    " ".join(["a very long prompt about a beautiful landscape with mountains"] * 12),
]


def _open_clip_tokenizer():
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip is not installed: pip install --no-deps open-clip-torch==3.3.0")
  path = next(iter(spec.submodule_search_locations)) + "/tokenizer.py"
  module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def reference():
  pytest.importorskip("torch")
  return _open_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
  require_fixtures()
  return CLIPTokenizer(FIXTURES / "tokenizer", max_length=77)


def _end(ids):
  return int(np.argmax(ids == 49407))


def test_ids_equal_open_clip(tokenizer, reference):
  ours = tokenizer(PROMPTS)
  ref = reference.tokenize(PROMPTS, context_length=77).numpy()
  assert ours.shape == ref.shape == (len(PROMPTS), 77) and ours.dtype == np.int32
  for prompt, a, b in zip(PROMPTS, ours, ref):
    end = _end(b)
    np.testing.assert_array_equal(a[:end + 1], b[:end + 1], err_msg=repr(prompt))


def test_special_tokens_truncation_and_padding(tokenizer):
  empty, long = tokenizer(["", PROMPTS[-1]])
  assert list(empty[:2]) == [49406, 49407] and (empty[2:] == 49407).all()
  assert long[0] == 49406 and long[76] == 49407 and 49407 not in long[1:76]
  short = tokenizer("Two dogs")[0]
  assert _end(short) == 3 and (short[4:] == tokenizer.pad_token_id).all()
  assert tokenizer.pad_token_id == 49407


def test_vocab_and_merges_alone(tmp_path, tokenizer):
  """SD 1.5 folders have vocab.json + merges.txt and no tokenizer.json: same ids."""
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copy(FIXTURES / "tokenizer" / name, tmp_path / name)
  np.testing.assert_array_equal(CLIPTokenizer(tmp_path)(PROMPTS), tokenizer(PROMPTS))


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer folder .* does not exist"):
    CLIPTokenizer(tmp_path / "nope")
