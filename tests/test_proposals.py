"""Tests of wstal_jax/data/proposals.py: candidate proposals from results files into a
dataset's per-video field (units, clipping, duplicates), every bad proposal file giving one
error with nothing written, the command line, and the real CO2-Net proposal files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from wstal_jax.data import format as fmt
from wstal_jax.data import proposals as P
from wstal_jax.errors import WstalError
from test_co2net import ROOT, _write_dataset
from test_descriptions import _tree_digest

SPS = 0.64


def test_to_snippets_units_clipping_and_duplicates():
  seg = np.array([[-1.0, 3.2], [5.0, 100.0], [200.0, 300.0], [-1.0, 3.2], [0.64, 1.28]])
  got, dropped = P.to_snippets(seg, SPS, 20)
  np.testing.assert_allclose(got, [[0, 5], [5 / SPS, 20], [0, 5], [1, 2]], rtol=1e-6)
  assert dropped == 1 and got.dtype == np.float32
  got, _ = P.to_snippets(seg, SPS, 20, dedupe=True)
  np.testing.assert_allclose(got, [[0, 5], [5 / SPS, 20], [1, 2]], rtol=1e-6)
  np.testing.assert_array_equal(P.decode(P.encode(got)), got)


def _results(videos):
  return {"version": "VERSION 1.3", "external_data": {},
          "results": {v: [{"segment": list(s), "label": "a", "score": 0.5} for s in segs]
                      for v, segs in videos.items()}}


def _files(tmp_path, train=None, test=None):
  """Results files for test_co2net's tiny dataset (train_0..5, test_0..2; 10-23 snippets)."""
  train = train or {f"train_{i}": [(0.64, 3.2), (1.28, 4.48), (0.64, 3.2)] for i in range(6)}
  test = test or {f"test_{i}": [(0.0, 1.92), (2.56, 99.0)] for i in range(3)}
  out = {}
  for split, videos in (("train", train), ("test", test)):
    path = tmp_path / f"{split}.json"
    path.write_text(json.dumps(_results(videos)))
    out[split] = str(path)
  return out


def test_add_proposals_writes_the_field_and_keeps_the_rest(tmp_path):
  data = _write_dataset(tmp_path / "plain")
  files = _files(tmp_path)
  manifest = P.add_proposals(data, str(tmp_path / "out"), files)
  assert "proposals" in manifest["optional_fields"]
  assert manifest["source"]["proposals_train"] == files["train"]
  for split in ("train", "test"):
    before = {r.name: r for r in fmt.read_videos(data, split)}
    for info in fmt.read_video_info(str(tmp_path / "out"), split):
      seg = P.load(info)
      if split == "train":   # duplicates kept, seconds -> snippets
        np.testing.assert_allclose(seg, [[1, 5], [2, 7], [1, 5]], rtol=1e-6)
      else:                  # clipped to the video's T
        np.testing.assert_allclose(seg, [[0, 3], [4, info.num_snippets]], rtol=1e-6)
    for rec in fmt.read_videos(str(tmp_path / "out"), split):
      np.testing.assert_array_equal(rec.features["i3d"], before[rec.name].features["i3d"])
      np.testing.assert_array_equal(rec.label, before[rec.name].label)
  P.add_proposals(data, str(tmp_path / "dedup"), files, dedupe=True)
  info = fmt.read_video_info(str(tmp_path / "dedup"), "train")[0]
  np.testing.assert_allclose(P.load(info), [[1, 5], [2, 7]], rtol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("unknown", r"train.json: video 'train_9' is not in the train split"),
    ("reversed", r"train.json: results\['train_0'\]\[1\].segment: ends before it starts"),
    ("nan", r"train.json: results\['train_0'\]\[0\].segment: not finite"),
    ("empty", r"train.json: train video 'train_2' has no proposals"),
    ("missing", r"train.json: no proposals for train video 'train_5'"),
    ("past_end", r"train.json: train video 'train_1' has no proposals inside its \d+ snippets "
                 r"\(1 lie past the end"),
    ("format", r"train.json: expected an object with a 'results' object"),
    ("segment", r"train.json: results\['train_0'\]\[0\]: expected an object with a 'segment'"),
])
def test_bad_proposal_files_one_error_nothing_written(tmp_path, case, match):
  data = _write_dataset(tmp_path / "plain")
  train = {f"train_{i}": [(0.64, 3.2)] for i in range(6)}
  if case == "unknown":
    train["train_9"] = [(0.0, 1.0)]
  elif case == "reversed":
    train["train_0"] = [(0.64, 3.2), (4.0, 2.0)]
  elif case == "nan":
    train["train_0"] = [(float("nan"), 3.2)]
  elif case == "empty":
    train["train_2"] = []
  elif case == "missing":
    del train["train_5"]
  elif case == "past_end":
    train["train_1"] = [(500.0, 600.0)]
  files = _files(tmp_path, train=train)
  if case == "format":
    (tmp_path / "train.json").write_text(json.dumps({"database": {}}))
  elif case == "segment":
    (tmp_path / "train.json").write_text(json.dumps({"results": {"train_0": [{"seg": 1}]}}))
  with pytest.raises(WstalError, match=match):
    P.add_proposals(data, str(tmp_path / "out"), files)
  assert not os.path.exists(tmp_path / "out")
  assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_command_line_writes_and_fails_in_one_line(tmp_path):
  data = _write_dataset(tmp_path / "plain")
  files = _files(tmp_path)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda *a: subprocess.run([sys.executable, "-m", "wstal_jax.data.proposals",
                                   f"--data_dir={data}", *a], capture_output=True, text=True,
                                  env=env, timeout=300)
  ok = run(f"--train={files['train']}", f"--test={files['test']}", f"--out={tmp_path / 'o'}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "wrote" in ok.stdout and (tmp_path / "o" / "manifest.json").exists()
  (tmp_path / "bad.json").write_text(json.dumps(_results({"nope": [(0, 1)]})))
  bad = run(f"--test={tmp_path / 'bad.json'}", f"--out={tmp_path / 'o2'}")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "error: " in bad.stderr and "video 'nope' is not in the test split" in bad.stderr
  assert not (tmp_path / "o2").exists()


def test_real_co2net_proposal_files(shared_data):
  """The CO2-Net proposals of THUMOS14 (SEAL's P_w, P-MIL's inputs): every endpoint is a
  whole snippet (multiples of 0.64 s), and duplicates are frequent."""
  folder = shared_data / "thumos14" / "proposals_co2net"
  for split, videos in (("train", 200), ("test", 212)):
    segs = P.read_file(str(folder / f"detection_result_base_{split}.json"))
    assert len(segs) == videos
    allseg = np.concatenate(list(segs.values()))
    snip = allseg / SPS
    np.testing.assert_allclose(snip, np.round(snip), atol=1e-3)
    assert np.all(allseg[:, 1] > allseg[:, 0])
    dups = sum(len(s) - len(np.unique(np.round(s / SPS), axis=0)) for s in segs.values())
    assert 0.25 < dups / len(allseg) < 0.6


def _with_proposals(tmp_path, train=None):
  data = _write_dataset(tmp_path / "plain")
  out = str(tmp_path / "data")
  P.add_proposals(data, out, _files(tmp_path, train=train))
  return out


def test_training_batches_carry_proposals_in_batch_coordinates(tmp_path):
  """Resampled ('uniform', T=8): proposals / scale_B; 'pad': shifted by the window start;
  clipped to the valid length; capped by a random subset that is deterministic per (seed,
  step) and keeps the stored order; padding masked."""
  from wstal_jax import input_pipeline as ip
  # Video i's proposals: [1, 5], [2, 7], [3, 4 + i] snippets (0.64 s each).
  train = {f"train_{i}": [(0.64, 3.2), (1.28, 4.48), (1.92, (4 + i) * SPS)] for i in range(6)}
  data = _with_proposals(tmp_path, train)
  lengths = {info.index: info.num_snippets for info in fmt.read_video_info(data, "train")}
  stored = {info.index: P.load(info) for info in fmt.read_video_info(data, "train")}
  kw = dict(split="train", batch_size=3, seed=4)
  batch = next(ip.train_batches(data, num_snippets=8, sampling="uniform", max_proposals=5, **kw))
  assert batch["proposals_BxMx2"].shape == (3, 5, 2)
  for b, idx in enumerate(batch["index_B"]):
    np.testing.assert_allclose(batch["proposals_BxMx2"][b, :3],
                               np.minimum(stored[idx] * 8 / lengths[idx], 8), rtol=1e-5)
    np.testing.assert_array_equal(batch["proposal_mask_BxM"][b], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch["proposals_BxMx2"][b, 3:], 0)
  # 'pad' with a random window of 6 snippets: proposals shifted by the window start
  # (idx_T[0]) and clipped to [0, 6]; those outside the window dropped.
  for batch in [b for _, b in zip(range(3), ip.train_batches(
      data, num_snippets=6, sampling="pad", max_proposals=3, **kw))]:
    feats = {i: r.features["i3d"] for i, r in enumerate(fmt.read_videos(data, "train"))}
    for b, idx in enumerate(batch["index_B"]):
      start = int(np.argmax(np.all(feats[idx] == batch["feat_BxTxD"][b, 0], axis=1)))
      want = np.clip(stored[idx] - start, 0, 6)
      want = want[want[:, 1] > want[:, 0]]
      n = len(want)
      np.testing.assert_allclose(batch["proposals_BxMx2"][b, :n], want, rtol=1e-5)
      assert batch["proposal_mask_BxM"][b].sum() == n
  # The cap: 2 of the 3, in stored order, the same for the same (seed, step), varying by step.
  def capped(seed):
    out = []
    for _, batch in zip(range(4), ip.train_batches(data, num_snippets=8, sampling="uniform",
                                                   max_proposals=2, split="train",
                                                   batch_size=3, seed=seed)):
      for b, idx in enumerate(batch["index_B"]):
        full = np.minimum(stored[idx] * 8 / lengths[idx], 8)
        rows = [int(np.argmin(np.abs(full - p).sum(1))) for p in batch["proposals_BxMx2"][b]]
        assert rows == sorted(rows) and len(set(rows)) == 2
        assert batch["proposal_mask_BxM"][b].tolist() == [1, 1]
        out.append(tuple(rows))
    return out
  first = capped(4)
  assert capped(4) == first and len(set(first)) > 1
  with pytest.raises(WstalError, match="max_proposals must be >= 1"):
    next(ip.train_batches(data, num_snippets=8, max_proposals=0, **kw))
  plain = str(tmp_path / "plain")
  with pytest.raises(WstalError, match="plain: the dataset has no candidate proposals"):
    next(ip.train_batches(plain, num_snippets=8, max_proposals=4, **kw))


def test_eval_batches_carry_every_proposal(tmp_path):
  """Whole videos: every stored proposal, as stored; resampled to T: divided by scale_B; M
  padded per batch to a bucket that all processes share; dummy rows all zero."""
  from wstal_jax import input_pipeline as ip
  test = {f"test_{i}": [(0.0, 1.92), (2.56, 99.0)] + [(0.64, 1.28)] * (3 * i)
          for i in range(3)}
  data = _write_dataset(tmp_path / "plain")
  P.add_proposals(data, str(tmp_path / "data"), _files(tmp_path, test=test))
  data = str(tmp_path / "data")
  np.testing.assert_array_equal(P.counts(data, "test"), [2, 5, 8])
  stored = {i.index: P.load(i) for i in fmt.read_video_info(data, "test")}
  lengths = {i.index: i.num_snippets for i in fmt.read_video_info(data, "test")}
  shapes = {}
  for proc in (0, 1):
    batches = list(ip.eval_batches(data, split="test", batch_size=1, proposals=True,
                                   proposal_buckets=(4, 8), process_index=proc,
                                   process_count=2))
    shapes[proc] = [b["proposals_BxMx2"].shape for b in batches]
    for b in batches:
      for row, idx in enumerate(b["index_B"]):
        if idx < 0:
          assert not b["proposal_mask_BxM"][row].any()
          assert not b["proposals_BxMx2"][row].any()
          continue
        m = len(stored[idx])
        np.testing.assert_allclose(b["proposals_BxMx2"][row, :m], stored[idx], rtol=1e-6)
        assert b["proposal_mask_BxM"][row].sum() == m
  assert shapes[0] == shapes[1] and {s[1] for s in shapes[0]} <= {4, 8}
  for b in ip.eval_batches(data, split="test", batch_size=3, proposals=True, num_snippets=8):
    assert b["proposals_BxMx2"].shape[1] == 64     # default buckets start at 64
    for row, idx in enumerate(b["index_B"]):
      np.testing.assert_allclose(b["proposals_BxMx2"][row, :len(stored[idx])],
                                 np.minimum(stored[idx] * 8 / lengths[idx], 8), rtol=1e-5)
  with pytest.raises(WstalError, match=r"proposal buckets \[4\] cannot hold a video with 8"):
    next(ip.eval_batches(data, split="test", batch_size=3, proposals=True,
                         proposal_buckets=(4,)))
  with pytest.raises(WstalError, match="plain: the dataset has no candidate proposals"):
    next(ip.eval_batches(str(tmp_path / "plain"), split="test", batch_size=3, proposals=True))


def test_trained_method_exports_raw_proposals_that_convert(tmp_path):
  """The loop P-MIL's users ask for: train CO2-Net, export its raw proposals (before NMS) for
  both splits, add them to the dataset, read them in training batches."""
  from test_co2net import _main
  from wstal_jax import input_pipeline as ip
  data = _write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  common = ["--config.eval.batch_size=4", "--config.co2net.attn_hidden=8",
            "--config.eval.num_plots=0"]
  proc = _main([f"--config={ROOT / 'configs' / 'co2net.py'}", f"--config.data.dir={data}",
                f"--workdir={workdir}", "--config.train.num_steps=2",
                "--config.train.eval_every=2", "--config.data.num_snippets=16",
                "--config.train.batch_size=4", *common], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _main(["--mode=eval", f"--workdir={workdir}", f"--eval_dir={tmp_path / 'ev'}",
                "--config.eval.export_proposals=raw"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  for split, n in (("train", 6), ("test", 3)):
    res = json.loads((tmp_path / "ev" / f"proposals_{split}.json").read_text())
    assert len(res["results"]) == n and all(res["results"].values())
  raw = P.read_file(str(tmp_path / "ev" / "proposals_test.json"))
  # Before NMS: at least what the evaluation kept after NMS, scores not decayed.
  kept = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
  assert sum(len(v) for v in raw.values()) >= sum(len(v) for v in kept.values()) >= 3
  raw_scores = json.loads((tmp_path / "ev" / "proposals_test.json").read_text())["results"]
  assert max(p["score"] for v in raw_scores.values() for p in v) >= max(
      p["score"] for v in kept.values() for p in v)
  out = str(tmp_path / "with_proposals")
  P.add_proposals(data, out, {s: str(tmp_path / "ev" / f"proposals_{s}.json")
                              for s in ("train", "test")})
  batch = next(ip.train_batches(out, split="train", batch_size=2, num_snippets=16, seed=0,
                                max_proposals=8))
  assert batch["proposal_mask_BxM"].sum() > 0
  assert np.all(batch["proposals_BxMx2"][..., 1] >= batch["proposals_BxMx2"][..., 0])
  # ... and P-MIL trains and evaluates on them.
  from test_pmil import _pmil_config
  from wstal_jax import train
  config = _pmil_config(out)
  config.train.num_steps, config.train.eval_every, config.eval.num_plots = 2, 2, 0
  metrics = train.train_and_evaluate(config, str(tmp_path / "pmil"))
  assert np.isfinite(metrics["average_mAP"])
  bad = _main(["--mode=eval", f"--workdir={workdir}", "--config.eval.export_proposals=all"],
              tmp_path)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "eval.export_proposals" in bad.stderr


def _iou(a, b):
  inter = np.maximum(0, np.minimum(a[:, None, 1], b[None, :, 1])
                     - np.maximum(a[:, None, 0], b[None, :, 0]))
  union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter
  return inter / union


def test_builtin_proposals_byte_identical_and_weak_localizer_like(tmp_path):
  """The built-in benchmark's candidate proposals: byte-identical per seed, and like a weak
  localizer's raw output: most instances covered at tIoU 0.5, many background candidates,
  frequent duplicates."""
  from wstal_jax import run_setup
  from wstal_jax.data import synthetic_proposals as sp
  a = sp.ensure_builtin("small", 0, cache_dir=str(tmp_path / "a"))
  b = sp.ensure_builtin("small", 0, cache_dir=str(tmp_path / "b"))
  assert _tree_digest(a) == _tree_digest(b)
  assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
  sps = fmt.seconds_per_snippet(fmt.read_manifest(a))
  recall, background, dups = [], [], []
  for info in fmt.read_video_info(a, "test"):
    seg = P.load(info)
    assert len(seg) >= 1 and np.all(seg[:, 1] > seg[:, 0])
    assert seg.max() <= info.num_snippets
    unique = np.unique(seg, axis=0)
    dups.append(1 - len(unique) / len(seg))
    if len(info.segments):
      m = _iou(info.segments / sps, unique)
      recall.append(np.mean(m.max(1) >= 0.5))
      background.append(np.mean(m.max(0) < 0.3))
  assert np.mean(recall) > 0.6 and np.mean(background) > 0.3 and np.mean(dups) > 0.2
  # The config flag selects it; descriptions and proposals together are refused.
  from test_co2net import load_config
  config = load_config()
  with config.unlocked():
    config.data.proposals = True
    config.data.cache_dir = str(tmp_path / "a")
  assert run_setup.resolve_data_dir(config) == a
  with config.unlocked():
    config.data.descriptions = True
  with pytest.raises(WstalError, match="descriptions or with proposals, not both"):
    run_setup.resolve_data_dir(config)
