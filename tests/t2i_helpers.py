"""Text-to-image test helpers: tiny WebDataset shards, configs/sd15.py:tiny runs through
`main`, tiny CLIP folders, and a cheap stand-in for the Inception features.

The fixtures built from them (`shards`, `run8`, `clip_folders`) are in tests/conftest.py.
"""

import io
import json
import os
import shutil
import tarfile

import filelock
import numpy as np
import PIL.Image

from configs import sd15
from fdistill_jax import config_lib
from fdistill_jax.metrics.t2i import metrics as t2i_metrics
from fdistill_jax.train import checkpoint as ckpt_lib
from tests import helpers
from tests import sd_helpers

REPO = helpers.REPO
TOKENIZER = sd_helpers.FIXTURES / "tokenizer"


def add_member(tar, name, data):
  """Adds a file NAME holding the bytes DATA to the open tarfile TAR."""
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def jpeg(rng, size):
  buf = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def write_shards(folder, n=16, per=8, seed=0, corrupt=(), empty=()):
  """img2dataset-style shards: NNNNN.jpg (20x24, non-square) + NNNNN.txt + NNNNN.json."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for s in range(0, n, per):
    with tarfile.open(os.path.join(folder, f"{s // per:05d}.tar"), "w") as tar:
      for i in range(s, min(n, s + per)):
        image = b"not a jpeg" if i in corrupt else jpeg(rng, (20, 24))
        add_member(tar, f"{i:05d}.jpg", image)
        add_member(tar, f"{i:05d}.txt", b"  " if i in empty else f"a photo of thing {i}".encode())
        add_member(tar, f"{i:05d}.json", b"{}")
  return str(folder)


def tiny_config(arg="js,tiny", config_module=sd15, **overrides):
  """`config_module`'s (configs/sd15.py, configs/sdxl.py) tiny variant with the fixture
  tokenizer as every tokenizer, and `overrides` (**{'dotted.field': value})."""
  sd_helpers.require_fixtures()          # the tokenizer is the fixtures' SD 1.5 one
  c = config_module.get_config(arg)
  c.teacher.tokenizer = str(TOKENIZER)
  if "tokenizer_2" in c.teacher:
    c.teacher.tokenizer_2 = str(TOKENIZER)
  for k, v in overrides.items():
    config_lib.set_field(c, k, v)
  return c


def main_args(workdir, shards, variant="js", *extra):
  """`main`'s flags for configs/sd15.py:VARIANT,tiny on the test's shards (no program name)."""
  return [f"--config={REPO}/configs/sd15.py:{variant},tiny", f"--workdir={workdir}",
          f"--config.teacher.tokenizer={TOKENIZER}", f"--config.data.path={shards}", *extra]


run_main = helpers.run_main_in_process


RUN8_STEPS = ("--config.total_steps=4",)   # checkpoints at 2 and 4 (tiny: checkpoint_every=2)


def make_run8(shards, tmp_path_factory):
  """configs/sd15.py:js,tiny for 4 iterations through `main`, on 8 devices.

  Made once per session: pytest-xdist workers share it through a file lock in the
  session's temporary folder (every worker's shards hold the same bytes).
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = root / "t2i_run8"
  with filelock.FileLock(str(root / "t2i_run8.lock")):
    status = workdir / ckpt_lib.STATUS_FILE
    if not (status.exists() and json.loads(status.read_text())["state"] == "finished"):
      run_main(main_args(workdir, shards, "js", *RUN8_STEPS))
  return str(workdir)



# Tiny CLIP models (tests/test_t2i_metrics.py, tests/test_t2i_sampling.py).

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 210),
           "yellow": (230, 220, 20)}
CAPTIONS = [f"a plain {name} square" for name in COLOURS]


def colour_images(h=40, w=36):
  return np.stack([np.broadcast_to(np.uint8(c), (h, w, 3)) for c in COLOURS.values()])


def _write(model, folder):
  model.save_pretrained(folder)
  for f in (sd_helpers.FIXTURES / "tokenizer").iterdir():
    shutil.copyfile(f, folder / f.name)
  return folder


def make_clip_folders(tmp_path_factory):
  """{'untied': random tiny CLIPModel, 'tied': the same towers, projections fitted so that
  each colour image and its caption map to the same one-hot vector}, and the torch model."""
  sd_helpers.require_fixtures()
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders.tokenizer import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("clip")
  torch.manual_seed(0)
  strip = lambda d: {k: v for k, v in d.items() if k != "projection_dim"}
  model = CLIPModel(CLIPConfig(text_config=strip(sd_helpers.TINY_TEXT), vision_config=strip(sd_helpers.TINY_VISION),
                               projection_dim=8)).eval()
  folders = {"untied": _write(model, root / "untied")}
  ids = CLIPTokenizer(sd_helpers.FIXTURES / "tokenizer")([t2i_metrics.DMD2_PREFIX + c for c in CAPTIONS])
  pixels = np.stack([t2i_metrics.clip_pixels(im, sd_helpers.TINY_VISION["image_size"])
                     for im in colour_images()]).transpose(0, 3, 1, 2)
  inputs = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
            "pixel_values": torch.from_numpy(pixels.copy())}
  with torch.no_grad():
    untied = model(**inputs)
    pooled_image = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
    pooled_text = model.text_model(input_ids=inputs["input_ids"]).pooler_output
    target = np.eye(len(COLOURS), 8)   # colour k -> e_k in the shared space, for both towers
    for proj, pooled in ((model.visual_projection, pooled_image),
                         (model.text_projection, pooled_text)):
      fit = np.linalg.lstsq(pooled.numpy().astype(np.float64), target, rcond=None)[0]
      proj.weight.copy_(torch.from_numpy(fit.T.astype(np.float32)))
  folders["tied"] = _write(model, root / "tied")
  reference = {"untied": (untied.image_embeds * untied.text_embeds).sum(-1).numpy()}
  return folders, reference


def features(images):
  """[B, 12] features: 2x2 average pool of each channel of the 299 images (float64)."""
  x = np.asarray(images, np.float64)[:, :298, :298].reshape(len(images), 2, 149, 2, 149, 3)
  return x.mean(axis=(2, 4)).reshape(len(images), -1)
