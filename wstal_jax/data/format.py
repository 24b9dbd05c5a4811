"""The dataset directory: manifest.json + TFRecord shards of one tf.train.Example per video.

Layout and schema are fixed in docs/ARCHITECTURE.md ("Dataset directory"). This module and its
writer half, `writer.py`, are the only places that know them: here the records
(`VideoRecord`, `VideoInfo`), the manifest reader, the numpy readers (`read_videos`,
`read_video_info`) and the TF parse function the input pipeline maps over serialized records
(`tf_parse_fn`); in writer.py `write_dataset` (used by the converters and the synthetic
generator) and `copy_with_extras`, which stay reachable as `format.write_dataset` /
`format.copy_with_extras`.

Shard assignment: video i of a split (manifest order) goes to shard i % n. The writer can then
stream videos without knowing how many there are, and reading the shards round-robin gives
manifest order back. Every record also carries its `index`, which readers check.

All file access goes through tf.io.gfile so gs:// paths work.
"""
import dataclasses
import hashlib
import io
import json
import re
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf

from wstal_jax.errors import WstalError

try:  # JAX owns the accelerators; TF only reads files.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF runtime already initialised elsewhere: nothing left to do.
  pass

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXT_EMBEDDINGS = "text_embeddings.npy"
SPLITS = ("train", "test")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SHA_CHUNK = 8 << 20


def shard_name(split: str, i: int, n: int) -> str:
  """`<split>-<i:05d>-of-<n:05d>.tfrecord`."""
  return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


@dataclasses.dataclass
class VideoRecord:
  """One video with all its features and annotations (what the writer takes, read_videos gives).

  features: name -> float32 [T, dim]; label: float32 [C] multi-hot; segments: float32 [N, 2]
  seconds; segment_labels: int32 [N]; ambiguous: float32 [M, 2] seconds; extras: field -> bytes.
  `source` names the file(s) the video came from; it only appears in error messages.
  """
  name: str
  duration: float
  features: dict[str, np.ndarray]
  label: np.ndarray
  segments: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0, 2), np.float32))
  segment_labels: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  ambiguous: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0, 2), np.float32))
  extras: dict[str, bytes] = dataclasses.field(default_factory=dict)
  source: str = ""

  @property
  def num_snippets(self) -> int:
    """T of the primary feature (all features of a valid record share T)."""
    if not self.features:
      raise WstalError(f"video {self.name!r} ({self.source or 'no source'}) has no features")
    feat = self.features.get("i3d", next(iter(self.features.values())))
    return int(np.shape(feat)[0])


@dataclasses.dataclass
class VideoInfo:
  """A video without features: what evaluation needs.

  label: float32 [C]; segments: float32 [N, 2] s; segment_labels: int32 [N];
  ambiguous: float32 [M, 2] s; extras: field -> bytes (fields listed in optional_fields).
  """
  index: int
  name: str
  duration: float
  num_snippets: int
  label: np.ndarray
  segments: np.ndarray
  segment_labels: np.ndarray
  ambiguous: np.ndarray
  extras: dict[str, bytes] = dataclasses.field(default_factory=dict)


def seconds_per_snippet(manifest: Mapping[str, Any]) -> float:
  """snippet_frames / fps (16 / 25 = 0.64 s for THUMOS14)."""
  return float(manifest["snippet_frames"]) / float(manifest["fps"])


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as fh:
    while True:
      chunk = fh.read(_SHA_CHUNK)
      if not chunk:
        break
      h.update(chunk)
  return h.hexdigest()


# ----------------------------------------------------------------------------------- reading


def _require(cond, path, what):
  if not cond:
    raise WstalError(f"{path}: {what}")


def read_json(path: str):
  """The parsed JSON file; WstalError naming the file when it cannot be read or parsed."""
  try:
    with tf.io.gfile.GFile(path, "r") as fh:
      return json.loads(fh.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WstalError(f"{path}: not valid JSON ({e})") from None
  except (tf.errors.OpError, OSError) as e:
    raise WstalError(f"{path}: cannot read ({e})") from None


def read_manifest(data_dir: str) -> dict:
  """Reads and validates DIR/manifest.json (schema, version, listed shards present and sized).

  Raises WstalError naming the manifest when it is missing, unparsable, of another
  format_version, inconsistent with itself, or does not match the shard files on disk.
  """
  data_dir = str(data_dir).rstrip("/")
  path = tf.io.gfile.join(data_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise WstalError(f"{path}: not found ({data_dir} is not a wstal_jax dataset directory; "
                     "create one with python -m wstal_jax.data.convert or "
                     "python -m wstal_jax.data.synthetic)")
  m = read_json(path)
  _require(isinstance(m, dict), path, "top level must be a JSON object")
  _require(m.get("format_version") == FORMAT_VERSION, path,
           f"format_version {m.get('format_version')!r} is not supported (expected "
           f"{FORMAT_VERSION})")
  for key in ("dataset", "classes", "features", "primary_feature", "snippet_frames", "fps",
              "splits"):
    _require(key in m, path, f"missing key {key!r}")
  classes = m["classes"]
  _require(isinstance(classes, list) and classes and all(
      isinstance(c, str) and c for c in classes), path, "classes must be a non-empty list of "
           "names")
  _require(len(set(classes)) == len(classes), path, "duplicate class names")
  feats = m["features"]
  _require(isinstance(feats, dict) and feats, path, "features must be a non-empty object")
  for name, spec in feats.items():
    _require(_NAME_RE.match(name) is not None, path, f"bad feature name {name!r}")
    _require(isinstance(spec, dict) and isinstance(spec.get("dim"), int) and spec["dim"] > 0,
             path, f"feature {name!r} needs a positive integer dim")
  _require(m["primary_feature"] in feats, path,
           f"primary_feature {m['primary_feature']!r} not in features")
  for key in ("snippet_frames", "fps"):
    _require(isinstance(m[key], (int, float)) and m[key] > 0, path, f"{key} must be > 0")
  m.setdefault("text_embeddings", None)
  m.setdefault("feature_text_embeddings", {})
  m.setdefault("optional_fields", [])
  m.setdefault("source", {})
  m.setdefault("aux", {})
  _require(isinstance(m["aux"], dict), path, "aux must be an object")
  for name, fname in m["aux"].items():
    _require(isinstance(fname, str) and "/" not in fname, path,
             f"aux[{name!r}] must be a file name")
    _require(tf.io.gfile.exists(tf.io.gfile.join(data_dir, fname)), path,
             f"aux file {fname} ({name!r}) is missing")
  _require(isinstance(m["optional_fields"], list), path, "optional_fields must be a list")
  if m["text_embeddings"] is not None:
    _require(isinstance(m["text_embeddings"], str), path, "text_embeddings must be a file name")
    _require(tf.io.gfile.exists(tf.io.gfile.join(data_dir, m["text_embeddings"])), path,
             f"text_embeddings file {m['text_embeddings']} is missing")
  per_feature = m["feature_text_embeddings"]
  _require(isinstance(per_feature, dict), path, "feature_text_embeddings must be an object")
  for name, fname in per_feature.items():
    _require(name in feats, path, f"feature_text_embeddings: {name!r} is not a feature")
    _require(isinstance(fname, str) and "/" not in fname, path,
             f"feature_text_embeddings[{name!r}] must be a file name")
    _require(tf.io.gfile.exists(tf.io.gfile.join(data_dir, fname)), path,
             f"text embeddings file {fname} (feature {name!r}) is missing")
  splits = m["splits"]
  _require(isinstance(splits, dict) and splits, path, "splits must be a non-empty object")
  for split, entry in splits.items():
    where = f"split {split!r}"
    _require(split in SPLITS, path, f"unknown {where}")
    _require(isinstance(entry, dict), path, f"{where} must be an object")
    for key in ("num_videos", "num_instances", "shards"):
      _require(key in entry, path, f"{where}: missing key {key!r}")
    shards = entry["shards"]
    _require(isinstance(shards, list) and shards, path, f"{where}: no shards listed")
    n = len(shards)
    total = 0
    for i, sh in enumerate(shards):
      _require(isinstance(sh, dict) and {"file", "num_videos", "sha256"} <= set(sh), path,
               f"{where}: shard {i} needs file, num_videos, sha256")
      _require(sh["file"] == shard_name(split, i, n), path,
               f"{where}: shard {i} is named {sh['file']!r}, expected {shard_name(split, i, n)!r}")
      _require(isinstance(sh["num_videos"], int) and sh["num_videos"] >= 1, path,
               f"{where}: shard {sh['file']} has num_videos {sh['num_videos']!r}")
      total += sh["num_videos"]
    _require(total == entry["num_videos"], path,
             f"{where}: shards hold {total} videos but num_videos is {entry['num_videos']}")
    # Round-robin assignment fixes how many videos each shard holds.
    expect = [entry["num_videos"] // n + (i < entry["num_videos"] % n) for i in range(n)]
    _require([sh["num_videos"] for sh in shards] == expect, path,
             f"{where}: per-shard video counts {[sh['num_videos'] for sh in shards]} do not "
             f"match round-robin assignment {expect}")
    lengths = entry.get("video_num_snippets")
    if lengths is not None:
      _require(isinstance(lengths, list) and len(lengths) == entry["num_videos"] and all(
          isinstance(t, int) and t > 0 for t in lengths), path,
               f"{where}: video_num_snippets must list num_videos positive integers")
    listed = {sh["file"] for sh in shards}
    try:
      present = {p.rsplit("/", 1)[-1] for p in tf.io.gfile.glob(
          tf.io.gfile.join(data_dir, f"{split}-*-of-*.tfrecord"))}
    except tf.errors.OpError as e:
      raise WstalError(f"{data_dir}: cannot list shards ({e})") from None
    missing = sorted(listed - present)
    _require(not missing, path, f"{where}: shard file(s) missing from {data_dir}: {missing}")
    extra = sorted(present - listed)
    _require(not extra, path, f"{where}: shard file(s) in {data_dir} not listed in the manifest: "
             f"{extra} (manifest does not match its shards)")
    for sh in shards:
      if "num_bytes" in sh:
        size = tf.io.gfile.stat(tf.io.gfile.join(data_dir, sh["file"])).length
        _require(size == sh["num_bytes"], path,
                 f"shard {sh['file']} has {size} bytes, the manifest says {sh['num_bytes']} "
                 "(truncated or replaced; manifest does not match its shards)")
  return m


def _split_entry(manifest, split, data_dir):
  if split not in manifest["splits"]:
    raise WstalError(f"{tf.io.gfile.join(data_dir, MANIFEST)}: no split {split!r} (has "
                     f"{sorted(manifest['splits'])})")
  return manifest["splits"][split]


def shard_paths(data_dir: str, split: str, manifest: dict | None = None) -> list[str]:
  """Full paths of the split's shards, in shard order (video i is in shard i % n)."""
  manifest = manifest or read_manifest(data_dir)
  entry = _split_entry(manifest, split, data_dir)
  return [tf.io.gfile.join(str(data_dir).rstrip("/"), sh["file"]) for sh in entry["shards"]]


def verify_shards(data_dir: str, split: str | None = None, manifest: dict | None = None):
  """Checks every shard's sha256 against the manifest (all splits if split is None)."""
  manifest = manifest or read_manifest(data_dir)
  for s in ([split] if split is not None else sorted(manifest["splits"])):
    entry = _split_entry(manifest, s, data_dir)
    for sh, path in zip(entry["shards"], shard_paths(data_dir, s, manifest)):
      digest = _sha256(path)
      if digest != sh["sha256"]:
        raise WstalError(f"shard {path}: sha256 {digest} does not match the manifest "
                         f"({sh['sha256']}); the file is corrupt or was replaced")


@dataclasses.dataclass(frozen=True)
class Field:
  """One key of the tf.train.Example of a video (the schema of docs/ARCHITECTURE.md).

  kind: 'scalar' (one value), 'vector' (a fixed number of values), 'pairs' (a flat list of
  [start, end] pairs, any count), 'list' (any count), 'raw' (bytes of float32 [T, dim],
  little-endian), 'bytes' (one opaque byte string). dtype: 'string' | 'int64' | 'float32'.
  size: the vector length, or the dim of a 'raw' feature."""
  kind: str
  dtype: str
  size: int = 0


def example_fields(manifest, feature_names=None, annotations=True) -> dict[str, Field]:
  """The schema, defined once: key -> Field. The writer (`writer._example`) writes these
  keys, `tf_parse_fn` parses them, and `tfds_io.features` gives TFDS the same fields.
  feature_names: None for every feature of the manifest."""
  names = sorted(manifest["features"]) if feature_names is None else list(feature_names)
  fields = {"name": Field("scalar", "string"), "index": Field("scalar", "int64"),
            "duration": Field("scalar", "float32"), "num_snippets": Field("scalar", "int64"),
            "label": Field("vector", "int64", len(manifest["classes"]))}
  if annotations:
    fields.update(segments=Field("pairs", "float32"), segment_labels=Field("list", "int64"),
                  ambiguous=Field("pairs", "float32"))
    for key in manifest.get("optional_fields", []):
      fields[f"extra/{key}"] = Field("bytes", "string")
  for name in names:
    fields[f"feature/{name}"] = Field("raw", "float32", int(manifest["features"][name]["dim"]))
  return fields


_TF_DTYPES = {"string": tf.string, "int64": tf.int64, "float32": tf.float32}


def _parse_spec(manifest, feature_names, annotations=True):
  spec = {}
  for key, f in example_fields(manifest, feature_names, annotations).items():
    dtype = _TF_DTYPES[f.dtype]
    if f.kind == "scalar":
      spec[key] = tf.io.FixedLenFeature([], dtype)
    elif f.kind == "vector":
      spec[key] = tf.io.FixedLenFeature([f.size], dtype)
    elif f.kind in ("pairs", "list"):
      spec[key] = tf.io.VarLenFeature(dtype)
    elif f.kind == "bytes":   # optional: a record without it reads as b""
      spec[key] = tf.io.FixedLenFeature([], tf.string, default_value=b"")
    else:   # raw
      spec[key] = tf.io.FixedLenFeature([], tf.string)
  return spec


def _check_feature_names(manifest, feature_names):
  for name in feature_names:
    if name not in manifest["features"]:
      raise WstalError(f"feature {name!r} is not in the dataset (has "
                       f"{sorted(manifest['features'])})")


def tf_parse_fn(manifest: dict, feature_names, annotations: bool = False,
                int_extras=(), float_extras=()):
  """Returns parse(serialized scalar tf.string) -> dict of tensors, for tf.data.map.

  Output: name tf.string []; index int32 []; duration float32 []; num_snippets int32 [];
  label float32 [C]; feature/<name> float32 [T, dim] for each requested feature. With
  annotations=True also segments float32 [N, 2], segment_labels int32 [N], ambiguous
  float32 [M, 2]. With int_extras (names of optional fields holding int32 little-endian raw
  bytes, e.g. the description tokens of `data.descriptions`): extra/<name> int32 [L] (L = 0
  when the record lacks it); float_extras likewise as float32 [L] (the proposals of
  `data.proposals`). A record whose feature bytes do not hold [T, dim] float32 fails at run time
  with tf.errors.InvalidArgumentError (callers turn it into a WstalError).
  """
  feature_names = list(feature_names)
  _check_feature_names(manifest, feature_names)
  spec = _parse_spec(manifest, feature_names, annotations)
  for key in (*int_extras, *float_extras):
    if key not in manifest.get("optional_fields", []):
      raise WstalError(f"the dataset has no {key!r} field (its optional fields: "
                       f"{manifest.get('optional_fields', [])})")
    spec[f"extra/{key}"] = tf.io.FixedLenFeature([], tf.string, default_value=b"")
  dims = {n: manifest["features"][n]["dim"] for n in feature_names}

  def parse(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    num_t = tf.cast(ex["num_snippets"], tf.int32)
    out = {
        "name": ex["name"],
        "index": tf.cast(ex["index"], tf.int32),
        "duration": ex["duration"],
        "num_snippets": num_t,
        "label": tf.cast(ex["label"], tf.float32),
    }
    for name, dim in dims.items():
      raw = tf.io.decode_raw(ex[f"feature/{name}"], tf.float32, little_endian=True)
      out[f"feature/{name}"] = tf.reshape(raw, [num_t, dim])
    if annotations:
      out["segments"] = tf.reshape(tf.sparse.to_dense(ex["segments"]), [-1, 2])
      out["segment_labels"] = tf.cast(tf.sparse.to_dense(ex["segment_labels"]), tf.int32)
      out["ambiguous"] = tf.reshape(tf.sparse.to_dense(ex["ambiguous"]), [-1, 2])
    for key in int_extras:
      out[f"extra/{key}"] = tf.io.decode_raw(ex[f"extra/{key}"], tf.int32, little_endian=True)
    for key in float_extras:
      out[f"extra/{key}"] = tf.io.decode_raw(ex[f"extra/{key}"], tf.float32,
                                             little_endian=True)
    return out

  return parse


def _ordered_records(paths):
  """Serialized records of a split in manifest order: shards read round-robin."""
  files = tf.data.Dataset.from_tensor_slices(paths)
  return files.interleave(tf.data.TFRecordDataset, cycle_length=len(paths), block_length=1)


def read_error(data_dir, split, e: tf.errors.OpError) -> WstalError:
  """The one message for a record that tf.data cannot read."""
  message = getattr(e, "message", str(e)).strip()
  return WstalError(f"{data_dir}: split {split!r}: cannot read a record ({message}); a shard is "
                    "truncated or corrupt, or the manifest does not match its shards (run "
                    "wstal_jax.data.format.verify_shards to find which)")


def iterate(iterator, data_dir, split):
  """Yields from a tf.data iterator, turning TF read errors into one WstalError (read_error)."""
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise read_error(data_dir, split, e) from None
    yield item


def _iter_parsed(data_dir, split, feature_names, manifest, batch=64):
  """Yields numpy dicts (one per video, manifest order) with annotations and raw features."""
  entry = _split_entry(manifest, split, data_dir)
  paths = shard_paths(data_dir, split, manifest)
  spec = _parse_spec(manifest, feature_names, annotations=True)
  ds = _ordered_records(paths).batch(batch)
  ds = ds.map(lambda s: tf.io.parse_example(s, spec))
  count = 0
  for ex in iterate(iter(ds), data_dir, split):
    segs = tf.sparse.to_dense(ex["segments"]).numpy()
    seg_n = tf.sparse.to_dense(ex["segment_labels"], default_value=-1).numpy()
    amb = tf.sparse.to_dense(ex["ambiguous"]).numpy()
    seg_len = _row_lengths(ex["segment_labels"])
    seg_f_len = _row_lengths(ex["segments"])
    amb_len = _row_lengths(ex["ambiguous"])
    for b in range(len(ex["index"])):
      index = int(ex["index"][b])
      name = ex["name"][b].numpy().decode("utf-8")
      if index != count:
        raise WstalError(f"{data_dir}: split {split!r}: record {count} is video {name!r} with "
                         f"index {index} (manifest does not match its shards)")
      count += 1
      n_seg = int(seg_len[b])
      if seg_f_len[b] != 2 * n_seg or amb_len[b] % 2:
        raise WstalError(f"{data_dir}: split {split!r}: video {name!r} has malformed segments")
      out = {
          "index": index, "name": name, "duration": float(ex["duration"][b]),
          "num_snippets": int(ex["num_snippets"][b]),
          "label": ex["label"][b].numpy().astype(np.float32),
          "segments": segs[b, :2 * n_seg].reshape(-1, 2).astype(np.float32),
          "segment_labels": seg_n[b, :n_seg].astype(np.int32),
          "ambiguous": amb[b, :amb_len[b]].reshape(-1, 2).astype(np.float32),
          "extras": {k: ex[f"extra/{k}"][b].numpy() for k in manifest.get("optional_fields", [])
                     if ex[f"extra/{k}"][b].numpy()},
      }
      for fname in feature_names:
        out[f"feature/{fname}"] = ex[f"feature/{fname}"][b].numpy()
      yield out
  if count != entry["num_videos"]:
    raise WstalError(f"{data_dir}: split {split!r} has {count} videos in its shards, the "
                     f"manifest says {entry['num_videos']} (manifest does not match its shards)")


def _row_lengths(sp):
  """Number of stored values per row of a 2-D tf.SparseTensor -> int64 numpy [B]."""
  rows = sp.indices[:, 0].numpy()
  return np.bincount(rows, minlength=int(sp.dense_shape[0])).astype(np.int64)


def read_videos(data_dir: str, split: str, features=None) -> Iterator[VideoRecord]:
  """Yields the split's videos in manifest order with the requested features (None = all).

  Features are float32 [T, dim] numpy arrays. Raises WstalError on truncated/corrupt shards,
  records whose features do not hold [T, dim] float32, and shards that do not match the
  manifest.
  """
  manifest = read_manifest(data_dir)
  names = sorted(manifest["features"]) if features is None else list(features)
  if not names:
    raise WstalError("read_videos needs at least one feature (use read_video_info for none)")
  _check_feature_names(manifest, names)
  for ex in _iter_parsed(data_dir, split, names, manifest):
    feats = {}
    for fname in names:
      raw = ex[f"feature/{fname}"]
      dim = manifest["features"][fname]["dim"]
      num_t = ex["num_snippets"]
      if len(raw) != 4 * num_t * dim:
        raise WstalError(f"{data_dir}: split {split!r}: video {ex['name']!r} feature {fname!r} "
                         f"has {len(raw)} bytes, expected T={num_t} x dim={dim} float32 "
                         "(corrupt record)")
      feats[fname] = np.frombuffer(raw, dtype="<f4").reshape(num_t, dim).astype(np.float32)
    yield VideoRecord(name=ex["name"], duration=ex["duration"], features=feats,
                      label=ex["label"], segments=ex["segments"],
                      segment_labels=ex["segment_labels"], ambiguous=ex["ambiguous"],
                      extras=ex["extras"], source=f"{data_dir} ({split} #{ex['index']})")


def read_video_info(data_dir: str, split: str) -> list[VideoInfo]:
  """All videos of the split without features; list position == VideoInfo.index."""
  manifest = read_manifest(data_dir)
  return [VideoInfo(index=ex["index"], name=ex["name"], duration=ex["duration"],
                    num_snippets=ex["num_snippets"], label=ex["label"], segments=ex["segments"],
                    segment_labels=ex["segment_labels"], ambiguous=ex["ambiguous"],
                    extras=ex["extras"])
          for ex in _iter_parsed(data_dir, split, [], manifest)]


def load_text_embeddings(data_dir: str, manifest: dict | None = None,
                         feature: str | None = None) -> np.ndarray | None:
  """float32 [C, E] class text embeddings, or None when the dataset has none.

  With `feature`, the text embeddings in that feature stream's space
  (manifest feature_text_embeddings) when the dataset has them, else text_embeddings.npy.
  """
  manifest = manifest or read_manifest(data_dir)
  fname = (manifest.get("feature_text_embeddings") or {}).get(feature) if feature else None
  fname = fname or manifest.get("text_embeddings")
  if not fname:
    return None
  path = tf.io.gfile.join(str(data_dir).rstrip("/"), fname)
  try:
    with tf.io.gfile.GFile(path, "rb") as fh:
      arr = np.load(io.BytesIO(fh.read()), allow_pickle=False)
  except (ValueError, OSError, EOFError, tf.errors.OpError) as e:
    raise WstalError(f"{path}: cannot read text embeddings ({e})") from None
  num_c = len(manifest["classes"])
  if arr.ndim != 2 or arr.shape[0] != num_c:
    raise WstalError(f"{path}: text embeddings must be [C={num_c}, E], got {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise WstalError(f"{path}: text embeddings contain NaN/Inf")
  return arr.astype(np.float32)


def load_aux(data_dir: str, name: str, manifest: dict | None = None):
  """The dataset-level artefact `name` written by write_dataset(aux=...): a dict (JSON) or a
  numpy array; None when the dataset has none."""
  manifest = manifest or read_manifest(data_dir)
  fname = manifest.get("aux", {}).get(name)
  if fname is None:
    return None
  path = tf.io.gfile.join(str(data_dir).rstrip("/"), fname)
  try:
    with tf.io.gfile.GFile(path, "rb") as fh:
      raw = fh.read()
    if fname.endswith(".json"):
      return json.loads(raw)
    return np.load(io.BytesIO(raw), allow_pickle=False)
  except (tf.errors.OpError, OSError, ValueError) as e:
    raise WstalError(f"{path}: cannot read dataset artefact {name!r} ({e})") from None


def __getattr__(name):
  """`format.write_dataset` and `format.copy_with_extras` live in writer.py (which imports
  this module, hence the lazy look-up)."""
  if name in ("write_dataset", "copy_with_extras"):
    from wstal_jax.data import writer
    return getattr(writer, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
