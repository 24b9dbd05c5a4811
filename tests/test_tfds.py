"""Every dataset the project writes is also a TFDS dataset: `tfds.builder_from_directory`
reads the built-in benchmark and a dataset with extras fields, and yields the arrays the
project's reader gives, byte for byte."""
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
