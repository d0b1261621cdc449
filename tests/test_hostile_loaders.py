"""Bounded parsing, second round: hostile files refused while they are read (docs/security.md).

Each test builds its own small hostile file and checks the refusal is fast and
names the problem. No jax: these are the loaders' own checks, in-process,
except the deep-tuple pickle, which crashed the interpreter before the fix and
so runs in a subprocess (a crash fails the test instead of ending pytest).
"""

import io
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile

import ml_collections
import numpy as np
import PIL.Image
import pytest

from fdistill_jax.data import webdataset
from fdistill_jax.io import limits
from fdistill_jax.loaders import safe_pickle
from tests import hostile_files as hf

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Pickle graphs: tuples are checked when made, before anything hashes them.


def _deep_tuple(depth):
  """EMPTY_TUPLE, then TUPLE1 `depth` times: ((((),),),) without recursion."""
  return b")" + b"\x85" * depth


_DEEP_KEY_SCRIPT = """
import sys
from fdistill_jax.loaders import safe_pickle
data = open(sys.argv[1], "rb").read()
try:
  safe_pickle.safe_loads(data)
except safe_pickle.UnsafePickleError as e:
  print("refused:", e)
"""


@pytest.mark.parametrize("container", ["dict_key", "frozenset"])
def test_tuple_nested_250k_deep_is_refused_before_it_is_hashed(tmp_path, container):
  deep = _deep_tuple(250_000)
  if container == "dict_key":
    data = hf.PROTO2 + hf.EMPTY_DICT + deep + hf.NONE + hf.SETITEM + hf.STOP
  else:   # FROZENSET opcode (protocol 4): MARK items FROZENSET
    data = hf.PROTO4 + hf.MARK + deep + b"\x91" + hf.STOP
  path = tmp_path / "deep.pkl"
  path.write_bytes(data)
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", _DEEP_KEY_SCRIPT, str(path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])   # -11 was a segfault
  assert "refused: the pickle nests tuples more than 100 deep" in proc.stdout, proc.stdout
  assert time.time() - start < 60


def test_billion_laughs_of_tuples_is_refused_while_reading():
  """t_{k+1} = (t_k,) * 10 through the memo: 10^30 paths, 300 bytes."""
  data = hf.PROTO2 + b")" + hf.put(0)
  for _ in range(30):
    data += hf.MARK + b"h\x00" * 10 + hf.TUPLE + hf.put(0)
  data += hf.EMPTY_DICT + b"h\x00" + hf.NONE + hf.SETITEM + hf.STOP
  start = time.time()
  with pytest.raises(safe_pickle.UnsafePickleError, match="expands to more than"):
    safe_pickle.safe_loads(data)
  assert time.time() - start < 5


def test_shallow_tuples_as_keys_still_load():
  obj = {(1, (2, (3,))): [(4,), ()], frozenset({(5, 6)}): "x"}
  assert safe_pickle.safe_loads(pickle.dumps(obj, 4)) == obj


# ----------------------------------------------------------------------------
# Zip members: stored / deflate only, never inflated past their declared size.


def _zip_bytes(name, data, method=zipfile.ZIP_DEFLATED):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=method) as z:
    z.writestr(name, data)
  return bytearray(buf.getvalue())


def _patch_central(raw, offset, fmt, value):
  """Sets a field of the (only) central directory entry, e.g. 10 = method, 24 = size."""
  pos = raw.index(b"PK\x01\x02") + offset
  raw[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)
  return raw


@pytest.mark.parametrize("patch, fragment", [
    (lambda r: bytearray(_zip_bytes("m", b"x" * 100, zipfile.ZIP_BZIP2)), "method 12"),
    (lambda r: bytearray(_zip_bytes("m", b"x" * 100, zipfile.ZIP_LZMA)), "method 14"),
    (lambda r: _patch_central(r, 10, "<H", 99), "method 99"),
    (lambda r: _patch_central(r, 8, "<H", 1), "encrypted"),
])
def test_zip_members_of_unneeded_methods_are_refused(patch, fragment):
  raw = patch(_zip_bytes("m", b"x" * 100))
  with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
    with pytest.raises(limits.ResourceLimitError, match=fragment):
      limits.read_zip_member(archive, "m", limits.Budget(2**20))


def test_zip_member_understating_its_size_produces_no_more_than_it_declared():
  """64 MiB of zeros (64 KiB deflated) declaring 1,000 bytes: under 8 MiB is allocated."""
  raw = _patch_central(_zip_bytes("m", bytes(64 * 2**20)), 24, "<I", 1000)
  pos = raw.index(b"PK\x03\x04") + 22     # the local header's size too
  raw[pos:pos + 4] = struct.pack("<I", 1000)
  archive = zipfile.ZipFile(io.BytesIO(bytes(raw)))
  tracemalloc.start()
  try:
    with pytest.raises(limits.ResourceLimitError, match="corrupt"):   # its CRC is wrong
      limits.read_zip_member(archive, "m", limits.Budget(2**20))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 8 * 2**20, peak
  honest = _zip_bytes("m", bytes(3 * 2**20 + 5))     # several pieces, exact bytes
  with zipfile.ZipFile(io.BytesIO(bytes(honest))) as ok:
    assert limits.read_zip_member(ok, "m", limits.Budget(2**23)) == bytes(3 * 2**20 + 5)


def test_npz_with_a_bzip2_member_is_refused(tmp_path):
  buf = io.BytesIO()
  np.lib.format.write_array(buf, np.zeros(10, np.float32))
  with zipfile.ZipFile(tmp_path / "ref.npz", "w", zipfile.ZIP_BZIP2) as z:
    z.writestr("mu.npy", buf.getvalue())
  with pytest.raises(limits.ResourceLimitError, match=r"ref.npz\[mu\].*method 12"):
    limits.load_npz(tmp_path / "ref.npz")


# ----------------------------------------------------------------------------
# Torch archives: sizes are bounded machine integers before any product.


def test_tensor_sizes_of_huge_integers_are_refused_without_arithmetic():
  big = 10**4000 + 7             # 13,000 bits each: their product would be quadratic
  start = time.time()
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"ints in \[0, 2\*\*62\]"):
    safe_pickle._rebuild_tensor(np.zeros(4, np.float32), 0, (big,) * 64, (1,) * 64,
                                budget=limits.Budget(2**20))
  with pytest.raises(safe_pickle.TorchFormatError, match="bad tensor layout"):
    safe_pickle._rebuild_tensor(np.zeros(4, np.float32), big, (2,), (1,),
                                budget=limits.Budget(2**20))
  with pytest.raises(limits.ResourceLimitError, match="more than 2\\*\\*62 bytes"):
    limits.nbytes_of((2**62,) * 64, 4)
  assert limits.nbytes_of((3, 5), 4) == 60 and limits.nbytes_of((0, 2**62), 8) == 0
  assert time.time() - start < 1


def test_legacy_archive_with_a_storage_count_of_2_to_62_is_refused():
  torch = pytest.importorskip("torch")
  buf = io.BytesIO()
  torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf,
             _use_new_zipfile_serialization=False)
  raw = bytearray(buf.getvalue())
  assert raw[-16:] == np.arange(4, dtype="<f4").tobytes()
  np.testing.assert_array_equal(safe_pickle.load_torch(bytes(raw))["w"], np.arange(4))
  raw[-24:-16] = struct.pack("<q", 2**62)
  with pytest.raises(safe_pickle.TorchFormatError, match="claims 4,611,686,018,427,387,904"):
    safe_pickle.load_torch(bytes(raw))


# ----------------------------------------------------------------------------
# WebDataset images: dimensions read from the header, huge ones skipped undecoded.


def _png(size):
  buf = io.BytesIO()
  PIL.Image.new("L", size).save(buf, "PNG")
  return buf.getvalue()


def test_webdataset_skips_huge_images_from_their_header(tmp_path):
  """A 12000x12000 PNG (140 KB; 432 MB as RGB) is skipped and counted, not decoded."""
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    for key, data in (("a", _png((12000, 12000))), ("b", _png((10, 10)))):
      for suffix, payload in ((".png", data), (".txt", f"photo {key}".encode())):
        info = tarfile.TarInfo(key + suffix)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
  source = webdataset.webdataset_source(ml_collections.ConfigDict(dict(
      path=str(tmp_path / "00000.tar"), resolution=8, num_threads=1)))
  tracemalloc.start()
  start = time.time()
  try:
    batch = source.batch(0, global_batch_size=2)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert batch["captions"] == ["photo b", "photo b"]      # a's row reads the next example
  assert source.skipped["image too large"] >= 1
  assert peak < 50 * 2**20 and time.time() - start < 5, (peak, time.time() - start)
