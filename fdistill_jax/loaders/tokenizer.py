"""CLIP's BPE tokenizer for Stable Diffusion prompts: transformers' `CLIPTokenizer`.

Choice: the BPE itself is transformers' maintained implementation
(`CLIPTokenizer.from_pretrained(folder)`, the Rust `tokenizers` backend),
reading the model folder's `tokenizer/` files (`vocab.json` + `merges.txt`,
or `tokenizer.json`), the same files diffusers' pipelines read. It is not
reimplemented here: BPE merge order, the byte-level alphabet and the
pre-tokenizer regex are easy to get subtly wrong, and the files define them.

Before tokenizing, prompts get CLIP's own `basic_clean` (openai/CLIP
`simple_tokenizer.py`, also open_clip's): `ftfy.fix_text` and HTML unescaping
twice. transformers' fast tokenizer only normalises Unicode, whitespace and
case, so without it prompts such as "fish &amp; chips" or mojibake would get
other ids than CLIP's reference tokenizer; with it the ids equal open_clip's
`tokenize` up to and including the end token (tests/test_sd_tokenizer.py).

Output: [N, max_length] int32, `<|startoftext|>` (49406), the tokens
truncated to max_length - 2, `<|endoftext|>` (49407), then padding with the
folder's pad token (49407 for SD 1.5; open_clip pads with 0 instead).

transformers and ftfy are needed by this module only (the text-to-image
path) and are imported when a tokenizer is made, never by the core package.
"""

import html
import pathlib
from typing import Optional

import numpy as np


def _import_tokenizer_libs():
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"tokenizing prompts needs transformers and ftfy ({e}): "
                      "pip install -r requirements-test.txt (or pip install -e '.[sd]')") from e
  return ftfy, transformers


def basic_clean(text: str, ftfy) -> str:
  """CLIP's text cleaning: ftfy.fix_text, then html.unescape twice, stripped."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class CLIPTokenizer:
  """Prompts -> CLIP token ids, [N, max_length] int32 (module docstring).

  Args:
    folder: a `tokenizer/` folder (vocab.json + merges.txt or tokenizer.json,
      tokenizer_config.json).
    max_length: the text encoder's `max_position_embeddings` (77 for CLIP);
      the folder's `model_max_length` is not trusted (SD 1.5's says 1e30).
    vocab_size: the text encoder's `vocab_size`: every id the folder can
      produce (its vocabulary and its special tokens) must be below it, or the
      embedding lookup would read past the table (NaN or garbage, silently).

  Raises:
    FileNotFoundError: the folder, or its vocabulary files, are missing.
    ValueError: the files cannot be read as a CLIP tokenizer, or hold ids the
      text encoder does not have (one line naming the folder).
  """

  def __init__(self, folder, max_length: int = 77, vocab_size: Optional[int] = None):
    folder = pathlib.Path(folder)
    if not folder.is_dir():
      raise FileNotFoundError(f"tokenizer folder {folder} does not exist.")
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) and not (
        folder / "tokenizer.json").is_file():
      raise FileNotFoundError(f"tokenizer folder {folder} holds neither vocab.json + merges.txt "
                              "nor tokenizer.json; copy the model's tokenizer/ folder.")
    self._ftfy, transformers = _import_tokenizer_libs()
    try:
      self._tok = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
      self.pad_token_id = int(self._tok.pad_token_id)
      self.eos_token_id = int(self._tok.eos_token_id)
      self.bos_token_id = int(self._tok.bos_token_id)
      largest = max(max(self._tok.get_vocab().values()), self.pad_token_id, self.eos_token_id,
                    self.bos_token_id)
    except Exception as e:  # pylint: disable=broad-except  (whatever the library raises)
      raise ValueError(f"tokenizer folder {folder}: cannot read it as a CLIP tokenizer "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})."
                       ) from None
    self.max_length = int(max_length)
    if vocab_size is not None and not 0 <= largest < int(vocab_size):
      raise ValueError(f"tokenizer folder {folder}: token id {largest} (its vocabulary and "
                       f"special tokens, pad {self.pad_token_id}) is outside the text encoder's "
                       f"vocabulary of {int(vocab_size)}: the folder does not belong to this "
                       "model.")

  def __call__(self, prompts) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    cleaned = [basic_clean(p, self._ftfy) for p in prompts]
    ids = self._tok(cleaned, padding="max_length", max_length=self.max_length,
                    truncation=True)["input_ids"]
    return np.asarray(ids, np.int32).reshape(len(cleaned), self.max_length)
