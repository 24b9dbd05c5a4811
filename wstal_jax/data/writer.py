"""Writing a dataset directory (the schema and the readers are in format.py).

  write_dataset     validates records and writes manifest.json + shards atomically
  copy_with_extras  a dataset copied with per-video extras fields and artefacts added

Every output is byte-deterministic: the same records give the same shard bytes (map fields
serialized in key order) and the same manifest in any process.
"""
import collections
import io
import json
import uuid
from typing import Any, Iterable, Mapping

from absl import logging
import numpy as np
import tensorflow as tf

from wstal_jax.data.format import (
    _NAME_RE, FORMAT_VERSION, MANIFEST, SPLITS, TEXT_EMBEDDINGS, VideoRecord, _sha256, load_aux,
    load_text_embeddings, read_manifest, read_videos, shard_name)
from wstal_jax.data import tfds_io
from wstal_jax.errors import WstalError


# ----------------------------------------------------------------------------------- writing


def _where(rec: VideoRecord) -> str:
  return f"video {rec.name!r} (from {rec.source or 'unknown source'})"


def _as_pairs(arr, what: str, rec: VideoRecord) -> np.ndarray:
  """[K, 2] float32 (start s, end s), finite, start <= end."""
  pairs = np.asarray(arr if arr is not None else np.zeros((0, 2)), dtype=np.float64)
  if pairs.size == 0:
    return np.zeros((0, 2), np.float32)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise WstalError(f"{_where(rec)}: {what} must have shape [K, 2], got {pairs.shape}")
  if not np.all(np.isfinite(pairs)):
    raise WstalError(f"{_where(rec)}: {what} contain NaN/Inf")
  if np.any(pairs[:, 1] < pairs[:, 0]):
    k = int(np.argmax(pairs[:, 1] < pairs[:, 0]))
    raise WstalError(f"{_where(rec)}: {what} [{k}] ends before it starts: {pairs[k].tolist()}")
  return pairs.astype(np.float32)


def _validate_record(rec: VideoRecord, *, classes, feature_dims, optional_fields=None):
  """Checks and normalises one record in place; raises WstalError naming the video + source."""
  if not isinstance(rec, VideoRecord):
    raise WstalError(f"expected a VideoRecord, got {type(rec).__name__}")
  if not isinstance(rec.name, str) or not rec.name:
    raise WstalError(f"video with empty name (from {rec.source or 'unknown source'})")
  try:
    duration = float(rec.duration)
  except (TypeError, ValueError):
    raise WstalError(f"{_where(rec)}: duration {rec.duration!r} is not a number") from None
  if not np.isfinite(duration) or duration <= 0:
    raise WstalError(f"{_where(rec)}: duration must be finite and > 0, got {duration}")
  rec.duration = duration
  if set(rec.features) != set(feature_dims):
    raise WstalError(f"{_where(rec)}: has features {sorted(rec.features)}, the dataset declares "
                     f"{sorted(feature_dims)}")
  num_t = None
  for fname in sorted(feature_dims):
    feat = np.asarray(rec.features[fname])
    if feat.ndim != 2:
      raise WstalError(f"{_where(rec)}: feature {fname!r} must be [T, dim], got shape "
                       f"{feat.shape}")
    if feat.shape[0] == 0:
      raise WstalError(f"{_where(rec)}: feature {fname!r} has T=0 snippets (empty video)")
    if feat.shape[1] != feature_dims[fname]:
      raise WstalError(f"{_where(rec)}: feature {fname!r} has dim {feat.shape[1]}, expected "
                       f"{feature_dims[fname]}")
    if not np.issubdtype(feat.dtype, np.floating):
      raise WstalError(f"{_where(rec)}: feature {fname!r} has dtype {feat.dtype}, expected float")
    feat = feat.astype(np.float32)
    if not np.all(np.isfinite(feat)):
      bad_t = int(np.argmax(~np.all(np.isfinite(feat), axis=1)))
      raise WstalError(f"{_where(rec)}: feature {fname!r} contains NaN/Inf (first at snippet "
                       f"{bad_t})")
    if num_t is None:
      num_t = feat.shape[0]
    elif feat.shape[0] != num_t:
      raise WstalError(f"{_where(rec)}: features have different numbers of snippets: "
                       + ", ".join(f"{k} T={np.shape(rec.features[k])[0]}"
                                   for k in sorted(feature_dims)))
    rec.features[fname] = feat
  num_c = len(classes)
  label = np.asarray(rec.label, dtype=np.float64).reshape(-1)
  if label.shape != (num_c,):
    raise WstalError(f"{_where(rec)}: label must be multi-hot [C={num_c}], got shape "
                     f"{np.shape(rec.label)}")
  if not np.all((label == 0) | (label == 1)):
    raise WstalError(f"{_where(rec)}: label must contain only 0 and 1")
  rec.label = label.astype(np.float32)
  rec.segments = _as_pairs(rec.segments, "segments", rec)
  seg_labels = np.asarray(rec.segment_labels if rec.segment_labels is not None else [])
  seg_labels = seg_labels.reshape(-1)
  if seg_labels.size and not np.issubdtype(seg_labels.dtype, np.integer):
    raise WstalError(f"{_where(rec)}: segment_labels must be integer class ids")
  if seg_labels.shape[0] != rec.segments.shape[0]:
    raise WstalError(f"{_where(rec)}: {rec.segments.shape[0]} segments but "
                     f"{seg_labels.shape[0]} segment_labels")
  bad = (seg_labels < 0) | (seg_labels >= num_c)
  if np.any(bad):
    raise WstalError(f"{_where(rec)}: segment class id {int(seg_labels[bad][0])} is not in the "
                     f"class list (C={num_c})")
  rec.segment_labels = seg_labels.astype(np.int32)
  rec.ambiguous = _as_pairs(rec.ambiguous, "ambiguous segments", rec)
  extras = {}
  for key, val in (rec.extras or {}).items():
    if not isinstance(key, str) or not _NAME_RE.match(key):
      raise WstalError(f"{_where(rec)}: bad extras field name {key!r}")
    if optional_fields is not None and key not in optional_fields:
      raise WstalError(f"{_where(rec)}: extras field {key!r} not in optional_fields")
    if isinstance(val, str):
      val = val.encode("utf-8")
    if not isinstance(val, bytes):
      raise WstalError(f"{_where(rec)}: extras field {key!r} must be bytes or str")
    extras[key] = val
  rec.extras = extras


def _example(rec: VideoRecord, index: int, feature_names, declared=()) -> bytes:
  """Serialized tf.train.Example of one validated record (schema: format.example_fields).
  `declared` extras fields the record lacks are written empty (b"", which readers take as
  absent), so that every record carries them and TFDS can read them."""
  f = tf.train.Feature
  feats = {
      "name": f(bytes_list=tf.train.BytesList(value=[rec.name.encode("utf-8")])),
      "index": f(int64_list=tf.train.Int64List(value=[index])),
      "duration": f(float_list=tf.train.FloatList(value=[rec.duration])),
      "num_snippets": f(int64_list=tf.train.Int64List(value=[rec.num_snippets])),
      "label": f(int64_list=tf.train.Int64List(value=rec.label.astype(np.int64).tolist())),
      "segments": f(float_list=tf.train.FloatList(value=rec.segments.reshape(-1).tolist())),
      "segment_labels": f(int64_list=tf.train.Int64List(
          value=rec.segment_labels.astype(np.int64).tolist())),
      "ambiguous": f(float_list=tf.train.FloatList(value=rec.ambiguous.reshape(-1).tolist())),
  }
  for fname in feature_names:
    raw = np.ascontiguousarray(rec.features[fname], dtype="<f4").tobytes()
    feats[f"feature/{fname}"] = f(bytes_list=tf.train.BytesList(value=[raw]))
  for key in sorted(set(rec.extras) | set(declared)):
    feats[f"extra/{key}"] = f(bytes_list=tf.train.BytesList(value=[rec.extras.get(key, b"")]))
  # deterministic=True: map fields serialized in key order, so the same records give the same
  # shard bytes in any process (the built-in benchmark is byte-identical per seed).
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(
      deterministic=True)


def _check_dataset_args(classes, feature_dims, primary_feature, snippet_frames, fps):
  classes = list(classes)
  if not classes:
    raise WstalError("class list is empty")
  for c in classes:
    if not isinstance(c, str) or not c:
      raise WstalError(f"class names must be non-empty strings, got {c!r}")
  if len(set(classes)) != len(classes):
    dup = sorted({c for c in classes if classes.count(c) > 1})
    raise WstalError(f"duplicate class names: {dup}")
  dims = {}
  for name, dim in dict(feature_dims).items():
    if not isinstance(name, str) or not _NAME_RE.match(name):
      raise WstalError(f"bad feature name {name!r} (letters, digits, _ . - only)")
    if int(dim) <= 0 or int(dim) != dim:
      raise WstalError(f"feature {name!r}: dim must be a positive integer, got {dim!r}")
    dims[name] = int(dim)
  if primary_feature not in dims:
    raise WstalError(f"primary feature {primary_feature!r} not among features {sorted(dims)}")
  if not (float(snippet_frames) > 0 and float(fps) > 0):
    raise WstalError(f"snippet_frames and fps must be > 0, got {snippet_frames}, {fps}")
  return classes, dims


def _write_split(tmp_dir, split, records, num_shards, *, classes, feature_dims, optional_fields):
  """Streams one split into tmp_dir (video i -> shard i % n). Returns the manifest entry and
  {extras field: number of records carrying it}."""
  names = sorted(feature_dims)
  declared = sorted(optional_fields or ())
  carried = collections.Counter()
  partial = [tf.io.gfile.join(tmp_dir, f"{split}-{i:05d}.partial") for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p) for p in partial]
  counts = [0] * num_shards
  lengths = []
  seen = set()
  num_videos = num_instances = 0
  try:
    for rec in records:
      _validate_record(rec, classes=classes, feature_dims=feature_dims,
                       optional_fields=optional_fields)
      if rec.name in seen:
        raise WstalError(f"{_where(rec)}: duplicate video name in split {split!r}")
      seen.add(rec.name)
      shard = num_videos % num_shards
      writers[shard].write(_example(rec, num_videos, names, declared))
      carried.update(set(rec.extras) | set(declared))
      counts[shard] += 1
      lengths.append(rec.num_snippets)
      num_videos += 1
      num_instances += rec.segments.shape[0]
  finally:
    for w in writers:
      w.close()
  if num_videos == 0:
    raise WstalError(f"split {split!r} has no videos")
  # With fewer videos than shards the trailing shards are empty: drop them.
  n = min(num_shards, num_videos)
  shards = []
  for i in range(num_shards):
    if i >= n:
      tf.io.gfile.remove(partial[i])
      continue
    final = tf.io.gfile.join(tmp_dir, shard_name(split, i, n))
    tf.io.gfile.rename(partial[i], final)
    shards.append({"file": shard_name(split, i, n), "num_videos": counts[i],
                   "num_bytes": int(tf.io.gfile.stat(final).length), "sha256": _sha256(final)})
  logging.info("wrote split %s: %d videos, %d instances, %d shards", split, num_videos,
               num_instances, n)
  return {"num_videos": num_videos, "num_instances": num_instances, "shards": shards,
          "video_num_snippets": lengths}, carried


def _check_text(arr, num_classes, what) -> np.ndarray:
  text_CxE = np.asarray(arr)
  if text_CxE.ndim != 2 or text_CxE.shape[0] != num_classes or text_CxE.shape[1] == 0:
    raise WstalError(f"{what} must be [C={num_classes}, E], got {text_CxE.shape}")
  if not np.all(np.isfinite(text_CxE)):
    raise WstalError(f"{what} contain NaN/Inf")
  return text_CxE.astype(np.float32)


def _save_npy(path, arr):
  buf = io.BytesIO()
  np.save(buf, arr)
  with tf.io.gfile.GFile(path, "wb") as fh:
    fh.write(buf.getvalue())


def write_dataset(out_dir: str, *, dataset: str, classes, feature_dims: Mapping[str, int],
                  splits: Mapping[str, Iterable[VideoRecord]],
                  num_shards: int | Mapping[str, int],
                  text_embeddings: np.ndarray | None = None, primary_feature: str = "i3d",
                  snippet_frames: int = 16, fps: float = 25.0,
                  feature_text_embeddings: Mapping[str, np.ndarray] | None = None,
                  source: Mapping[str, Any] | None = None,
                  optional_fields=None, aux: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> dict:
  """Validates and writes a dataset directory atomically; returns the manifest dict.

  Args:
    out_dir: the dataset directory to create (must not exist unless overwrite=True).
    dataset: dataset name stored in the manifest.
    classes: C class names; a class id is a position in this list.
    feature_dims: feature name -> dim; every record has every feature, float32 [T, dim].
    splits: {"train"|"test": iterable of VideoRecord}; consumed once, streamed to disk.
    num_shards: shards per split (an int for all, or {split: int}); capped at the number of
      videos of the split.
    text_embeddings: optional float32 [C, E] stored as text_embeddings.npy.
    feature_text_embeddings: optional {feature name: float32 [C, E_f]}: class text
      embeddings in the space of that feature stream (e.g. CLIP text embeddings for `clip`
      image features), stored as text_embeddings_<feature>.npy. `load_text_embeddings(...,
      feature=name)` prefers these over text_embeddings.npy.
    optional_fields: extras fields allowed in records (default: whatever records carry).
    aux: optional dataset-level artefacts {name: float32 array (stored as aux_<name>.npy) or
      JSON-able dict (aux_<name>.json)} (e.g. the word vectors and vocabulary of
      `data.descriptions`); `load_aux(data_dir, name)` reads one back.
    overwrite: replace an existing out_dir (only after the new one is complete).

  Every record is checked (T > 0, finite features, dims, same T for all features, label [C]
  multi-hot, segment class ids < C). Everything is written to a temp sibling directory that is
  renamed into place at the end; on any error that directory is removed and a WstalError names
  the video and its `source`.
  """
  classes, dims = _check_dataset_args(classes, feature_dims, primary_feature, snippet_frames,
                                      fps)
  out_dir = str(out_dir).rstrip("/")
  if not out_dir:
    raise WstalError("empty output directory")
  if tf.io.gfile.exists(out_dir) and not overwrite:
    raise WstalError(f"output directory {out_dir} already exists (remove it or pass overwrite)")
  splits = dict(splits)
  if not splits:
    raise WstalError("no splits to write")
  for split in splits:
    if split not in SPLITS:
      raise WstalError(f"unknown split {split!r}; expected one of {SPLITS}")
  if isinstance(num_shards, Mapping):
    shards_per = {s: num_shards.get(s, 1) for s in splits}
  else:
    shards_per = {s: num_shards for s in splits}
  for s, n in shards_per.items():
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise WstalError(f"num_shards for split {s!r} must be an integer >= 1, got {n!r}")
  text_path = None
  if text_embeddings is not None:
    text_CxE = _check_text(text_embeddings, len(classes), "text embeddings")
  per_feature = {}
  for name, arr in (feature_text_embeddings or {}).items():
    if name not in dims:
      raise WstalError(f"feature_text_embeddings: {name!r} is not a feature of the dataset "
                       f"({sorted(dims)})")
    per_feature[name] = _check_text(arr, len(classes), f"text embeddings of feature {name!r}")
  if optional_fields is not None:
    optional_fields = sorted(set(optional_fields))
  aux = dict(aux or {})
  for name, val in aux.items():
    if not (isinstance(name, str) and _NAME_RE.match(name)):
      raise WstalError(f"aux: bad artefact name {name!r}")
    if not isinstance(val, (dict, np.ndarray)):
      raise WstalError(f"aux {name!r}: expected a numpy array or a dict, got {type(val).__name__}")
  parent = out_dir.rsplit("/", 1)[0] if "/" in out_dir else "."
  if parent and not tf.io.gfile.exists(parent):
    tf.io.gfile.makedirs(parent)
  base = out_dir.rsplit("/", 1)[-1]
  tmp_dir = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
  old_dir = None
  try:
    tf.io.gfile.makedirs(tmp_dir)
    split_entries = {}
    allowed = set(optional_fields) if optional_fields is not None else None
    seen_fields = set()

    def tracked(records):
      for rec in records:
        yield rec
        seen_fields.update(rec.extras)

    carried = {}
    for split, records in splits.items():
      split_entries[split], carried[split] = _write_split(
          tmp_dir, split, tracked(records), int(shards_per[split]), classes=classes,
          feature_dims=dims, optional_fields=allowed)
    if text_embeddings is not None:
      text_path = TEXT_EMBEDDINGS
      _save_npy(tf.io.gfile.join(tmp_dir, TEXT_EMBEDDINGS), text_CxE)
    feature_text_paths = {}
    for name, arr in sorted(per_feature.items()):
      feature_text_paths[name] = f"text_embeddings_{name}.npy"
      _save_npy(tf.io.gfile.join(tmp_dir, feature_text_paths[name]), arr)
    aux_files = {}
    for name, val in sorted(aux.items()):
      if isinstance(val, dict):
        aux_files[name] = f"aux_{name}.json"
        with tf.io.gfile.GFile(tf.io.gfile.join(tmp_dir, aux_files[name]), "w") as fh:
          fh.write(json.dumps(val, sort_keys=True) + "\n")
      else:
        aux_files[name] = f"aux_{name}.npy"
        _save_npy(tf.io.gfile.join(tmp_dir, aux_files[name]), val)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": str(dataset),
        "classes": classes,
        "features": {k: {"dim": v} for k, v in sorted(dims.items())},
        "primary_feature": primary_feature,
        "snippet_frames": snippet_frames,
        "fps": float(fps),
        "text_embeddings": text_path,
        "feature_text_embeddings": feature_text_paths,
        "optional_fields": optional_fields if optional_fields is not None
                           else sorted(seen_fields),
        "splits": split_entries,
        "source": dict(source or {}),
        "aux": aux_files,
    }
    with tf.io.gfile.GFile(tf.io.gfile.join(tmp_dir, MANIFEST), "w") as fh:
      fh.write(json.dumps(manifest, indent=2) + "\n")
    # The same dataset for TFDS (tfds.builder_from_directory): dataset_info.json and
    # features.json, with the extras fields every record carries.
    complete = [k for k in manifest["optional_fields"]
                if all(carried[s][k] == e["num_videos"] for s, e in split_entries.items())]
    tfds_io.write_metadata(tmp_dir, manifest, complete)
    if tf.io.gfile.exists(out_dir):
      old_dir = f"{parent}/.{base}.old-{uuid.uuid4().hex[:8]}"
      tf.io.gfile.rename(out_dir, old_dir)
    tf.io.gfile.rename(tmp_dir, out_dir)
  except (tf.errors.OpError, OSError) as e:
    _rmtree_quiet(tmp_dir)
    raise WstalError(f"cannot write dataset {out_dir}: {e}") from e
  except BaseException:
    _rmtree_quiet(tmp_dir)
    raise
  if old_dir is not None:
    _rmtree_quiet(old_dir)
  logging.info("wrote dataset %s to %s", dataset, out_dir)
  return manifest


def _rmtree_quiet(path):
  try:
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)
  except (tf.errors.OpError, OSError):
    logging.warning("could not remove %s", path)



def copy_with_extras(data_dir: str, out: str, extras: Mapping[str, Mapping[str, bytes]], *,
                     source: Mapping[str, Any] | None = None,
                     aux: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
  """Writes `out`: a copy of the dataset at `data_dir` (features, annotations, text
  embeddings, artefacts, shard counts) with per-video extras fields added ({video name:
  {field: bytes}}; videos not named keep theirs), `source` entries added to the manifest's
  source and `aux` artefacts added. Atomic like write_dataset; returns the new manifest."""
  manifest = read_manifest(data_dir)
  fields = {f for per_video in extras.values() for f in per_video}

  def records(split):
    for rec in read_videos(data_dir, split):
      if rec.name in extras:
        rec.extras = dict(rec.extras, **extras[rec.name])
      yield rec

  old_aux = {name: load_aux(data_dir, name, manifest) for name in manifest["aux"]}
  per_feature = {f: load_text_embeddings(data_dir, manifest, feature=f)
                 for f in manifest["feature_text_embeddings"]}
  return write_dataset(
      out, dataset=manifest["dataset"], classes=manifest["classes"],
      feature_dims={k: v["dim"] for k, v in manifest["features"].items()},
      splits={s: records(s) for s in manifest["splits"]},
      num_shards={s: len(e["shards"]) for s, e in manifest["splits"].items()},
      text_embeddings=load_text_embeddings(data_dir, manifest),
      primary_feature=manifest["primary_feature"], snippet_frames=manifest["snippet_frames"],
      fps=manifest["fps"], feature_text_embeddings=per_feature,
      source=dict(manifest["source"], **(source or {})),
      optional_fields=sorted(set(manifest["optional_fields"]) | fields),
      aux=dict(old_aux, **(aux or {})), overwrite=overwrite)
