"""The TFDS view of a dataset directory: every dataset the project writes is also a TFDS
dataset (`tfds.builder_from_directory(DIR)`), described by the same schema.

  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(DIR)
  for ex in builder.as_dataset(split="test"):   # {"name", "label", "feature": {"i3d": [T, D]}, ...}
    ...

`features(manifest)` is `format.example_fields` as TFDS features (the feature streams decode
from their raw float32 bytes, as the project's reader decodes them); `write_metadata` writes
TFDS's `dataset_info.json` and `features.json` next to the manifest. The manifest's checksums
and counts stay the project's own check: TFDS does not verify prepared shards. Extras fields
(`extra/<name>`) are in the TFDS features when every record carries them.
"""
from __future__ import annotations

import numpy as np

from wstal_jax.data import format as fmt

# Shard names as the project writes them: `test-00000-of-00002.tfrecord`.
FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
_NP = {"string": np.object_, "int64": np.int64, "float32": np.float32}


def features(manifest: dict, extras=()):
  """tfds.features.FeaturesDict of the dataset's records (`format.example_fields`)."""
  import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
  Tensor = tfds.features.Tensor
  top, nested = {}, {"feature": {}, "extra": {}}
  fields = fmt.example_fields(dict(manifest, optional_fields=list(extras)))
  for key, f in fields.items():
    dtype = _NP[f.dtype]
    if f.kind in ("scalar", "bytes"):
      feat = Tensor(shape=(), dtype=dtype)
    elif f.kind == "vector":
      feat = Tensor(shape=(f.size,), dtype=dtype)
    elif f.kind == "pairs":
      feat = Tensor(shape=(None, 2), dtype=dtype)
    elif f.kind == "list":
      feat = Tensor(shape=(None,), dtype=dtype)
    else:   # raw float32 [T, dim] bytes
      feat = Tensor(shape=(None, f.size), dtype=dtype, encoding=tfds.features.Encoding.BYTES)
    group, _, name = key.partition("/")
    if name:
      nested[group][name] = feat
    else:
      top[key] = feat
  for group, members in nested.items():
    if members:
      top[group] = tfds.features.FeaturesDict(members)
  return tfds.features.FeaturesDict(top)


def write_metadata(data_dir: str, manifest: dict, extras=()) -> None:
  """Writes DATA_DIR/dataset_info.json and features.json for the shards of `manifest`."""
  import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
  from etils import epath   # pylint: disable=import-outside-toplevel
  splits = [tfds.core.SplitInfo(
      name=split, shard_lengths=[int(s["num_videos"]) for s in entry["shards"]],
      num_bytes=int(sum(s["num_bytes"] for s in entry["shards"])),
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=epath.Path(data_dir), template=FILENAME_TEMPLATE, split=split,
          filetype_suffix="tfrecord"))
      for split, entry in sorted(manifest["splits"].items())]
  tfds.folder_dataset.write_metadata(
      data_dir=data_dir, features=features(manifest, extras), split_infos=splits,
      filename_template=FILENAME_TEMPLATE, check_data=False,
      description=f"wstal_jax dataset {manifest['dataset']!r}: one tf.train.Example per video "
                  "(manifest.json has the classes, features and checksums)")
