"""Dataset directory format: round trip, validation, atomic writes, manifest/shard checks."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError

CLASSES = ["a", "b", "c"]
DIMS = {"i3d": 8, "clip": 4}


def make_records(n, seed=0, with_extras=True):
  rng = np.random.default_rng(seed)
  recs = []
  for i in range(n):
    num_t = int(rng.integers(1, 20))
    segs = np.sort(rng.uniform(0, num_t * 0.64, size=(i % 4, 2)), axis=1)
    recs.append(fmt.VideoRecord(
        name=f"video_{i:03d}", duration=num_t * 0.64,
        features={"i3d": rng.normal(size=(num_t, 8)).astype(np.float32),
                  "clip": rng.normal(size=(num_t, 4)).astype(np.float32)},
        label=np.eye(3, dtype=np.float32)[i % 3], segments=segs,
        segment_labels=np.full(i % 4, i % 3), ambiguous=np.array([[0.5, 1.0]] * (i % 2)),
        extras={"description": f"video {i}"} if (with_extras and i % 2) else {},
        source=f"src_{i}.npy"))
  return recs


def write(out, train=None, test=None, **kw):
  args = dict(dataset="toy", classes=CLASSES, feature_dims=DIMS, num_shards=3,
              text_embeddings=np.ones((3, 5), np.float32), source={"test": True})
  args.update(kw)
  splits = {}
  if train is not None:
    splits["train"] = train
  if test is not None:
    splits["test"] = test
  return fmt.write_dataset(str(out), splits=splits, **args)


@pytest.fixture
def dataset(tmp_path):
  train, test = make_records(7, 0), make_records(2, 1)
  out = tmp_path / "ds"
  manifest = write(out, train=[_copy(r) for r in train], test=[_copy(r) for r in test])
  return out, manifest, train, test


def _copy(rec):
  return fmt.VideoRecord(name=rec.name, duration=rec.duration,
                         features={k: v.copy() for k, v in rec.features.items()},
                         label=rec.label.copy(), segments=np.array(rec.segments),
                         segment_labels=np.array(rec.segment_labels),
                         ambiguous=np.array(rec.ambiguous), extras=dict(rec.extras),
                         source=rec.source)


def test_round_trip(dataset):
  out, manifest, train, test = dataset
  assert sorted(os.listdir(out)) == sorted(
      ["manifest.json", "text_embeddings.npy", "dataset_info.json", "features.json"]
      + [f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
      + [f"test-{i:05d}-of-00002.tfrecord" for i in range(2)])  # 2 videos -> 2 shards
  assert os.listdir(out.parent) == ["ds"]  # no temp dir left behind
  m = fmt.read_manifest(str(out))
  assert m == json.loads((out / "manifest.json").read_text()) == manifest
  assert m["format_version"] == 1 and m["classes"] == CLASSES
  assert m["features"] == {"i3d": {"dim": 8}, "clip": {"dim": 4}}
  assert m["splits"]["train"]["num_videos"] == 7
  assert m["splits"]["train"]["num_instances"] == sum(len(r.segments) for r in train)
  assert [s["num_videos"] for s in m["splits"]["train"]["shards"]] == [3, 2, 2]
  assert m["optional_fields"] == ["description"]
  assert m["source"] == {"test": True}
  for split, recs in (("train", train), ("test", test)):
    got = list(fmt.read_videos(str(out), split))
    assert [g.name for g in got] == [r.name for r in recs]
    for g, r in zip(got, recs):
      assert g.num_snippets == r.num_snippets
      for k in DIMS:
        np.testing.assert_array_equal(g.features[k], r.features[k])
        assert g.features[k].dtype == np.float32
      np.testing.assert_array_equal(g.label, r.label)
      np.testing.assert_allclose(g.segments, np.asarray(r.segments).reshape(-1, 2), rtol=1e-6)
      np.testing.assert_array_equal(g.segment_labels, r.segment_labels)
      np.testing.assert_allclose(g.ambiguous, np.asarray(r.ambiguous).reshape(-1, 2))
      assert g.extras == {k: v.encode() for k, v in r.extras.items()}
      assert g.duration == pytest.approx(r.duration, rel=1e-6)
  info = fmt.read_video_info(str(out), "train")
  assert [i.index for i in info] == list(range(7))
  assert [i.num_snippets for i in info] == [r.num_snippets for r in train]
  only_clip = next(fmt.read_videos(str(out), "train", features=["clip"]))
  assert list(only_clip.features) == ["clip"]
  np.testing.assert_array_equal(fmt.load_text_embeddings(str(out)), np.ones((3, 5)))
  fmt.verify_shards(str(out))
  assert fmt.shard_paths(str(out), "test") == [
      str(out / "test-00000-of-00002.tfrecord"), str(out / "test-00001-of-00002.tfrecord")]
  assert fmt.seconds_per_snippet(m) == pytest.approx(0.64)


def test_tf_parse_fn(dataset):
  out, manifest, train, _ = dataset
  parse = fmt.tf_parse_fn(manifest, ["i3d"], annotations=True)
  ds = tf.data.TFRecordDataset(fmt.shard_paths(str(out), "train", manifest)[:1]).map(parse)
  got = list(ds.as_numpy_iterator())
  assert [int(g["index"]) for g in got] == [0, 3, 6]  # video i is in shard i % 3
  for g in got:
    r = train[int(g["index"])]
    assert g["name"].decode() == r.name and int(g["num_snippets"]) == r.num_snippets
    np.testing.assert_array_equal(g["feature/i3d"], r.features["i3d"])
    np.testing.assert_array_equal(g["label"], r.label)
    np.testing.assert_array_equal(g["segment_labels"], r.segment_labels)
    assert g["segments"].shape == (len(r.segments), 2)
  with pytest.raises(WstalError, match="'vlm'"):
    fmt.tf_parse_fn(manifest, ["vlm"])


def _bad(rec, **changes):
  rec = _copy(rec)
  for k, v in changes.items():
    setattr(rec, k, v)
  return rec


@pytest.mark.parametrize("change,message", [
    (lambda r: _bad(r, features={"i3d": np.zeros((0, 8)), "clip": np.zeros((0, 4))}), "T=0"),
    (lambda r: _bad(r, features={"i3d": np.full((3, 8), np.nan), "clip": np.zeros((3, 4))}),
     "NaN/Inf"),
    (lambda r: _bad(r, features={"i3d": np.zeros((3, 8)), "clip": np.full((3, 4), np.inf)}),
     "NaN/Inf"),
    (lambda r: _bad(r, features={"i3d": np.zeros((3, 7)), "clip": np.zeros((3, 4))}),
     "dim 7, expected 8"),
    (lambda r: _bad(r, features={"i3d": np.zeros((5, 8)), "clip": np.zeros((3, 4))}),
     "different numbers of snippets"),
    (lambda r: _bad(r, features={"i3d": np.zeros((5, 8))}), "declares"),
    (lambda r: _bad(r, segments=np.array([[0., 1.]]), segment_labels=np.array([3])),
     "class id 3 is not in the class list"),
    (lambda r: _bad(r, label=np.ones(4)), r"multi-hot \[C=3\]"),
    (lambda r: _bad(r, label=np.array([0, 2, 0])), "only 0 and 1"),
    (lambda r: _bad(r, segments=np.array([[2., 1.]]), segment_labels=np.array([0])),
     "ends before it starts"),
    (lambda r: _bad(r, duration=0.0), "duration"),
])
def test_write_rejects_bad_records(tmp_path, change, message):
  recs = make_records(5)
  recs[3] = change(recs[3])
  with pytest.raises(WstalError, match=message) as e:
    write(tmp_path / "ds", train=iter(recs))
  assert "src_3.npy" in str(e.value) and "video_003" in str(e.value)
  assert os.listdir(tmp_path) == []  # nothing half-written


def test_write_rejects_bad_arguments(tmp_path):
  with pytest.raises(WstalError, match="duplicate video name"):
    write(tmp_path / "ds", train=make_records(2) + make_records(1))
  with pytest.raises(WstalError, match="text embeddings"):
    write(tmp_path / "ds", train=make_records(2), text_embeddings=np.ones((2, 5)))
  with pytest.raises(WstalError, match="unknown split"):
    fmt.write_dataset(str(tmp_path / "ds"), dataset="x", classes=CLASSES, feature_dims=DIMS,
                      splits={"val": make_records(1)}, num_shards=1)
  with pytest.raises(WstalError, match="no videos"):
    write(tmp_path / "ds", train=[])
  with pytest.raises(WstalError, match="duplicate class"):
    write(tmp_path / "ds", train=make_records(2), classes=["a", "a", "b"])
  assert os.listdir(tmp_path) == []
  write(tmp_path / "ds", train=make_records(2))
  with pytest.raises(WstalError, match="already exists"):
    write(tmp_path / "ds", train=make_records(3))
  write(tmp_path / "ds", train=make_records(3), overwrite=True)
  assert fmt.read_manifest(str(tmp_path / "ds"))["splits"]["train"]["num_videos"] == 3
  assert os.listdir(tmp_path) == ["ds"]


def _edit_manifest(out, fn):
  m = json.loads((out / "manifest.json").read_text())
  fn(m)
  (out / "manifest.json").write_text(json.dumps(m))


def test_read_manifest_errors(dataset, tmp_path):
  out = dataset[0]
  with pytest.raises(WstalError, match="manifest.json: not found"):
    fmt.read_manifest(str(tmp_path / "nothing"))
  (out / "manifest.json").rename(out / "m.bak")
  (out / "manifest.json").write_text("{not json")
  with pytest.raises(WstalError, match="not valid JSON"):
    fmt.read_manifest(str(out))
  (out / "m.bak").rename(out / "manifest.json")
  _edit_manifest(out, lambda m: m.update(format_version=2))
  with pytest.raises(WstalError, match="format_version 2"):
    fmt.read_manifest(str(out))
  _edit_manifest(out, lambda m: m.update(format_version=1))
  fmt.read_manifest(str(out))
  # A manifest that does not match its shards.
  _edit_manifest(out, lambda m: m["splits"]["train"].update(num_videos=8))
  with pytest.raises(WstalError, match="shards hold 7 videos"):
    fmt.read_manifest(str(out))
  _edit_manifest(out, lambda m: m["splits"]["train"].update(num_videos=7))
  (out / "train-00002-of-00003.tfrecord").rename(out / "x")
  with pytest.raises(WstalError, match="missing.*train-00002-of-00003"):
    fmt.read_manifest(str(out))
  (out / "x").rename(out / "train-00002-of-00003.tfrecord")
  (out / "train-00003-of-00003.tfrecord").write_bytes(b"")
  with pytest.raises(WstalError, match="not listed in the manifest"):
    fmt.read_manifest(str(out))
  (out / "train-00003-of-00003.tfrecord").unlink()
  with pytest.raises(WstalError, match="no split 'val'"):
    fmt.shard_paths(str(out), "val")


def test_truncated_and_corrupt_shards(dataset):
  out = dataset[0]
  shard = out / "train-00001-of-00003.tfrecord"
  data = shard.read_bytes()
  # Same size, one byte flipped in the middle: checksum and record CRC both catch it.
  flipped = bytearray(data)
  flipped[len(data) // 2] ^= 0xFF
  shard.write_bytes(bytes(flipped))
  fmt.read_manifest(str(out))
  with pytest.raises(WstalError, match="train-00001-of-00003.tfrecord: sha256"):
    fmt.verify_shards(str(out), "train")
  fmt.verify_shards(str(out), "test")
  with pytest.raises(WstalError, match="truncated or corrupt"):
    list(fmt.read_videos(str(out), "train"))
  # Truncated: the size check in read_manifest names the shard...
  shard.write_bytes(data[:-100])
  with pytest.raises(WstalError, match="train-00001-of-00003.tfrecord has .* bytes"):
    fmt.read_manifest(str(out))
  # ...and without the size in the manifest, reading still fails cleanly.
  _edit_manifest(out, lambda m: [s.pop("num_bytes") for s in m["splits"]["train"]["shards"]])
  with pytest.raises(WstalError, match="truncated or corrupt"):
    list(fmt.read_videos(str(out), "train"))
  with pytest.raises(WstalError, match="truncated or corrupt"):
    fmt.read_video_info(str(out), "train")


def test_shards_swapped_do_not_match_manifest(dataset):
  out = dataset[0]
  a, b = out / "train-00001-of-00003.tfrecord", out / "train-00002-of-00003.tfrecord"
  data_a, data_b = a.read_bytes(), b.read_bytes()
  a.write_bytes(data_b)
  b.write_bytes(data_a)
  _edit_manifest(out, lambda m: [s.pop("num_bytes") for s in m["splits"]["train"]["shards"]])
  with pytest.raises(WstalError, match="manifest does not match its shards"):
    list(fmt.read_videos(str(out), "train"))


def test_more_shards_than_videos_and_per_split_shards(tmp_path):
  m = write(tmp_path / "ds", train=make_records(2), test=make_records(5),
            num_shards={"train": 4, "test": 2}, text_embeddings=None)
  assert [s["file"] for s in m["splits"]["train"]["shards"]] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert len(m["splits"]["test"]["shards"]) == 2
  assert m["text_embeddings"] is None
  assert fmt.load_text_embeddings(str(tmp_path / "ds")) is None
  assert len(list(fmt.read_videos(str(tmp_path / "ds"), "test"))) == 5


def test_feature_text_embeddings(tmp_path):
  """Per-feature class text embeddings: written, listed, preferred for their feature, and
  validated (unknown feature, wrong shape, missing file)."""
  out = tmp_path / "ds"
  clip_text = np.arange(12, dtype=np.float32).reshape(3, 4)
  m = write(out, train=make_records(3), feature_text_embeddings={"clip": clip_text})
  assert m["feature_text_embeddings"] == {"clip": "text_embeddings_clip.npy"}
  m = fmt.read_manifest(str(out))
  np.testing.assert_array_equal(fmt.load_text_embeddings(str(out), m, feature="clip"), clip_text)
  np.testing.assert_array_equal(fmt.load_text_embeddings(str(out), m, feature="i3d"),
                                np.ones((3, 5)))   # no own file: the default
  np.testing.assert_array_equal(fmt.load_text_embeddings(str(out), m), np.ones((3, 5)))
  with pytest.raises(WstalError, match="'flow' is not a feature"):
    write(tmp_path / "b1", train=make_records(2), feature_text_embeddings={"flow": clip_text})
  with pytest.raises(WstalError, match=r"text embeddings of feature 'clip' must be \[C=3"):
    write(tmp_path / "b2", train=make_records(2), feature_text_embeddings={"clip": clip_text[:2]})
  assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()
  (out / "text_embeddings_clip.npy").unlink()
  with pytest.raises(WstalError, match="text_embeddings_clip.npy .feature 'clip'. is missing"):
    fmt.read_manifest(str(out))
