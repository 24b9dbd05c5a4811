r"""TFDS builders for the community releases (data that cannot be downloaded: manual_dir).

  tfds build --imports=wstal_jax.data.tfds_builders --datasets=thumos14/wtalc \
      --manual_dir=M --data_dir=D
  python -m wstal_jax.data.tfds_builders --dataset=thumos14/wtalc --manual_dir=M --data_dir=D

(the second is the same build without the `tfds` command). Datasets and what M must hold:

  thumos14/wtalc    Thumos14reduced-I3D-JOINTFeatures.npy, Thumos14reduced-Annotations/
  thumos14/basnet   features/{train,test}/rgb/<vid>.npy (+ flow/), gt.json, split_train.txt,
                    split_test.txt; optional Thumos14reduced-Annotations/ for the durations
                    (else T * 16 / 25 from the features)
  activitynet12/wtalc  ActivityNet1.2-I3D-JOINTFeatures.npy, ActivityNet1.2-Annotations/

`_generate_examples` reads them with the converter's readers (`wstal_jax.data.convert`: the
same defect handling, the same checks through `writer`'s record validation) and the examples
have the project's schema (`tfds_io.features`), so a build holds exactly the records `python -m
wstal_jax.data.convert` writes for the same files (tested on the real annotations with
generated features); TFDS lays them out its own way (its shard names and example order), so the
project's trainer reads the converter's output, and TFDS users read either. The class names are
in `info.metadata["classes"]`, in the order of the multi-hot `label`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from wstal_jax.data import convert
from wstal_jax.data import tfds_io
from wstal_jax.data import writer
from wstal_jax.errors import WstalError, cli_main

_I3D = {"i3d": 2048}
_WTALC_FILES = {  # dataset -> (feature file, annotation folder)
    "thumos14": ("Thumos14reduced-I3D-JOINTFeatures.npy", "Thumos14reduced-Annotations"),
    "activitynet12": ("ActivityNet1.2-I3D-JOINTFeatures.npy", "ActivityNet1.2-Annotations"),
}


def _schema(num_classes: int):
  return tfds_io.features({"classes": [""] * num_classes,
                           "features": {k: {"dim": v} for k, v in _I3D.items()}})


def _example(rec, index: int) -> dict:
  return {"name": rec.name, "index": index, "duration": np.float32(rec.duration),
          "num_snippets": rec.num_snippets, "label": rec.label.astype(np.int64),
          "segments": rec.segments.reshape(-1, 2), "segment_labels":
          rec.segment_labels.astype(np.int64), "ambiguous": rec.ambiguous.reshape(-1, 2),
          "feature": {k: np.asarray(v, np.float32) for k, v in rec.features.items()}}


def _examples(records, classes):
  """(key, example) of validated records, `index` in the converter's (manifest) order."""
  for index, rec in enumerate(records):
    writer._validate_record(rec, classes=classes, feature_dims=_I3D)   # the converter's checks
    yield rec.name, _example(rec, index)


class _WtalcBuilder(tfds.core.GeneratorBasedBuilder):
  """W-TALC / CO2-Net releases: one pickled feature array + the annotation folder."""
  VERSION = tfds.core.Version("1.0.0")
  NUM_CLASSES = 0
  KEY = ""

  def _info(self):
    return self.dataset_info_from_configs(features=_schema(self.NUM_CLASSES),
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    feat_name, ann_name = _WTALC_FILES[self.KEY]
    manual = str(dl_manager.manual_dir)
    ann, feat_path = os.path.join(manual, ann_name), os.path.join(manual, feat_name)
    classes, videos, _ = convert.load_wtalc_annotations(ann)
    amb = os.path.join(ann, "Ambiguous_test.txt")
    if os.path.exists(amb):
      convert.load_ambiguous(amb, videos)
    convert.fix_segments(videos, clip_gt=False)
    if len(classes) != self.NUM_CLASSES:
      raise WstalError(f"{ann}/classlist.npy: {len(classes)} classes, {self.name} has "
                       f"{self.NUM_CLASSES}")
    self.info.metadata["classes"] = classes
    feats = convert._load_npy(feat_path, "W-TALC feature file")
    if feats.ndim == 0 or len(feats) != len(videos):
      raise WstalError(f"{feat_path}: holds {0 if feats.ndim == 0 else len(feats)} feature "
                       f"arrays but {ann}/videoname.npy lists {len(videos)} videos")
    index = {v.name: i for i, v in enumerate(videos)}

    def features_fn(v):
      return convert._check_2d(feats[index[v.name]], f"{feat_path} (video {v.name})",
                               "features")

    return {split: _examples(convert._records(
        videos, split, classes, features_fn, lambda v: f"{feat_path} entry {index[v.name]}",
        None, "", "i3d"), classes) for split in ("train", "test")}

  def _generate_examples(self, examples):   # the generators built above
    yield from examples


class Thumos14(_WtalcBuilder):
  """THUMOS14 (20 classes, I3D RGB+flow 2048-d) from the W-TALC or the BaS-Net release."""
  NUM_CLASSES = 20
  KEY = "thumos14"
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="wtalc", description="W-TALC / CO2-Net release"),
      tfds.core.BuilderConfig(name="basnet", description="BaS-Net / UM release"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  thumos14/wtalc: place Thumos14reduced-I3D-JOINTFeatures.npy and the
  Thumos14reduced-Annotations/ folder (W-TALC / CO2-Net release) in manual_dir.
  thumos14/basnet: place features/{train,test}/rgb/<vid>.npy (and flow/), gt.json,
  split_train.txt and split_test.txt (BaS-Net / UM release) in manual_dir; optionally
  Thumos14reduced-Annotations/ for the durations.
  """

  def _split_generators(self, dl_manager):
    if self.builder_config.name == "wtalc":
      return super()._split_generators(dl_manager)
    manual = str(dl_manager.manual_dir)
    features = os.path.join(manual, "features")
    classes, videos = convert.load_basnet_annotations(os.path.join(manual, "gt.json"), manual)
    if len(classes) != self.NUM_CLASSES:
      raise WstalError(f"{manual}/gt.json: {len(classes)} classes, thumos14 has 20")
    self.info.metadata["classes"] = classes
    durations = os.path.join(manual, "Thumos14reduced-Annotations")
    dur = convert.load_durations(durations) if os.path.isdir(durations) else None
    streams = convert._basnet_streams(features)
    for v in videos:
      v.duration = dur[v.name] if dur is not None else max(convert._npy_shape(
          convert._basnet_paths(features, v, streams)[0])[0], 1) * 16 / 25.0
    convert.fix_segments(videos, clip_gt=False)

    def features_fn(v):
      return convert._load_basnet_features(features, v, streams)

    def source_fn(v):
      return " + ".join(convert._basnet_paths(features, v, streams))

    return {split: _examples(convert._records(videos, split, classes, features_fn, source_fn,
                                              None, "", "i3d"), classes)
            for split in ("train", "test")}


class Activitynet12(_WtalcBuilder):
  """ActivityNet1.2 (100 classes, I3D RGB+flow 2048-d) from the W-TALC release."""
  NUM_CLASSES = 100
  KEY = "activitynet12"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="wtalc", description="W-TALC release")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place ActivityNet1.2-I3D-JOINTFeatures.npy and the ActivityNet1.2-Annotations/ folder
  (W-TALC / CO2-Net release) in manual_dir.
  """


def build(dataset: str, manual_dir: str, data_dir: str):
  """Builds `dataset` ('thumos14/wtalc', ...) into data_dir; returns the builder."""
  if not os.path.isdir(manual_dir):
    raise WstalError(f"--manual_dir={manual_dir}: not a folder")
  builder = tfds.builder(dataset, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m wstal_jax.data.tfds_builders",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True,
                 choices=["thumos14/wtalc", "thumos14/basnet", "activitynet12/wtalc"])
  p.add_argument("--manual_dir", required=True, help="the release's files (see --help)")
  p.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
  args = p.parse_args(argv)
  builder = build(args.dataset, args.manual_dir, args.data_dir)
  print(f"built {args.dataset} in {builder.data_dir}: "
        + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
