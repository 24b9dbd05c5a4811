"""Every dataset the project writes is also a TFDS dataset: `tfds.builder_from_directory`
reads the built-in benchmark and a dataset with extras fields, and yields the arrays the
project's reader gives, byte for byte."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from wstal_jax.data import format as fmt
from wstal_jax.data import synthetic


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tfds") / "small")
  synthetic.generate(out, "small", seed=0)
  return out


def _by_name(data_dir, split):
  ds = tfds.builder_from_directory(data_dir).as_dataset(split=split)
  return {ex["name"].decode(): ex for ex in tfds.as_numpy(ds)}


def test_tfds_reads_the_builtin_test_split_as_the_project_reads_it(small):
  # The README's three lines:
  builder = tfds.builder_from_directory(small)
  ds = builder.as_dataset(split="test")
  first = next(iter(tfds.as_numpy(ds)))
  manifest = fmt.read_manifest(small)
  assert builder.info.splits["test"].num_examples == manifest["splits"]["test"]["num_videos"]
  assert first["feature"]["i3d"].dtype == np.float32
  assert first["feature"]["i3d"].shape[1] == manifest["features"]["i3d"]["dim"]
  got = _by_name(small, "test")
  ours = list(fmt.read_videos(small, "test"))
  assert sorted(got) == sorted(v.name for v in ours) and len(ours) == 212
  for v in ours:
    ex = got[v.name]
    assert ex["index"] == ours.index(v) and ex["num_snippets"] == v.num_snippets
    assert ex["duration"].tobytes() == np.float32(v.duration).tobytes()
    assert ex["label"].tolist() == v.label.astype(np.int64).tolist()
    assert ex["segments"].tobytes() == v.segments.tobytes()
    assert ex["segment_labels"].tolist() == v.segment_labels.tolist()
    assert ex["ambiguous"].tobytes() == v.ambiguous.tobytes()
    assert sorted(ex["feature"]) == sorted(manifest["features"])
    for name, arr in v.features.items():
      assert ex["feature"][name].tobytes() == arr.tobytes(), (v.name, name)


def test_extras_fields_every_record_carries(tmp_path, small):
  """A field some videos lack is still readable by TFDS: the writer gives it to every record
  (empty bytes, which the project's reader takes as absent)."""
  names = [v.name for v in fmt.read_videos(small, "test")][:3]
  out = str(tmp_path / "with_extras")
  fmt.copy_with_extras(small, out, {names[0]: {"note": b"first"}, names[2]: {"note": b"third"}})
  got = _by_name(out, "test")
  assert [got[n]["extra"]["note"] for n in names] == [b"first", b"", b"third"]
  ours = {v.name: v for v in fmt.read_videos(out, "test")}
  assert [ours[n].extras for n in names] == [{"note": b"first"}, {}, {"note": b"third"}]
  assert all(ex["extra"]["note"] == b"" for ex in _by_name(out, "train").values())


def test_builder_equals_the_converter_on_the_real_annotations(shared_data, tmp_path):
  """`thumos14/wtalc` built from a manual_dir (the real W-TALC annotation folder, generated
  features) holds the converter's records for the same files, byte for byte."""
  from wstal_jax.data import convert, tfds_builders
  manual = tmp_path / "manual"
  manual.mkdir()
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  (manual / "Thumos14reduced-Annotations").symlink_to(ann)
  names = np.load(ann / "videoname.npy")
  rng = np.random.default_rng(3)
  feats = np.empty(len(names), dtype=object)
  feats[:] = [rng.standard_normal((2 + i % 5, 2048), dtype=np.float32) for i in range(len(names))]
  np.save(manual / "Thumos14reduced-I3D-JOINTFeatures.npy", feats, allow_pickle=True)
  converted = str(tmp_path / "converted")
  features = manual / "Thumos14reduced-I3D-JOINTFeatures.npy"
  assert convert.main(["--format=wtalc", f"--features={features}", f"--annotations={ann}",
                       f"--out={converted}", "--num_shards=2"]) == 0
  assert tfds_builders.main(["--dataset=thumos14/wtalc", f"--manual_dir={manual}",
                             f"--data_dir={tmp_path / 'tfds'}"]) == 0
  builder = tfds.builder("thumos14/wtalc", data_dir=str(tmp_path / "tfds"))
  manifest = fmt.read_manifest(converted)
  assert builder.info.metadata["classes"] == manifest["classes"]
  for split in ("train", "test"):
    got = {ex["name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    ours = list(fmt.read_videos(converted, split))
    assert sorted(got) == sorted(v.name for v in ours)
    assert len(ours) == {"train": 200, "test": 212}[split]
    for i, v in enumerate(ours):
      ex = got[v.name]
      assert ex["index"] == i and ex["num_snippets"] == v.num_snippets
      assert ex["duration"].tobytes() == np.float32(v.duration).tobytes()
      assert ex["label"].tolist() == v.label.astype(np.int64).tolist()
      assert ex["segments"].tobytes() == v.segments.tobytes()
      assert ex["segment_labels"].tolist() == v.segment_labels.tolist()
      assert ex["ambiguous"].tobytes() == v.ambiguous.tobytes()
      assert ex["feature"]["i3d"].tobytes() == v.features["i3d"].tobytes()
  with pytest.raises(SystemExit):   # a manual_dir without the release: one error line
    tfds_builders.main(["--dataset=thumos14/wtalc", f"--manual_dir={tmp_path / 'none'}",
                        f"--data_dir={tmp_path / 'tfds2'}"])


def _compare(builder, converted, splits=("train", "test")):
  for split in splits:
    got = {ex["name"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    ours = list(fmt.read_videos(converted, split))
    assert sorted(got) == sorted(v.name for v in ours)
    for i, v in enumerate(ours):
      ex = got[v.name]
      assert ex["index"] == i and ex["label"].tolist() == v.label.astype(np.int64).tolist()
      assert ex["duration"].tobytes() == np.float32(v.duration).tobytes()
      assert ex["segments"].tobytes() == v.segments.tobytes()
      assert ex["feature"]["i3d"].tobytes() == v.features["i3d"].tobytes()


def test_basnet_builder_equals_the_converter(shared_data, tmp_path):
  """thumos14/basnet from gt.json, the split files and per-video rgb/flow features."""
  from wstal_jax.data import convert, tfds_builders
  manual = tmp_path / "manual"
  gt = json.loads((shared_data / "thumos14" / "gt.json").read_text())["database"]
  rng = np.random.default_rng(4)
  for split in ("train", "test"):
    names = (shared_data / "thumos14" / f"split_{split}.txt").read_text().split()
    (manual / f"split_{split}.txt").parent.mkdir(parents=True, exist_ok=True)
    (manual / f"split_{split}.txt").write_text("\n".join(names) + "\n")
    for stream in ("rgb", "flow"):
      (manual / "features" / split / stream).mkdir(parents=True)
    for i, name in enumerate(names):
      assert gt[name]["subset"] == split
      for stream in ("rgb", "flow"):
        np.save(manual / "features" / split / stream / f"{name}.npy",
                rng.standard_normal((2 + i % 3, 1024), dtype=np.float32))
  (manual / "gt.json").write_bytes((shared_data / "thumos14" / "gt.json").read_bytes())
  converted = str(tmp_path / "converted")
  assert convert.main(["--format=basnet", f"--features={manual / 'features'}",
                       f"--annotations={manual / 'gt.json'}", f"--splits={manual}",
                       f"--out={converted}", "--num_shards=2"]) == 0
  builder = tfds_builders.build("thumos14/basnet", str(manual), str(tmp_path / "tfds"))
  assert builder.info.metadata["classes"] == fmt.read_manifest(converted)["classes"]
  _compare(builder, converted)


def test_activitynet_builder_on_the_real_annotations(shared_data, tmp_path):
  """activitynet12/wtalc: the real annotation folder, one-snippet generated features."""
  from wstal_jax.data import tfds_builders
  manual = tmp_path / "manual"
  manual.mkdir()
  ann = shared_data / "activitynet12" / "ActivityNet1.2-Annotations"
  (manual / "ActivityNet1.2-Annotations").symlink_to(ann)
  n = len(np.load(ann / "videoname.npy"))
  feats = np.empty(n, dtype=object)
  feats[:] = [np.full((1, 2048), i % 7, np.float32) for i in range(n)]
  np.save(manual / "ActivityNet1.2-I3D-JOINTFeatures.npy", feats, allow_pickle=True)
  builder = tfds_builders.build("activitynet12/wtalc", str(manual), str(tmp_path / "tfds"))
  assert len(builder.info.metadata["classes"]) == 100
  assert builder.info.splits["train"].num_examples == 4819
  assert builder.info.splits["test"].num_examples == 2383
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test"))))
  assert ex["feature"]["i3d"].shape == (1, 2048) and ex["label"].shape == (100,)
