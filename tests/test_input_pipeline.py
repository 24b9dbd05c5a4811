"""Input pipeline: snippet sampling, determinism, resume, process sharding, eval padding."""
import json

import numpy as np
import pytest
import tensorflow as tf

from wstal_jax import input_pipeline as ip
from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError

NUM_TRAIN, NUM_TEST = 23, 11


def _records(n, seed):
  """Feature column 0 = video index, column 1 = snippet position: batches reveal sampling."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    num_t = int(rng.integers(3, 150))
    feat = np.zeros((num_t, 6), np.float32)
    feat[:, 0] = i
    feat[:, 1] = np.arange(num_t)
    feat[:, 2:] = 1.0
    yield fmt.VideoRecord(name=f"v{i:02d}", duration=num_t * 0.64,
                          features={"i3d": feat, "clip": feat[:, :3] + 100},
                          label=np.eye(3, dtype=np.float32)[i % 3])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ip") / "ds")
  fmt.write_dataset(out, dataset="toy", classes=["a", "b", "c"],
                    feature_dims={"i3d": 6, "clip": 3},
                    splits={"train": _records(NUM_TRAIN, 0), "test": _records(NUM_TEST, 1)},
                    num_shards=4)
  return out


@pytest.fixture(scope="module")
def lengths(data_dir):
  m = fmt.read_manifest(data_dir)
  return {s: np.array(m["splits"][s]["video_num_snippets"]) for s in ("train", "test")}


def _indices(num_t, length, sampling, key=(1, 2)):
  idx, mask, scale = ip.sample_indices(tf.constant(num_t), length, sampling,
                                       tf.constant(key, tf.int64))
  return idx.numpy(), mask.numpy(), float(scale)


@pytest.mark.parametrize("num_t,length", [(100, 10), (10, 10), (7, 10), (1, 5), (33, 32),
                                          (2000, 320)])
def test_random_perturb_one_index_per_bin(num_t, length):
  idx, mask, scale = _indices(num_t, length, "random_perturb")
  i = np.arange(length)
  lo, hi = (i * num_t) // length, ((i + 1) * num_t) // length
  assert np.all(idx >= lo) and np.all(idx < np.maximum(hi, lo + 1))
  assert np.all(np.diff(idx) >= 0) and idx.max() < num_t
  assert np.all(mask == 1) and scale == pytest.approx(num_t / length)
  np.testing.assert_array_equal(idx, _indices(num_t, length, "random_perturb")[0])
  if num_t >= 4 * length:
    assert not np.array_equal(idx, _indices(num_t, length, "random_perturb", (1, 3))[0])


def test_uniform_and_pad_sampling():
  np.testing.assert_array_equal(_indices(10, 4, "uniform")[0], [1, 3, 6, 8])
  # ASL's test resampling: floor(i T_v / T).
  np.testing.assert_array_equal(_indices(10, 4, "floor")[0], np.floor(np.arange(4) * 10 / 4))
  np.testing.assert_array_equal(_indices(1000, 750, "floor")[0],
                                np.floor(np.arange(750) * 1000 / 750).astype(int))
  np.testing.assert_array_equal(_indices(3, 6, "floor")[0], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(_indices(3, 6, "uniform")[0], [0, 0, 1, 1, 2, 2])
  assert _indices(10, 4, "uniform")[2] == pytest.approx(2.5)
  idx, mask, scale = ip.sample_indices(tf.constant(3), 5, "pad")
  np.testing.assert_array_equal(idx, [0, 1, 2, 2, 2])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0])
  assert float(scale) == 1.0
  idx, mask, _ = _indices(50, 8, "pad")
  assert np.all(np.diff(idx) == 1) and idx[-1] < 50 and np.all(mask == 1)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_shapes_epochs_and_content(data_dir, lengths):
  kw = dict(split="train", batch_size=4, num_snippets=10, seed=7, vlm_feature="clip",
            process_index=0, process_count=1)
  batches = _take(ip.train_batches(data_dir, **kw), 23)  # 92 elements = 4 epochs of 23
  b = batches[0]
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "feat_BxTxD": ((4, 10, 6), np.float32), "vlm_BxTxE": ((4, 10, 3), np.float32),
      "mask_BxT": ((4, 10), np.float32), "label_BxC": ((4, 3), np.float32),
      "index_B": ((4,), np.int32), "valid_B": ((4,), np.float32),
      "scale_B": ((4,), np.float32)}
  order = np.concatenate([x["index_B"] for x in batches])
  epochs = order.reshape(4, NUM_TRAIN)
  for e in epochs:
    assert sorted(e) == list(range(NUM_TRAIN))  # each epoch: every video exactly once
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
  for x in batches:
    np.testing.assert_array_equal(x["feat_BxTxD"][:, :, 0], x["index_B"][:, None] * np.ones(10))
    pos = x["feat_BxTxD"][:, :, 1]
    t_v = lengths["train"][x["index_B"]]
    assert np.all(np.diff(pos, axis=1) >= 0) and np.all(pos < t_v[:, None])
    np.testing.assert_allclose(x["scale_B"], t_v / 10, rtol=1e-6)
    np.testing.assert_array_equal(x["vlm_BxTxE"], x["feat_BxTxD"][:, :, :3] + 100)
    np.testing.assert_array_equal(x["label_BxC"], np.eye(3)[x["index_B"] % 3])
    assert np.all(x["mask_BxT"] == 1) and np.all(x["valid_B"] == 1)


def test_train_determinism_and_resume(data_dir):
  kw = dict(split="train", batch_size=3, num_snippets=8, seed=3, process_index=1,
            process_count=2)
  full = _take(ip.train_batches(data_dir, **kw), 12)
  again = _take(ip.train_batches(data_dir, **kw), 12)
  other = _take(ip.train_batches(data_dir, **{**kw, "seed": 4}), 12)
  for a, b in zip(full, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert any(not np.array_equal(a["feat_BxTxD"], b["feat_BxTxD"]) for a, b in zip(full, other))
  # Global batches of 6 from 23 videos: resuming at 5 and 8 starts in epochs 1 and 2.
  for start in (1, 5, 8):
    resumed = _take(ip.train_batches(data_dir, start_step=start, **kw), 12 - start)
    for a, b in zip(full[start:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_global_batches_do_not_depend_on_the_process_layout(data_dir):
  """Process p of P yields rows [pB, (p+1)B) of the global batch that one process yields with
  batch P*B: same videos, snippets and order for any layout, more processes than shards
  included, and after a resume."""
  kw = dict(split="train", num_snippets=4, seed=0)
  one = _take(ip.train_batches(data_dir, batch_size=6, process_index=0, process_count=1, **kw),
              10)   # 60 elements: three epochs of 23
  layouts = {2: None, 3: None, 6: None}   # 6 processes > 4 shards
  for num_procs in layouts:
    layouts[num_procs] = [_take(ip.train_batches(
        data_dir, batch_size=6 // num_procs, process_index=p, process_count=num_procs, **kw),
        10) for p in range(num_procs)]
  resumed = [_take(ip.train_batches(data_dir, batch_size=3, start_step=7, process_index=p,
                                    process_count=2, **kw), 3) for p in range(2)]
  for s in range(10):
    for k, want in one[s].items():
      for num_procs, parts in layouts.items():
        got = np.concatenate([parts[p][s][k] for p in range(num_procs)])
        np.testing.assert_array_equal(got, want, err_msg=f"{num_procs} processes, step {s}")
      if s >= 7:
        np.testing.assert_array_equal(np.concatenate([r[s - 7][k] for r in resumed]), want)


def test_train_subsets_and_errors(data_dir):
  sub = [0, 1, 5, 9, 13]
  idx = np.concatenate([b["index_B"] for b in _take(ip.train_batches(
      data_dir, split="train", batch_size=5, num_snippets=4, seed=0, video_indices=sub,
      process_index=0, process_count=1), 3)])
  assert sorted(idx[:5]) == sub and set(idx) == set(sub)
  kw = dict(split="train", batch_size=2, num_snippets=4, seed=0, process_count=2)
  both = [np.concatenate([b["index_B"] for b in _take(ip.train_batches(
      data_dir, video_indices=[1, 5], process_index=p, **kw), 2)]) for p in range(2)]
  assert [sorted(i[:2]) for i in both] == [[1, 5], [1, 5]]   # one epoch per global batch
  with pytest.raises(WstalError, match=r"video_indices must lie in \[0, 23\)"):
    ip.train_batches(data_dir, video_indices=[23], process_index=0, **kw)
  with pytest.raises(WstalError, match="unknown sampling"):
    ip.train_batches(data_dir, sampling="dense", process_index=0, **kw)
  with pytest.raises(WstalError, match="VLM feature 'videoclip'"):
    ip.train_batches(data_dir, vlm_feature="videoclip", process_index=0, **kw)
  with pytest.raises(WstalError, match="bad process layout"):
    ip.train_batches(data_dir, process_index=2, **kw)


def test_train_pad_sampling(data_dir, lengths):
  batches = _take(ip.train_batches(data_dir, split="train", batch_size=4, num_snippets=64,
                                   seed=0, sampling="pad", process_index=0,
                                   process_count=1), 6)
  for b in batches:
    t_v = lengths["train"][b["index_B"]]
    np.testing.assert_array_equal(b["mask_BxT"].sum(1), np.minimum(t_v, 64))
    pos = b["feat_BxTxD"][:, :, 1]
    for row, m, t in zip(pos, b["mask_BxT"], t_v):
      valid = row[m > 0]
      assert np.all(np.diff(valid) == 1) and valid[-1] < t  # one contiguous window
    assert np.all(b["feat_BxTxD"][b["mask_BxT"] == 0] == 0)
    np.testing.assert_array_equal(b["scale_B"], 1.0)


def _eval_all(data_dir, num_procs, **kw):
  return [list(ip.eval_batches(data_dir, split="test", process_index=p,
                               process_count=num_procs, **kw)) for p in range(num_procs)]


def test_eval_batches_buckets_and_equal_counts(data_dir, lengths):
  t_n = lengths["test"]
  assert ip.default_buckets(100) == [64, 128] and ip.default_buckets(150) == [64, 128, 192]
  assert ip.default_buckets(2614) == [64, 128, 256, 512, 1024, 2048, 2624]
  assert ip.default_buckets(10) == [64]
  per_proc = _eval_all(data_dir, 2, batch_size=2)
  assert len(per_proc[0]) == len(per_proc[1]) == 3  # 6 and 5 videos
  real = []
  for batches in per_proc:
    for b in batches:
      ok = b["valid_B"] > 0
      real.extend(b["index_B"][ok].tolist())
      np.testing.assert_array_equal(b["index_B"][~ok], -1)
      np.testing.assert_array_equal(b["mask_BxT"][~ok], 0)
      t_v = np.where(ok, t_n[np.maximum(b["index_B"], 0)], 0)
      np.testing.assert_array_equal(b["mask_BxT"].sum(1), t_v)
      assert b["feat_BxTxD"].shape[1] in ip.default_buckets(int(t_n.max()))
      assert b["feat_BxTxD"].shape[1] >= t_v.max()
      assert np.all(b["feat_BxTxD"][b["mask_BxT"] == 0] == 0)
      for row, t in zip(b["feat_BxTxD"][ok], t_v[ok]):
        np.testing.assert_array_equal(row[:t, 1], np.arange(t))
      np.testing.assert_array_equal(b["scale_B"], 1.0)
  assert sorted(real) == list(range(NUM_TEST))
  for b0, b1 in zip(*per_proc):  # same shapes on every process, step by step
    assert {k: v.shape for k, v in b0.items()} == {k: v.shape for k, v in b1.items()}
  # Default: each process's videos longest first (ties by index); order='manifest': by index.
  got = [i for b in per_proc[0] for i in b["index_B"] if i >= 0]
  assert sorted(got) == [0, 2, 4, 6, 8, 10]
  assert got == sorted(got, key=lambda i: (-t_n[i], i))
  by_index = _eval_all(data_dir, 2, batch_size=2, order="manifest")
  assert [i for b in by_index[0] for i in b["index_B"] if i >= 0] == [0, 2, 4, 6, 8, 10]
  assert [i for b in by_index[1] for i in b["index_B"] if i >= 0] == [1, 3, 5, 7, 9]


def test_eval_more_processes_than_shards_and_subsets(data_dir, lengths):
  per_proc = _eval_all(data_dir, 6, batch_size=1)
  assert len({len(b) for b in per_proc}) == 1
  assert all(b["valid_B"].sum() == 0 for batches in per_proc[4:] for b in batches)
  sub = _eval_all(data_dir, 1, batch_size=4, video_indices=[3, 7, 1])[0]
  longest_first = sorted([1, 3, 7], key=lambda i: (-lengths["test"][i], i))
  assert [b["index_B"].tolist() for b in sub] == [longest_first + [-1]]
  assert sub[0]["feat_BxTxD"].shape[1] >= lengths["test"][[1, 3, 7]].max()
  fixed = _eval_all(data_dir, 1, batch_size=4, buckets=[256])[0]
  assert {b["feat_BxTxD"].shape[1] for b in fixed} == {256}
  with pytest.raises(WstalError, match="longer than the largest eval bucket 8"):
    _eval_all(data_dir, 1, batch_size=4, buckets=[4, 8])


def test_eval_plan_length_order(data_dir, lengths):
  t_n = lengths["test"]
  manifest = fmt.read_manifest(data_dir)
  for procs, batch, subset in ((1, 2, None), (2, 2, None), (3, 4, [0, 2, 3, 5, 7, 8, 10])):
    kw = dict(batch_size=batch, process_count=procs, video_indices=subset)
    base_P, base_J = ip.eval_plan(manifest, data_dir, "test", order="manifest", **kw)
    by_len_P, by_len_J = ip.eval_plan(manifest, data_dir, "test", **kw)   # default: length
    # Same videos on every process (each gets its own shards' videos), same batch count.
    assert len(by_len_J) == len(base_J)
    for base, by_len in zip(base_P, by_len_P):
      assert sorted(by_len.tolist()) == base.tolist()
      assert np.all(np.diff(t_n[by_len]) <= 0)            # longest first
      ties = np.diff(t_n[by_len]) == 0
      assert np.all(np.diff(by_len)[ties] > 0)             # ties by index
      for j in range(0, len(by_len), batch):
        assert by_len_J[j // batch] >= t_n[by_len[j:j + batch]].max()
    assert sum(by_len_J) <= sum(base_J)
  _, fixed = ip.eval_plan(manifest, data_dir, "test", batch_size=4, num_snippets=16,
                          order="length")
  assert fixed == [16] * 3
  with pytest.raises(WstalError, match="order"):
    ip.eval_plan(manifest, data_dir, "test", batch_size=4, order="random")


def test_eval_reorder_buffer(data_dir, lengths, monkeypatch):
  """Plan order through a bounded reorder buffer: any buffer size (one pass over the shards per
  window) gives the same batches, and each video's row does not depend on the order."""
  # Records arrive by index; a video is held until every earlier plan position has arrived.
  assert ip._peak_held_bytes(np.array([1, 2, 3]), np.ones(3)) == 1
  assert ip._peak_held_bytes(np.array([3, 1, 2]), np.ones(3)) == 3
  assert ip._peak_held_bytes(np.array([2, 1, 3]), np.array([5.0, 1.0, 7.0])) == 7
  videos, sizes = np.array([9, 4, 7, 1, 8, 0]), np.full(6, 10.0)
  windows = ip._read_windows(videos, sizes, 25)
  assert windows[0][0] == 0 and windows[-1][1] == 6
  assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
  assert all(ip._peak_held_bytes(videos[lo:hi], sizes[lo:hi]) <= 25 or hi - lo == 1
             for lo, hi in windows)
  assert ip._read_windows(np.sort(videos), sizes, 10) == [(0, 6)]   # by index: one pass
  assert ip._read_windows(videos, sizes, 1) == [(k, k + 1) for k in range(6)]

  seen = []
  read_windows = ip._read_windows
  monkeypatch.setattr(ip, "_read_windows", lambda *a: seen.append(read_windows(*a)) or seen[-1])
  kw = dict(batch_size=2, vlm_feature="clip")
  big = _eval_all(data_dir, 2, **kw)
  assert [len(w) for w in seen] == [1, 1]
  small = _eval_all(data_dir, 2, buffer_bytes=1, **kw)
  assert [len(w) for w in seen[2:]] == [6, 5]                      # one pass per video
  for a, b in zip(big, small):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  # Rows per video: the same values in 'manifest' order (only the padding differs).
  rows = {}
  for order in ("length", "manifest"):
    for batches in _eval_all(data_dir, 2, order=order, **kw):
      for b in batches:
        for r, i in enumerate(b["index_B"].tolist()):
          if i >= 0:
            t = int(lengths["test"][i])
            rows.setdefault(i, []).append(
                (b["feat_BxTxD"][r, :t], b["vlm_BxTxE"][r, :t], b["mask_BxT"][r, :t],
                 b["label_BxC"][r], b["scale_B"][r], b["valid_B"][r]))
  assert sorted(rows) == list(range(NUM_TEST))
  for by_len, by_index in rows.values():
    for x, y in zip(by_len, by_index):
      np.testing.assert_array_equal(x, y)


def test_eval_resampled(data_dir, lengths):
  batches = _eval_all(data_dir, 1, batch_size=4, num_snippets=16, vlm_feature="clip")[0]
  for b in batches:
    assert b["feat_BxTxD"].shape == (4, 16, 6) and b["vlm_BxTxE"].shape == (4, 16, 3)
    ok = b["valid_B"] > 0
    np.testing.assert_array_equal(b["mask_BxT"][ok], 1)
    np.testing.assert_allclose(b["scale_B"][ok], lengths["test"][b["index_B"][ok]] / 16,
                               rtol=1e-6)


def test_eval_resampled_floor_takes_bin_starts(data_dir, lengths):
  """sampling='floor' (ASL's test resampling) takes snippet floor(i T_v / T); 'uniform' the
  bin centres floor((2i + 1) T_v / 2T)."""
  whole = {}
  for b in _eval_all(data_dir, 1, batch_size=4)[0]:
    for r, idx in enumerate(b["index_B"]):
      if idx >= 0:
        whole[int(idx)] = b["feat_BxTxD"][r, :int(lengths["test"][idx])]
  for sampling in ("floor", "uniform"):
    for b in _eval_all(data_dir, 1, batch_size=4, num_snippets=16, sampling=sampling)[0]:
      for r, idx in enumerate(b["index_B"]):
        if idx < 0:
          continue
        t_v, i = int(lengths["test"][idx]), np.arange(16)
        pick = i * t_v // 16 if sampling == "floor" else (2 * i + 1) * t_v // 32
        np.testing.assert_array_equal(b["feat_BxTxD"][r], whole[int(idx)][pick])
  with pytest.raises(WstalError, match="eval sampling"):
    _eval_all(data_dir, 1, batch_size=4, num_snippets=16, sampling="random_perturb")


def test_eval_detects_manifest_mismatch(data_dir, tmp_path):
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(data_dir, bad)
  m = json.loads((bad / "manifest.json").read_text())
  m["splits"]["test"]["video_num_snippets"][0] += 1
  (bad / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(WstalError, match="video lengths in the shards differ"):
    _eval_all(str(bad), 1, batch_size=2)
  # Without the list, lengths are read from the shards.
  del m["splits"]["test"]["video_num_snippets"]
  (bad / "manifest.json").write_text(json.dumps(m))
  assert len(_eval_all(str(bad), 1, batch_size=2)[0]) == 6
  # A shard holding another shard's videos.
  other = tmp_path / "other"
  shutil.copytree(data_dir, other)
  shutil.copy(other / "test-00000-of-00004.tfrecord", other / "test-00002-of-00004.tfrecord")
  m = json.loads((other / "manifest.json").read_text())
  m["splits"]["test"]["shards"][2]["num_bytes"] = m["splits"]["test"]["shards"][0]["num_bytes"]
  (other / "manifest.json").write_text(json.dumps(m))
  for order in ("length", "manifest"):
    with pytest.raises(WstalError, match="shards hold other videos than the manifest lists"):
      _eval_all(str(other), 1, batch_size=2, order=order)
  # Corrupt bytes (same size) surface as WstalError, not a TF traceback.
  shard = bad / "test-00001-of-00004.tfrecord"
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(WstalError, match="truncated or corrupt"):
    _eval_all(str(bad), 1, batch_size=2)
  with pytest.raises(WstalError, match="truncated or corrupt"):
    _take(ip.train_batches(str(bad), split="test", batch_size=11, num_snippets=4, seed=0,
                           process_index=0, process_count=1), 2)
