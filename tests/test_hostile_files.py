"""Every file a user downloads is read safely: convert, sample --teacher, evaluate, data sources.

The hostile files are built by tests/hostile_files.py, byte by byte. All cases
run in ONE subprocess under a 4 GiB address-space limit (tests/hostile.py):
each must end in well under a minute with exit code 1 and one line
`TOOL: error: ...` naming the problem, no traceback, nothing written, and
every file of the test directory unchanged. The limit turns a regression
that allocates what the file claims (100 GB, 4 TB, 10^30 list nodes) into a
fast failure instead of a swapped machine.
"""

import json

import numpy as np
import PIL.Image
import pytest

from tests import hostile
from tests import hostile_files as hf

torch = pytest.importorskip("torch")

TINY = {"img_resolution": 8, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1}


def _convert_cases(root):
  """(id, args, message fragment) of the `convert` cases; inputs written under root/in."""
  src = root / "in"
  src.mkdir()
  cases = []
  for name, data, fragment in hf.pickle_attacks():
    (src / name).write_bytes(data)
    cases.append((name, [f"--input={src / name}"], fragment))
  hf.arch_json(src / "arch.json", **TINY)
  arch = f"--arch={src / 'arch.json'}"
  hf.stride0_pt(src / "stride0.pt", torch)
  hf.shared_views_pt(src / "views.pt", torch)
  hf.zip_bomb_pt(src / "bomb.pt", torch)
  hf.bzip2_pt(src / "bzip2.pt", torch)
  hf.npz_claiming(src / "bomb.npz")
  hf.deep_json(src / "deep.json")
  hf.tiny_teacher_npz(src / "tiny.npz", hf.arch_json(src / "tiny.json", **TINY))
  (src / "a_file").write_text("not a directory")
  cases += [
      ("stride0.pt", [f"--input={src / 'stride0.pt'}", arch], "stride-0 expansions are refused"),
      ("views.pt", [f"--input={src / 'views.pt'}", arch], "more than the torch archive can justify"),
      ("bomb.pt", [f"--input={src / 'bomb.pt'}", arch], "zip member 'archive/data/0'"),
      ("bzip2.pt", [f"--input={src / 'bzip2.pt'}", arch], "zip compression method 12 refused"),
      ("bomb.npz", [f"--input={src / 'bomb.npz'}", arch], "the header declares shape (1000000000000,)"),
      ("deep.json", [f"--input={src / 'tiny.npz'}", f"--arch={src / 'deep.json'}"],
       "is not valid JSON"),
      ("parent_is_file", [f"--input={src / 'tiny.npz'}", f"--arch={src / 'tiny.json'}"],
       "is a file, not a directory"),
  ]
  return [{"id": f"convert:{cid}", "tool": "convert",
           "args": args + ([f"--output={src / 'a_file' / 'out'}"] if cid == "parent_is_file"
                           else [f"--output={root / 'out' / cid}"]),
           "fragment": fragment} for cid, args, fragment in cases]


def _evaluate_cases(root):
  src = root / "ev"
  src.mkdir()
  rng = np.random.default_rng(0)
  np.savez(src / "samples.npz", images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
  d = 4
  a = rng.normal(size=(d, d))
  good = a @ a.T
  hf.stats_npz(src / "not_psd.npz", np.zeros(d), good - 3 * np.abs(np.linalg.eigvalsh(good)).max()
               * np.eye(d))
  hf.stats_npz(src / "not_symmetric.npz", np.zeros(d), good + np.triu(np.ones((d, d)), 1))
  hf.stats_npz(src / "nan_mu.npz", np.full(d, np.nan), good)
  hf.stats_npz(src / "good.npz", np.zeros(d), good)
  hf.npz_claiming(src / "ref_bomb.npz", member="sigma.npy", shape=(10**6, 10**6), descr="<f8",
                  mu=np.zeros(d))
  hf.npz_claiming(src / "samples_bomb.npz", member="images.npy", shape=(10**9, 64, 64, 3),
                  descr="|u1")
  (src / "pngs").mkdir()
  PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "pngs" / "a.png")
  (src / "pngs" / "b.png").write_bytes((src / "pngs" / "a.png").read_bytes()[:40])
  out = root / "out" / "metrics.json"
  common = ["--inception=random", f"--out={out}"]
  cases = [
      ("not_psd", [f"--samples={src / 'samples.npz'}", f"--ref={src / 'not_psd.npz'}"],
       "negative eigenvalue"),
      ("not_symmetric", [f"--samples={src / 'samples.npz'}", f"--ref={src / 'not_symmetric.npz'}"],
       "not symmetric"),
      ("nan_mu", [f"--samples={src / 'samples.npz'}", f"--ref={src / 'nan_mu.npz'}"],
       "mu holds NaN"),
      ("ref_bomb", [f"--samples={src / 'samples.npz'}", f"--ref={src / 'ref_bomb.npz'}"],
       "the header declares shape (1000000, 1000000)"),
      ("samples_bomb", [f"--samples={src / 'samples_bomb.npz'}", f"--ref={src / 'good.npz'}"],
       "the header declares shape (1000000000, 64, 64, 3)"),
      ("num_samples", [f"--samples={src / 'samples.npz'}", f"--ref={src / 'good.npz'}",
                       "--num_samples=-3"], "--num_samples=-3 must be positive"),
      ("truncated_png", [f"--samples={src / 'pngs'}", f"--ref={src / 'good.npz'}"],
       "b.png: cannot decode the image"),
  ]
  return [{"id": f"evaluate:{cid}", "tool": "evaluate", "args": args + common,
           "fragment": fragment} for cid, args, fragment in cases]


def _sample_cases(root):
  src = root / "sa"
  (src / "converted" / "variables").mkdir(parents=True)
  hf.arch_json(src / "converted" / "arch.json", img_resolution=2**20)
  (src / "hostile.pkl").write_bytes(hf.snapshot(hf.kwargs(num_blocks=hf.i(100_000))))
  (src / "claims" / "variables").mkdir(parents=True)
  (src / "claims" / "variables" / "tiny").write_bytes(b"\0" * 1000)
  hf.arch_json(src / "claims" / "arch.json", img_resolution=64, model_channels=512,
               channel_mult=[2, 2, 2, 2], num_blocks=8)
  out = f"--out={root / 'out' / 'samples.npz'}"
  return [
      {"id": "sample:converted_claims", "tool": "sample",
       "fragment": "variables/ holds only 1,000 bytes",
       "args": [f"--teacher={src / 'claims'}", out, "--num=4"]},
      {"id": "sample:converted_arch", "tool": "sample", "fragment": "img_resolution=1048576",
       "args": [f"--teacher={src / 'converted'}", out, "--num=4"]},
      {"id": "sample:snapshot", "tool": "sample", "fragment": "num_blocks=100000",
       "args": [f"--teacher={src / 'hostile.pkl'}", out, "--num=4"]},
  ]


def _data_cases(root):
  """EDM datasets (folders): each case reads batch 0 of one."""
  src = root / "data"
  img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)

  def dataset(name, files, labels=None):
    folder = src / name
    folder.mkdir(parents=True)
    for k in range(4):
      PIL.Image.fromarray(img).save(folder / f"img{k}.png")
    for fname, data in files.items():
      (folder / fname).write_bytes(data)
    if labels is not None:
      (folder / "dataset.json").write_text(labels)
    return str(folder)

  good = (src.parent / "good.png")
  src.mkdir()
  PIL.Image.fromarray(img).save(good)
  truncated = good.read_bytes()[:60]
  sixteen = np.array([[0, 257, 32768, 65535]] * 8, np.uint16)
  PIL.Image.fromarray(np.tile(sixteen, (1, 2))).save(src.parent / "gray16.png")
  hf.png_claiming(src.parent / "bomb.png", 9000, 9000)   # 243 MB decoded, under PIL's own limit
  cases = [
      ("truncated", dict(path=dataset("t", {"img9.png": truncated}), resolution=8, batch=5),
       "img9.png: cannot decode the image"),
      ("bad_json", dict(path=dataset("j", {}, "{not json"), resolution=8, num_classes=2),
       "dataset.json is not valid JSON"),
      ("bad_labels", dict(path=dataset("l", {}, json.dumps({"labels": [["img0.png", "cat"]]})),
                          resolution=8, num_classes=2),
       "dataset.json: labels entry 0"),
      ("bomb_png", dict(path=dataset("b", {"img9.png": (src.parent / "bomb.png").read_bytes()}),
                        resolution=8, batch=5), "image has shape (9000, 9000, 3)"),
  ]
  out = [{"id": f"data:{cid}", "call": "edm_batch", "kwargs": kw, "fragment": fragment}
         for cid, kw, fragment in cases]
  gray = src / "g"
  gray.mkdir()
  (gray / "img0.png").write_bytes((src.parent / "gray16.png").read_bytes())
  out.append({"id": "data:gray16", "call": "edm_batch",
              "kwargs": dict(path=str(gray), resolution=8, channels=1, batch=1)})
  out.append({"id": "data:skip", "call": "edm_batch",
              "kwargs": dict(path=dataset("s", {"img9.png": truncated}), resolution=8, batch=5,
                             skip=True)})
  return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("hostile")
  (root / "out").mkdir()
  cases = _convert_cases(root) + _evaluate_cases(root) + _sample_cases(root) + _data_cases(root)
  cases += [{"id": "limit:allocate", "call": "allocate", "kwargs": {"gib": hostile.MEMORY_GIB}}]
  before = hostile.tree(root)
  got = hostile.run_cases([{k: v for k, v in c.items() if k != "fragment"} for c in cases], root,
                          timeout=900)
  return {c["id"]: (c, got[c["id"]]) for c in cases}, root, before


CONVERT_IDS = [f"convert:{name}" for name, _, _ in hf.pickle_attacks()] + [
    f"convert:{n}" for n in ("stride0.pt", "views.pt", "bomb.pt", "bomb.npz", "deep.json",
                             "parent_is_file")]
REFUSED_IDS = CONVERT_IDS + [f"evaluate:{n}" for n in (
    "not_psd", "not_symmetric", "nan_mu", "ref_bomb", "samples_bomb", "num_samples",
    "truncated_png")] + ["sample:converted_arch", "sample:converted_claims", "sample:snapshot"] + [
        f"data:{n}" for n in ("truncated", "bad_json", "bad_labels", "bomb_png")]


@pytest.mark.parametrize("case_id", REFUSED_IDS)
def test_hostile_input_is_refused_in_one_line_and_writes_nothing(results, case_id):
  cases, _, _ = results
  case, result = cases[case_id]
  hostile.assert_refused(result, case_id.split(":")[0], case["fragment"])


def test_the_runs_ran_under_the_address_space_limit(results):
  """Asking for as much memory as the limit fails: every case above ran inside it."""
  cases, _, _ = results
  _, result = cases["limit:allocate"]
  assert result["traceback"] and "MemoryError" in result["traceback"], result


def test_no_file_was_written_or_changed(results):
  _, root, before = results
  assert not list((root / "out").iterdir())       # no outputs, no temporaries
  assert hostile.tree(root) == before             # every input byte-identical


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(results):
  _, result = results[0]["data:gray16"]
  assert result["rc"] == 0 and result["traceback"] is None, result["stderr"]
  values = json.loads(result["stdout"])["values"]
  # round(x * 255 / 65535) for x = 0, 257, 32768, 65535 -> 0, 1, 128, 255, then x / 127.5 - 1.
  np.testing.assert_allclose(values, np.array([0, 1, 128, 255]) / 127.5 - 1, rtol=0, atol=1e-6)


def test_skip_unreadable_skips_and_counts(results):
  _, result = results[0]["data:skip"]
  assert result["rc"] == 0 and result["traceback"] is None, result["stderr"]
  assert "Skipping unreadable image (1 so far" in result["stderr"]
  assert "img9.png" in result["stderr"]
