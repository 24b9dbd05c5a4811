"""Convert community WS-TAL feature releases into a wstal_jax dataset directory (CLI).

W-TALC / CO2-Net format (THUMOS14, ActivityNet1.2):
  python -m wstal_jax.data.convert --format=wtalc \
      --features=Thumos14reduced-I3D-JOINTFeatures.npy \
      --annotations=Thumos14reduced-Annotations --out=data/thumos14
BaS-Net / UM format (THUMOS14):
  python -m wstal_jax.data.convert --format=basnet --features=features \
      --annotations=gt.json --splits=. --out=data/thumos14_basnet
Either may add `--vlm_features=DIR [--vlm_name=videoclip] --text_embeddings=FILE.npy`.

Choices about the known defects of the annotation files (each is logged with its count):
  * GT past the video end (THUMOS14: video_test_0000270 has GT up to 713.7 s in a 176 s video;
    4 train and 26 test instances start at or after their video's end) is kept as distributed
    by default and logged: the evaluators behind the published CO2-Net-family numbers count
    these unreachable instances as misses, so keeping them keeps our mAP comparable and the
    official counts (THUMOS14 3,007 / 3,358 instances). --clip_gt=true clips GT to
    [0, duration] and drops instances that start at or after the end (3,003 / 3,332).
  * Instances that are shorter than a snippet (THUMOS14: 17 test instances become zero-length
    when rounded to snippets) are kept: they are positive in seconds and the evaluator computes
    tIoU in seconds. Instances with end == start in seconds (ActivityNet1.2: 10, 3 of them in
    eval) are kept too so instance counts match the official protocol; only end < start (none
    in the released files) is dropped.
  * W-TALC's labels_all.npy (the video label W-TALC / CO2-Net train with) disagrees with the
    per-instance labels on 30 THUMOS14 videos; --video_label picks which one becomes `label`.
  * Ambiguous_test.txt names video_test_0001292, which is not among the 412 videos: skipped.
  * VLM features whose T differs from the I3D T are linearly interpolated to the I3D T (with a
    warning) unless --vlm_resample=false; a ratio beyond 2x, or T = 0, is an error either way.
"""
import argparse
import json
import os
import sys

from absl import logging
import numpy as np
import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError, cli_main

# The primary stream's width is the first video's (every other video must match it): I3D
# RGB || flow is 2048 (1024 each), an RGB-only I3D release 1024, VideoMAE 768, TSP 512 ...
PRIMARY_NAME = "i3d"
WTALC_SUBSETS = {  # subset value -> our split, per dataset family
    "thumos": {"validation": "train", "test": "test"},
    "activitynet": {"training": "train", "validation": "test"},
}
_MAX_VLM_RATIO = 2.0


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _exists(path):
  return tf.io.gfile.exists(path)


def _load_npy(path, what, allow_pickle=True):
  """np.load through gfile; any failure is a WstalError naming the file."""
  if not _exists(path):
    raise WstalError(f"{path}: {what} not found")
  try:
    with tf.io.gfile.GFile(path, "rb") as fh:  # streamed: the W-TALC array can be GBs
      return np.load(fh, allow_pickle=allow_pickle, encoding="bytes")
  except Exception as e:  # truncated / not .npy / bad pickle: numpy raises many types
    raise WstalError(f"{path}: cannot read {what} ({type(e).__name__}: {e}); the file is "
                     "truncated or not a .npy file") from None


def _read_text(path, what):
  if not _exists(path):
    raise WstalError(f"{path}: {what} not found")
  try:
    with tf.io.gfile.GFile(path, "r") as fh:
      return fh.read()
  except (tf.errors.OpError, UnicodeDecodeError) as e:
    raise WstalError(f"{path}: cannot read {what} ({e})") from None


class _Video:
  """One annotated video before features are attached."""

  def __init__(self, name, split, duration, labels, segments, segment_names, where):
    self.name, self.split, self.duration = name, split, duration
    self.labels = labels                    # video-level class names
    self.segments = segments                # float64 [N, 2] seconds
    self.segment_names = segment_names      # N class names
    self.where = where                      # annotation file(s), for error messages
    self.ambiguous = np.zeros((0, 2))


# ------------------------------------------------------------------------------ annotations


def load_wtalc_annotations(ann_dir: str, video_label: str = "labels_all"):
  """W-TALC annotation folder -> (classes, [_Video] in file order, dataset family).

  Subset values map to splits per family: THUMOS14 validation -> train, test -> test;
  ActivityNet1.2 training -> train, validation -> test.
  """
  def load(name):
    return _load_npy(tf.io.gfile.join(ann_dir, f"{name}.npy"), "W-TALC annotation file")

  if not tf.io.gfile.isdir(ann_dir):
    raise WstalError(f"{ann_dir}: annotation folder not found")
  classes = [_str(c) for c in load("classlist").reshape(-1)]
  names = [_str(v) for v in load("videoname").reshape(-1)]
  subsets = [_str(s) for s in load("subset").reshape(-1)]
  durations = np.asarray(load("duration"), dtype=np.float64).reshape(-1)
  labels = load("labels")
  labels_all = load("labels_all")
  segments = load("segments")
  num = len(names)
  for fname, arr in (("subset", subsets), ("duration", durations), ("labels", labels),
                     ("labels_all", labels_all), ("segments", segments)):
    if len(arr) != num:
      raise WstalError(f"{tf.io.gfile.join(ann_dir, fname + '.npy')}: {len(arr)} entries, "
                       f"videoname.npy has {num}")
  values = set(subsets)
  family = next((f for f, m in WTALC_SUBSETS.items() if values <= set(m)), None)
  if family is None:
    raise WstalError(f"{tf.io.gfile.join(ann_dir, 'subset.npy')}: subset values {sorted(values)}"
                     " match neither THUMOS14 (validation/test) nor ActivityNet1.2 "
                     "(training/validation)")
  to_split = WTALC_SUBSETS[family]
  where = f"{ann_dir}/segments.npy+labels.npy"
  videos = []
  for i, name in enumerate(names):
    try:
      seg = np.asarray(list(segments[i]), np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as e:
      raise WstalError(f"{where}: video {name}: malformed segments ({e})") from None
    seg_names = [_str(x) for x in labels[i]]
    if len(seg_names) != len(seg):
      raise WstalError(f"{where}: video {name}: {len(seg)} segments but {len(seg_names)} labels")
    if video_label == "labels_all":
      vid_labels = sorted({_str(x) for x in labels_all[i]})
    elif video_label == "instances":
      vid_labels = sorted(set(seg_names))
    else:
      raise WstalError(f"--video_label must be labels_all or instances, got {video_label!r}")
    if not np.isfinite(durations[i]) or durations[i] <= 0:
      raise WstalError(f"{tf.io.gfile.join(ann_dir, 'duration.npy')}: video {name} has duration "
                       f"{durations[i]}")
    videos.append(_Video(name, to_split[subsets[i]], float(durations[i]), vid_labels, seg,
                         seg_names, where))
  mismatch = sum(set(v.labels) != set(v.segment_names) for v in videos)
  if mismatch:
    logging.warning("%s: the video label (%s) differs from the set of instance labels on %d "
                    "videos", ann_dir, video_label, mismatch)
  return classes, videos, family


def load_ambiguous(path: str, videos):
  """Attaches `video start end` lines (whitespace-separated) to the videos; unknown skipped."""
  by_name = {v.name: v for v in videos}
  rows, unknown = {}, set()
  for lineno, line in enumerate(_read_text(path, "ambiguous segments file").splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    try:
      name, start, end = parts[0], float(parts[1]), float(parts[2])
      if len(parts) != 3:
        raise ValueError
    except (ValueError, IndexError):
      raise WstalError(f"{path}:{lineno}: expected 'video start end', got {line!r}") from None
    if name not in by_name:
      unknown.add(name)
      continue
    rows.setdefault(name, []).append((min(start, end), max(start, end)))
  if unknown:
    logging.warning("%s: %d video(s) not among the annotated videos, their ambiguous segments "
                    "are skipped: %s", path, len(unknown), sorted(unknown))
  for name, r in rows.items():
    by_name[name].ambiguous = np.asarray(r, np.float64)


def load_basnet_annotations(gt_path: str, splits_dir: str, classes=None):
  """BaS-Net gt.json + split_{train,test}.txt -> (classes, [_Video]) in split-file order.

  Videos of gt.json missing from the split files are skipped (THUMOS14: test videos 270, 1292,
  1496); durations are filled in later (from --durations or the feature length).
  """
  try:
    gt = json.loads(_read_text(gt_path, "BaS-Net ground truth"))
    database = gt["database"]
    if not isinstance(database, dict):
      raise TypeError("database is not an object")
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise WstalError(f"{gt_path}: not a BaS-Net gt.json ({type(e).__name__}: {e})") from None
  found = set()
  for vid in database.values():
    for ann in vid.get("annotations", []):
      found.add(str(ann.get("label")))
  classes = list(classes) if classes is not None else sorted(found)
  videos = []
  for split in ("train", "test"):
    split_path = tf.io.gfile.join(splits_dir, f"split_{split}.txt")
    for name in _read_text(split_path, "split file").split():
      if name not in database:
        raise WstalError(f"{split_path}: video {name} is not in {gt_path}")
      entry = database[name]
      try:
        seg = np.asarray([[float(a["segment"][0]), float(a["segment"][1])]
                          for a in entry.get("annotations", [])], np.float64).reshape(-1, 2)
        seg_names = [str(a["label"]) for a in entry.get("annotations", [])]
      except (KeyError, TypeError, ValueError, IndexError) as e:
        raise WstalError(f"{gt_path}: video {name}: malformed annotation ({e})") from None
      if entry.get("subset", split) != split:
        logging.warning("%s: video %s has subset %r but is listed in %s", gt_path, name,
                        entry.get("subset"), split_path)
      videos.append(_Video(name, split, None, sorted(set(seg_names)), seg, seg_names, gt_path))
  listed = {v.name for v in videos}
  skipped = sorted(set(database) - listed)
  if skipped:
    logging.warning("%s: %d video(s) are in no split file and are skipped: %s", gt_path,
                    len(skipped), skipped)
  return classes, videos


def load_class_list(path: str):
  """Class names from a text file (one per line) or a W-TALC classlist.npy."""
  if path.endswith(".npy"):
    return [_str(c) for c in _load_npy(path, "class list").reshape(-1)]
  return [line.strip() for line in _read_text(path, "class list").splitlines() if line.strip()]


def load_durations(path: str):
  """{video: seconds} from a JSON object or a W-TALC annotation folder."""
  if tf.io.gfile.isdir(path):
    names = _load_npy(tf.io.gfile.join(path, "videoname.npy"), "W-TALC annotation file")
    durs = _load_npy(tf.io.gfile.join(path, "duration.npy"), "W-TALC annotation file")
    return {_str(n): float(d) for n, d in zip(names.reshape(-1), np.reshape(durs, -1))}
  try:
    out = json.loads(_read_text(path, "durations file"))
    return {str(k): float(v) for k, v in out.items()}
  except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
    raise WstalError(f"{path}: expected a JSON object {{video: seconds}} ({e})") from None


def fix_segments(videos, clip_gt: bool):
  """Clips GT to [0, duration] and drops what starts at/after the end (when clip_gt).

  Instances with end == start in seconds are kept (the evaluator scores them; dropping them
  would change the official instance counts, e.g. ActivityNet1.2 eval has 3 of them); only
  end < start is dropped as malformed. Returns a dict of defect counts (also logged).
  """
  counts = {"clipped": 0, "dropped_past_end": 0, "zero_length": 0, "dropped_reversed": 0}
  past_end = {}
  for v in videos:
    seg, names = v.segments, list(v.segment_names)
    if not len(seg):
      continue
    keep = seg[:, 1] >= seg[:, 0]
    counts["dropped_reversed"] += int((~keep).sum())
    counts["zero_length"] += int((seg[:, 1] == seg[:, 0]).sum())
    beyond = (seg[:, 1] > v.duration) & keep
    if beyond.any():
      counts["past_end"] = counts.get("past_end", 0) + int(beyond.sum())
    if clip_gt:
      late = (seg[:, 0] >= v.duration) & keep
      if late.any():
        past_end[v.name] = int(late.sum())
      keep &= ~late
      clipped = np.clip(seg, 0.0, v.duration)
      counts["clipped"] += int((np.any(clipped != seg, axis=1) & keep).sum())
      seg = clipped
    v.segments = seg[keep]
    v.segment_names = [n for n, k in zip(names, keep) if k]
  counts["dropped_past_end"] = sum(past_end.values())
  if counts["dropped_past_end"]:
    logging.warning("dropped %d GT instances that start at or after the video end: %s",
                    counts["dropped_past_end"], past_end)
  if counts["clipped"]:
    logging.warning("clipped %d GT instances to [0, duration]", counts["clipped"])
  if counts.get("past_end") and not clip_gt:
    logging.warning("kept %d GT instances that end after their video ends, as distributed "
                    "(the published evaluators count the unreachable part as misses); "
                    "--clip_gt=true clips them", counts["past_end"])
  if counts["zero_length"]:
    logging.warning("kept %d GT instances of zero length (end == start)", counts["zero_length"])
  if counts["dropped_reversed"]:
    logging.warning("dropped %d GT instances with end < start", counts["dropped_reversed"])
  return counts


# --------------------------------------------------------------------------------- features


def resample_linear(feat_TxD: np.ndarray, num_t: int) -> np.ndarray:
  """Linear interpolation along time to num_t snippets, snippet centres aligned."""
  src_t = feat_TxD.shape[0]
  if src_t == num_t:
    return feat_TxD
  x_T = np.clip((np.arange(num_t) + 0.5) * src_t / num_t - 0.5, 0, src_t - 1)
  lo_T = np.floor(x_T).astype(np.int64)
  hi_T = np.minimum(lo_T + 1, src_t - 1)
  w_T1 = (x_T - lo_T)[:, None].astype(np.float32)
  return (feat_TxD[lo_T] * (1 - w_T1) + feat_TxD[hi_T] * w_T1).astype(np.float32)


class _VlmSource:
  """Per-video VLM features from DIR/<vid>.npy (or DIR/{train,test}/<vid>.npy)."""

  def __init__(self, vlm_dir, resample):
    if not tf.io.gfile.isdir(vlm_dir):
      raise WstalError(f"{vlm_dir}: VLM feature folder not found")
    self.dir, self.resample, self.dim, self.num_resampled = vlm_dir, resample, None, 0

  def path(self, video):
    cands = [tf.io.gfile.join(self.dir, f"{video.name}.npy")] + [
        tf.io.gfile.join(self.dir, s, f"{video.name}.npy")
        for s in (video.split, "train", "test")]
    for c in cands:
      if _exists(c):
        return c
    raise WstalError(f"{cands[0]}: VLM features for video {video.name} not found (also looked "
                     f"in {self.dir}/{{train,test}}/)")

  def load(self, video, num_t):
    path = self.path(video)
    feat = np.asarray(_load_npy(path, "VLM features", allow_pickle=False))
    if feat.ndim != 2 or feat.shape[0] == 0 or feat.shape[1] == 0:
      raise WstalError(f"{path}: VLM features must be [T > 0, E], got shape {feat.shape}")
    if self.dim is None:
      self.dim = feat.shape[1]
    elif feat.shape[1] != self.dim:
      raise WstalError(f"{path}: VLM feature dim {feat.shape[1]}, other videos have {self.dim}")
    if not np.issubdtype(feat.dtype, np.floating):
      raise WstalError(f"{path}: VLM features have dtype {feat.dtype}, expected float")
    src_t = feat.shape[0]
    if src_t != num_t:
      ratio = max(src_t, num_t) / min(src_t, num_t)
      if not self.resample or ratio > _MAX_VLM_RATIO:
        raise WstalError(f"{path}: VLM features have T={src_t} but the I3D features have "
                         f"T={num_t}" + ("" if self.resample else " (--vlm_resample=false)")
                         + (f"; ratio {ratio:.2f} > {_MAX_VLM_RATIO}" if self.resample else ""))
      if self.num_resampled < 5:
        logging.warning("%s: VLM T=%d resampled to the I3D T=%d", path, src_t, num_t)
      self.num_resampled += 1
      feat = resample_linear(feat.astype(np.float32), num_t)
    return feat.astype(np.float32), path


def _peek_dim(vlm, videos, features_fn):
  """Loads the first video's VLM features to learn E (needed up front for the manifest)."""
  feat, _ = vlm.load(videos[0], features_fn(videos[0]).shape[0])
  return feat.shape[1]


def _records(videos, split, classes, features_fn, source_fn, vlm, vlm_name, primary_name):
  class_id = {c: i for i, c in enumerate(classes)}
  for v in videos:
    if v.split != split:
      continue
    label = np.zeros(len(classes), np.float32)
    label[[class_id[c] for c in v.labels]] = 1
    feat = features_fn(v)
    feats = {primary_name: feat}
    source = source_fn(v)
    if vlm is not None:
      feats[vlm_name], vlm_path = vlm.load(v, feat.shape[0] if feat.ndim == 2 else -1)
      source += f"; {vlm_path}"
    yield fmt.VideoRecord(
        name=v.name, duration=v.duration, features=feats, label=label,
        segments=v.segments.astype(np.float32),
        segment_labels=np.asarray([class_id[c] for c in v.segment_names], np.int32),
        ambiguous=v.ambiguous.astype(np.float32), source=source)


def _npy_shape(path):
  """Shape from a .npy header without reading the array."""
  if not _exists(path):
    raise WstalError(f"{path}: features not found")
  try:
    with tf.io.gfile.GFile(path, "rb") as fh:
      version = np.lib.format.read_magic(fh)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, _, _ = read(fh)
  except Exception as e:  # numpy raises ValueError / EOFError / ... on a bad header
    raise WstalError(f"{path}: cannot read .npy header ({type(e).__name__}: {e})") from None
  return shape


def _check_2d(feat, path, what):
  feat = np.asarray(feat)
  if feat.dtype == object or feat.ndim != 2:
    raise WstalError(f"{path}: {what} must be a float array [T, dim], got "
                     f"{feat.dtype} {feat.shape}")
  return feat


def _load_text(path, num_classes):
  if path is None:
    return None
  arr = np.asarray(_load_npy(path, "text embeddings", allow_pickle=False))
  if arr.ndim != 2 or arr.shape[0] != num_classes or arr.shape[1] == 0:
    raise WstalError(f"{path}: text embeddings must be [C={num_classes}, E], got {arr.shape}")
  if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)):
    raise WstalError(f"{path}: text embeddings must be finite floats")
  return arr.astype(np.float32)


def _write(out, *, dataset, classes, videos, features_fn, source_fn, vlm_features, vlm_name,
           vlm_resample, text_embeddings, num_shards, fps, snippet_frames, source, overwrite,
           primary_name=PRIMARY_NAME):
  text_CxE = _load_text(text_embeddings, len(classes))
  known = set(classes)
  for v in videos:  # fail before writing anything
    for name in list(v.labels) + list(v.segment_names):
      if name not in known:
        raise WstalError(f"{v.where}: video {v.name}: label {name!r} is not in the class list "
                         f"({len(classes)} classes: {', '.join(classes[:4])}, ...)")
  if not videos:
    raise WstalError(f"{source.get('annotations')}: no video to convert")
  # The primary width from the first video; write_dataset checks every other video against it
  # (an error naming the video and its file).
  first = _check_2d(features_fn(videos[0]), source_fn(videos[0]), "features")
  if first.shape[1] == 0:
    raise WstalError(f"{source_fn(videos[0])}: features have width 0")
  dims = {primary_name: int(first.shape[1])}
  logging.info("primary stream %r: %d dims (from %s)", primary_name, first.shape[1],
               source_fn(videos[0]))
  vlm = None
  if vlm_features is not None:
    if vlm_name == primary_name:
      raise WstalError(f"--vlm_name must differ from --primary_name ({primary_name!r})")
    vlm = _VlmSource(vlm_features, vlm_resample)
    dims[vlm_name] = _peek_dim(vlm, videos, features_fn)
  splits = {s: _records(videos, s, classes, features_fn, source_fn, vlm, vlm_name, primary_name)
            for s in ("train", "test") if any(v.split == s for v in videos)}
  manifest = fmt.write_dataset(
      out, dataset=dataset, classes=classes, feature_dims=dims, splits=splits,
      num_shards=num_shards, text_embeddings=text_CxE, primary_feature=primary_name,
      snippet_frames=snippet_frames, fps=fps, source=source, overwrite=overwrite)
  if vlm is not None and vlm.num_resampled:
    logging.warning("%d videos had VLM features resampled to the I3D length",
                    vlm.num_resampled)
  return manifest


# ------------------------------------------------------------------------------- converters


def convert_wtalc(*, features: str, annotations: str, out: str, dataset: str | None = None,
                  vlm_features: str | None = None, vlm_name: str = "videoclip",
                  vlm_resample: bool = True, text_embeddings: str | None = None,
                  ambiguous: str | None = None, num_shards: int = 8, clip_gt: bool = False,
                  video_label: str = "labels_all", fps: float = 25.0,
                  snippet_frames: int = 16, overwrite: bool = False,
                  primary_name: str = PRIMARY_NAME) -> dict:
  """W-TALC pickled feature array + annotation folder -> dataset directory; returns manifest."""
  classes, videos, family = load_wtalc_annotations(annotations, video_label)
  amb_path = ambiguous or tf.io.gfile.join(annotations, "Ambiguous_test.txt")
  if ambiguous is not None or _exists(amb_path):
    load_ambiguous(amb_path, videos)
  defects = fix_segments(videos, clip_gt)
  feats = _load_npy(features, "W-TALC feature file")
  if feats.ndim == 0 or len(feats) != len(videos):
    raise WstalError(f"{features}: holds {0 if feats.ndim == 0 else len(feats)} feature arrays "
                     f"but {annotations}/videoname.npy lists {len(videos)} videos")
  index = {v.name: i for i, v in enumerate(videos)}

  def features_fn(v):
    i = index[v.name]
    return _check_2d(feats[i], f"{features} (entry {i}, video {v.name})", "features")

  dataset = dataset or {"thumos": "thumos14", "activitynet": "activitynet12"}[family]
  source = {"converter": "wtalc", "features": features, "annotations": annotations,
            "vlm_features": vlm_features, "text_embeddings": text_embeddings,
            "clip_gt": clip_gt, "video_label": video_label, "defects": defects}
  return _write(out, dataset=dataset, classes=classes, videos=videos, features_fn=features_fn,
                source_fn=lambda v: f"{features} entry {index[v.name]}",
                vlm_features=vlm_features, vlm_name=vlm_name, vlm_resample=vlm_resample,
                text_embeddings=text_embeddings, num_shards=num_shards, fps=fps,
                snippet_frames=snippet_frames, source=source, overwrite=overwrite,
                primary_name=primary_name)


def _basnet_streams(feat_dir) -> tuple:
  """('rgb', 'flow'), or ('rgb',) for a single-stream release (no flow/ folder in any split:
  RGB-only I3D, TSN, VideoMAE, ... features laid out as BaS-Net's rgb/)."""
  has_flow = any(tf.io.gfile.isdir(tf.io.gfile.join(feat_dir, s, "flow"))
                 for s in ("train", "test"))
  return ("rgb", "flow") if has_flow else ("rgb",)


def _basnet_paths(feat_dir, video, streams=("rgb", "flow")):
  return [tf.io.gfile.join(feat_dir, video.split, stream, f"{video.name}.npy")
          for stream in streams]


def _load_basnet_features(feat_dir, video, streams=("rgb", "flow")):
  """rgb [T, D_rgb] || flow [T, D_flow] -> float32 [T, D_rgb + D_flow] (I3D: 1024 + 1024),
  or rgb alone for a single-stream release."""
  paths = _basnet_paths(feat_dir, video, streams)
  loaded = []
  for path in paths:
    feat = _check_2d(_load_npy(path, "BaS-Net features", allow_pickle=False), path, "features")
    if feat.shape[0] == 0:
      raise WstalError(f"{path}: T=0 snippets (empty video)")
    loaded.append(feat)
  if len(loaded) == 2 and loaded[0].shape[0] != loaded[1].shape[0]:
    raise WstalError(f"{paths[0]}: T={loaded[0].shape[0]} but {paths[1]} has "
                     f"T={loaded[1].shape[0]}")
  return np.concatenate(loaded, axis=1) if len(loaded) == 2 else loaded[0]


def convert_basnet(*, features: str, annotations: str, splits: str, out: str,
                   dataset: str | None = None, classes: str | None = None,
                   durations: str | None = None, vlm_features: str | None = None,
                   vlm_name: str = "videoclip", vlm_resample: bool = True,
                   text_embeddings: str | None = None, ambiguous: str | None = None,
                   num_shards: int = 8, clip_gt: bool = False, fps: float = 25.0,
                   snippet_frames: int = 16, overwrite: bool = False,
                   primary_name: str = PRIMARY_NAME) -> dict:
  """BaS-Net per-video rgb/flow features (or rgb only) + gt.json + split files -> dataset
  directory."""
  class_list = load_class_list(classes) if classes is not None else None
  class_list, videos = load_basnet_annotations(annotations, splits, class_list)
  if not tf.io.gfile.isdir(features):
    raise WstalError(f"{features}: BaS-Net feature folder not found")
  dur = load_durations(durations) if durations is not None else None
  streams = _basnet_streams(features)
  cache = {}

  def features_fn(v):
    if v.name not in cache:
      cache.clear()  # one video at a time: _peek_dim and the record generator share it
      cache[v.name] = _load_basnet_features(features, v, streams)
    return cache[v.name]

  # Durations: --durations when given, else the feature length T * snippet_frames / fps
  # (T from the rgb file's .npy header, so features are read once).
  missing = [v.name for v in videos if dur is not None and v.name not in dur]
  if missing:
    raise WstalError(f"{durations}: no duration for {len(missing)} video(s), e.g. {missing[:3]}")
  if dur is not None:
    for v in videos:
      v.duration = dur[v.name]
      if not np.isfinite(v.duration) or v.duration <= 0:
        raise WstalError(f"{durations}: video {v.name} has duration {v.duration}")
  else:
    for v in videos:
      rgb_path = _basnet_paths(features, v, streams)[0]
      v.duration = max(_npy_shape(rgb_path)[0], 1) * snippet_frames / fps
  if ambiguous is not None:
    load_ambiguous(ambiguous, videos)
  defects = fix_segments(videos, clip_gt)
  source = {"converter": "basnet", "features": features, "annotations": annotations,
            "splits": splits, "classes": classes, "durations": durations or "T * 16 / 25",
            "streams": list(streams),
            "vlm_features": vlm_features, "text_embeddings": text_embeddings,
            "clip_gt": clip_gt, "defects": defects}
  return _write(out, dataset=dataset or "thumos14", classes=class_list, videos=videos,
                features_fn=features_fn,
                source_fn=lambda v: " + ".join(_basnet_paths(features, v, streams)),
                vlm_features=vlm_features, vlm_name=vlm_name, vlm_resample=vlm_resample,
                text_embeddings=text_embeddings, num_shards=num_shards, fps=fps,
                snippet_frames=snippet_frames, source=source, overwrite=overwrite,
                primary_name=primary_name)


# -------------------------------------------------------------------------------------- CLI


def _bool(text):
  low = str(text).lower()
  if low in ("1", "true", "yes", "y", "on"):
    return True
  if low in ("0", "false", "no", "n", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.data.convert",
      description="Convert W-TALC/CO2-Net or BaS-Net/UM feature releases into a wstal_jax "
                  "dataset directory (manifest.json + TFRecord shards).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--format", required=True, choices=["wtalc", "basnet"],
                 help="source layout: wtalc = one pickled feature array + annotation folder of "
                      ".npy files; basnet = features/{train,test}/{rgb,flow}/<vid>.npy + gt.json")
  p.add_argument("--features", required=True,
                 help="wtalc: the pickled object array FILE.npy (entry i = float32 [T_i, D] "
                      "for video i of videoname.npy); basnet: the features DIR "
                      "({train,test}/rgb/<vid>.npy, and flow/ for two-stream features)")
  p.add_argument("--annotations", required=True,
                 help="wtalc: the annotation DIR (classlist.npy, videoname.npy, subset.npy, "
                      "duration.npy, labels.npy, labels_all.npy, segments.npy, optional "
                      "Ambiguous_test.txt); basnet: gt.json")
  p.add_argument("--splits", help="basnet only: DIR holding split_train.txt and split_test.txt")
  p.add_argument("--out", required=True, help="dataset DIR to create (must not exist)")
  p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False,
                 help="replace an existing --out once the new dataset is complete")
  p.add_argument("--dataset", default=None,
                 help="dataset name for the manifest (default: thumos14 / activitynet12, "
                      "from the W-TALC subset values; thumos14 for basnet)")
  p.add_argument("--classes", default=None,
                 help="basnet only: class list (text file, one name per line, or a W-TALC "
                      "classlist.npy); default: sorted unique labels of gt.json")
  p.add_argument("--durations", default=None,
                 help="basnet only: video durations, a JSON {video: seconds} or a W-TALC "
                      "annotation DIR; default T * snippet_frames / fps from the features")
  p.add_argument("--ambiguous", default=None,
                 help="ambiguous segments file ('video start end' lines); wtalc default: "
                      "<annotations>/Ambiguous_test.txt when present")
  p.add_argument("--vlm_features", default=None,
                 help="optional DIR of per-video VLM features <vid>.npy float32 [T, E] (also "
                      "looked up in DIR/train/ and DIR/test/)")
  p.add_argument("--vlm_name", default="videoclip",
                 help="manifest feature name for --vlm_features")
  p.add_argument("--primary_name", default=PRIMARY_NAME,
                 help="manifest name of the primary feature stream (its width is read from "
                      "the first video: 2048 for I3D RGB+flow, 1024 RGB only, 768 VideoMAE, "
                      "...); every other video must have the same width")
  p.add_argument("--vlm_resample", type=_bool, nargs="?", const=True, default=True,
                 help="linearly resample VLM features whose T differs from the I3D T (with a "
                      "warning); false makes any mismatch an error. A ratio above 2x or T=0 is "
                      "always an error")
  p.add_argument("--text_embeddings", default=None,
                 help="optional class text embeddings FILE.npy float32 [C, E], class order of "
                      "the class list")
  p.add_argument("--num_shards", type=int, default=8,
                 help="TFRecord shards per split (>= the number of training processes)")
  p.add_argument("--clip_gt", type=_bool, nargs="?", const=True, default=False,
                 help="clip GT segments to [0, duration] and drop those starting at/after the "
                      "end; default false keeps the annotation as distributed (official counts, "
                      "comparable mAP)")
  p.add_argument("--video_label", default="labels_all", choices=["labels_all", "instances"],
                 help="wtalc only: video label from labels_all.npy (as W-TALC/CO2-Net train) or "
                      "from the union of the instance labels")
  p.add_argument("--fps", type=float, default=25.0, help="frame rate features were taken at")
  p.add_argument("--snippet_frames", type=int, default=16, help="frames per feature snippet")
  return p


@cli_main
def main(argv=None):
  args = build_parser().parse_args(argv)
  logging.set_verbosity(logging.INFO)
  common = dict(out=args.out, dataset=args.dataset, vlm_features=args.vlm_features,
                vlm_name=args.vlm_name, vlm_resample=args.vlm_resample,
                text_embeddings=args.text_embeddings, ambiguous=args.ambiguous,
                num_shards=args.num_shards, clip_gt=args.clip_gt, fps=args.fps,
                snippet_frames=args.snippet_frames, overwrite=args.overwrite,
                primary_name=args.primary_name)
  if args.num_shards < 1:
    raise WstalError(f"--num_shards must be >= 1, got {args.num_shards}")
  if args.format == "wtalc":
    for flag in ("splits", "classes", "durations"):
      if getattr(args, flag) is not None:
        raise WstalError(f"--{flag} only applies to --format=basnet")
    manifest = convert_wtalc(features=args.features, annotations=args.annotations,
                             video_label=args.video_label, **common)
  else:
    if args.splits is None:
      raise WstalError("--format=basnet needs --splits=DIR (split_train.txt, split_test.txt)")
    manifest = convert_basnet(features=args.features, annotations=args.annotations,
                              splits=args.splits, classes=args.classes,
                              durations=args.durations, **common)
  for split, entry in manifest["splits"].items():
    print(f"{split}: {entry['num_videos']} videos, {entry['num_instances']} instances, "
          f"{len(entry['shards'])} shards")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
