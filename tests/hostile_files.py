"""Hostile files, built byte by byte, for tests/test_hostile_files.py (not a test module).

Pickles are assembled from opcodes (`Asm`) so that they say exactly what an
attacker would write: a numpy dtype whose BUILD state declares fields beyond
its item size, a 100 GB `_reconstruct`, a list that expands to 10^30 nodes,
containers nested 100,000 deep, a 2^60-byte length field... Each builder
writes one file into a directory and returns its name.
"""

import io
import json
import struct
import zipfile

import numpy as np

PROTO2, PROTO4, STOP = b"\x80\x02", b"\x80\x04", b"."
MARK, TUPLE, REDUCE, BUILD, NEWOBJ = b"(", b"t", b"R", b"b", b"\x81"
EMPTY_DICT, EMPTY_LIST, SETITEM, APPEND, APPENDS, LIST = b"}", b"]", b"s", b"a", b"e", b"l"
POP, NONE, TRUE, FALSE = b"0", b"N", b"\x88", b"\x89"


def g(module, name):
  """GLOBAL module.name."""
  return b"c" + f"{module}\n{name}\n".encode()


def s(text):
  """BINUNICODE."""
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def raw(data):
  """BINBYTES (protocol 3+)."""
  return b"B" + struct.pack("<I", len(data)) + data


def i(n):
  """An int of any size (BININT or LONG1)."""
  if -2**31 <= n < 2**31:
    return b"J" + struct.pack("<i", n)
  data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data


def tup(*items):
  return MARK + b"".join(items) + TUPLE


def call(func, *args):
  return func + tup(*args) + REDUCE


def d(*pairs):
  return EMPTY_DICT + b"".join(k + v + SETITEM for k, v in pairs)


def put(n):
  return b"q" + bytes([n])


def get(n):
  return b"h" + bytes([n])


def dtype(code, state=None):
  """numpy.dtype(code, False, True) with BUILD `state` (default: the plain one)."""
  st = state if state is not None else tup(i(3), s("<"), NONE, NONE, NONE, i(-1), i(-1), i(0))
  return call(g("numpy", "dtype"), s(code), FALSE, TRUE) + st + BUILD


def laughs(levels=31, fan=10):
  """A list of `fan` references to a list of `fan` references ... (10^30 leaves)."""
  out = EMPTY_LIST + s("lol") + APPEND + put(0) + POP
  for k in range(1, levels):
    out += EMPTY_LIST + MARK + get(k - 1) * fan + APPENDS + put(k) + POP
  return out + get(levels - 1)


def deep(n=100_000):
  """[[[...]]] nested n deep."""
  return MARK * n + LIST * n


def snapshot(kwargs):
  """An EDM snapshot dict(ema=EDMPrecond record) whose _init_kwargs pickle as `kwargs`."""
  state = d((s("_init_args"), tup()), (s("_init_kwargs"), kwargs), (s("_parameters"), EMPTY_DICT),
            (s("_buffers"), EMPTY_DICT), (s("_modules"), EMPTY_DICT))
  meta = d((s("type"), s("class")), (s("version"), i(6)), (s("class_name"), s("EDMPrecond")),
           (s("module_src"), s("raise SystemExit('module_src ran')")), (s("state"), state))
  net = call(g("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)
  return PROTO2 + d((s("ema"), net)) + STOP


def kwargs(**extra_pickled):
  """CIFAR-10-like EDMPrecond kwargs with some values replaced by raw pickle fragments."""
  base = {"img_resolution": i(32), "img_channels": i(3), "label_dim": i(10),
          "model_type": s("SongUNet"), "model_channels": i(128), "num_blocks": i(4)}
  base.update(extra_pickled)
  return d(*[(s(k), v) for k, v in base.items()])


def dag_modules(depth=30):
  """torch Module records where each level holds the level below twice (2^depth paths)."""
  module = g("torch.nn.modules.module", "Module")
  out = module + tup() + NEWOBJ + d((s("_parameters"), EMPTY_DICT), (s("_modules"), EMPTY_DICT)) \
      + BUILD + put(0) + POP
  for k in range(1, depth):
    out += (module + tup() + NEWOBJ + d((s("_parameters"), EMPTY_DICT), (s("_modules"), d(
        (s("a"), get(k - 1)), (s("b"), get(k - 1))))) + BUILD + put(k) + POP)
  state = d((s("_init_args"), tup()), (s("_init_kwargs"), kwargs()), (s("_parameters"), EMPTY_DICT),
            (s("_modules"), d((s("model"), get(depth - 1)))))
  meta = d((s("type"), s("class")), (s("class_name"), s("EDMPrecond")), (s("state"), state))
  net = call(g("torch_utils.persistence", "_reconstruct_persistent_obj"), meta)
  return PROTO2 + out + d((s("ema"), net)) + STOP


# --------------------------------------------------------------------------
# Pickle attacks, each as an EDM snapshot (.pkl): (name, bytes, expected message fragment).

STRUCT_STATE = tup(i(3), s("|"), NONE, tup(s("a")), d((s("a"), tup(dtype("i8"), i(4096)))),
                   i(8), i(1), i(16))
OBJECT_STATE = tup(i(3), s("|"), NONE, tup(s("a")), d((s("a"), tup(dtype("i8"), i(0)))),
                   i(8), i(1), i(63))


def pickle_attacks():
  scalar = g("numpy._core.multiarray", "scalar")
  reconstruct = g("numpy._core.multiarray", "_reconstruct")
  b8 = b"C" + bytes([8]) + b"\x41" * 8      # SHORT_BINBYTES: 8 bytes
  return [
      ("dtype_fields.pkl", snapshot(kwargs(img_resolution=call(scalar, dtype("f8", STRUCT_STATE),
                                                               b8))),
       "numpy dtype state"),
      ("dtype_object.pkl", snapshot(kwargs(img_resolution=call(scalar, dtype("f8", OBJECT_STATE),
                                                               b8))),
       "numpy dtype state"),
      ("dtype_void.pkl", snapshot(kwargs(img_resolution=call(scalar, dtype("V8"), b8))),
       "numpy dtype 'V8' refused"),
      ("reconstruct_100gb.pkl", snapshot(kwargs(img_resolution=call(
          reconstruct, g("numpy", "ndarray"), tup(i(100 * 10**9)), b"C\x01b"))),
       "numpy _reconstruct"),
      ("ndarray_newobj.pkl", snapshot(kwargs(img_resolution=g("numpy", "ndarray") + tup(
          tup(i(100 * 10**9))) + NEWOBJ)), "creating numpy.ndarray objects directly is refused"),
      ("ndarray_state.pkl", snapshot(kwargs(img_resolution=call(
          reconstruct, g("numpy", "ndarray"), tup(i(0)), b"C\x01b") + tup(
              i(1), tup(i(10**6), i(10**6)), dtype("f4"), FALSE, b8) + BUILD)),
       "needs 4,000,000,000,000 bytes"),
      ("num_blocks.pkl", snapshot(kwargs(num_blocks=i(100_000))),
       "num_blocks=100000: expected an integer in [1, 32]"),
      ("resolution.pkl", snapshot(kwargs(img_resolution=i(2**20))),
       "img_resolution=1048576: expected an integer in [1, 1024]"),
      ("laughs.pkl", snapshot(kwargs(attn_resolutions=laughs())), "billion laughs"),
      ("deep.pkl", snapshot(kwargs(attn_resolutions=deep())), "nests containers more than 100"),
      ("cycle.pkl", snapshot(kwargs(attn_resolutions=EMPTY_LIST + put(0) + get(0) + APPEND)),
       "contains itself"),
      ("device_laughs.pkl", snapshot(kwargs(model_type=call(g("torch", "device"), laughs()))),
       "torch.device"),
      ("dag.pkl", dag_modules(), "billion laughs"),
      ("binbytes8.pkl", PROTO4 + b"\x8e" + struct.pack("<Q", 2**60) + b"tiny" + STOP, "truncated"),
      ("bytearray8.pkl", PROTO4 + b"\x96" + struct.pack("<Q", 2**40) + b"tiny" + STOP,
       "a byte array claims 1,099,511,627,776 bytes"),
      ("opcodes.pkl", PROTO2 + (NONE + POP) * 1_100_000 + NONE + STOP, "opcodes"),
      ("build_function.pkl", PROTO2 + g("_codecs", "encode") + tup(
          NONE, d((s("__defaults__"), tup(s("rot13"))))) + BUILD + STOP,
       "setting the state of a function object is refused"),
      # A tuple nested 250,000 deep as a dict key: hashing it recursed in C (a segfault).
      ("deep_tuple_key.pkl", PROTO2 + EMPTY_DICT + b")" + b"\x85" * 250_000 + NONE + SETITEM
       + STOP, "nests tuples more than 100 deep"),
      ("tuple_laughs.pkl", PROTO2 + b")" + put(0) + (MARK + b"h\x00" * 10 + TUPLE + put(0)) * 30
       + EMPTY_DICT + b"h\x00" + NONE + SETITEM + STOP, "expands to more than"),
  ]


# --------------------------------------------------------------------------
# Torch archives and npz files.


def stride0_pt(path, torch):
  """A 1-element storage viewed as 50000 x 50000 (stride 0): 10 GB if expanded."""
  torch.save({"w": torch.ones(1).expand(50_000, 50_000)}, path)


def shared_views_pt(path, torch, n=4_000_000, views=10):
  """Ten tensors viewing one 16 MB storage: 160 MB of copies from a 16 MB file."""
  base = torch.zeros(n)
  torch.save({f"w{k}": base.view(-1) for k in range(views)}, path)


def zip_bomb_pt(path, torch, mib=256):
  """A torch zip archive whose storage member inflates to `mib` MiB of zeros (~1 MiB file)."""
  buf = io.BytesIO()
  torch.save({"w": torch.zeros(1)}, buf)
  src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
  with zipfile.ZipFile(path, "w") as out:
    for name in src.namelist():
      if not name.endswith("/data/0"):
        out.writestr(name, src.read(name))
        continue
      info = zipfile.ZipInfo(name)
      info.compress_type = zipfile.ZIP_DEFLATED
      with out.open(info, "w", force_zip64=True) as f:
        zeros = bytes(2**20)
        for _ in range(mib):
          f.write(zeros)


def bzip2_pt(path, torch):
  """A torch zip archive whose members are bzip2-compressed (method 12: inflated in one call)."""
  buf = io.BytesIO()
  torch.save({"w": torch.zeros(4)}, buf)
  src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as out:
    for name in src.namelist():
      out.writestr(name, src.read(name))


def npz_claiming(path, shape=(10**12,), descr="<f4", payload=b"\0" * 16, member="w.npy",
                 **arrays):
  """An .npz whose .npy header claims `shape` (4 TB by default) over a few bytes (+ `arrays`)."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False,
                                                "shape": shape})
  with zipfile.ZipFile(path, "w") as z:
    for name, array in arrays.items():
      buf = io.BytesIO()
      np.save(buf, array)
      z.writestr(f"{name}.npy", buf.getvalue())
    z.writestr(member, header.getvalue() + payload)


def deep_json(path, n=100_000):
  path.write_text("[" * n + "]" * n)


def write(directory, name, data):
  (directory / name).write_bytes(data)
  return name


def stats_npz(path, mu, sigma):
  with open(path, "wb") as f:
    np.savez(f, mu=mu, sigma=sigma)


def arch_json(path, **overrides):
  arch = {"precond": "EDMPrecond", "model_type": "SongUNet", "img_resolution": 8,
          "img_channels": 3, "label_dim": 0, "model_channels": 16, "channel_mult": [1, 2],
          "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
          "embedding_type": "positional", "encoder_type": "standard",
          "decoder_type": "standard", "channel_mult_noise": 1, "resample_filter": [1, 1]}
  arch.update(overrides)
  path.write_text(json.dumps(arch))
  return arch


def tiny_teacher_npz(path, arch):
  """A valid EDM state dict (PyTorch layout) for `arch`, with random weights."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from fdistill_jax.loaders.edm_variables import random_variables
  flat = traverse_util.flatten_dict(random_variables(arch)["params"])
  layout = {4: (3, 2, 0, 1), 2: (1, 0)}                 # HWIO -> OIHW, [in, out] -> [out, in]
  weights = {".".join(k): np.transpose(np.asarray(v), layout.get(np.ndim(v), None))
             for k, v in flat.items()}
  np.savez(path, **weights)


def png_claiming(path, width, height):
  """A PNG whose header claims width x height RGB pixels, with a tiny (invalid) body."""
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8,
                                                                     2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
