"""Files people exchange: ActivityNet-format results and ground truth, and saved score arrays.

Results JSON (what official evaluators and peer repos read and write):
  {"version": "VERSION 1.3",
   "results": {"<video>": [{"label": "<class name>", "score": float,
                            "segment": [start_s, end_s]}, ...]},
   "external_data": {"used": bool, "details": str}}
Ground-truth JSON, the ActivityNet `database` format (BaS-Net / UM / ASL's THUMOS14 gt.json):
  {"database": {"<video>": {"subset": "train" | "test" | ..., "duration": float (optional),
                            "annotations": [{"segment": [s, e], "label": "<class name>"}]}}}
Segment values may be numbers or numeric strings (gt.json has strings).

Scores .npz (per-video sequences saved at evaluation, read by `wstal_jax.plots`):
  "<video>/cas"                 float32 [T, C]  the post-processed class sequence
  "<video>/actionness"          float32 [T]     optional, class-agnostic sequence
  "<video>/video_scores"        float32 [C]     optional, video-level class scores
  "<video>/seconds_per_snippet" float64 []      optional, overrides the file-level value
                                                (videos resampled to a fixed T)
  "seconds_per_snippet"         float64 []      seconds per element of the sequences
  "class_names"                 str [C]

Ground truth of a dataset directory (manifest.json + shards) for any evaluator:
    python -m wstal_jax.results_io --data_dir=DIR [--splits=test] --output=GT.json

Every reader raises WstalError naming the file and what is wrong; every writer writes a
temporary sibling and renames it into place, so a reader never sees a partial file. Local
paths use plain file I/O; paths with a scheme (gs://...) go through tf.io.gfile.
"""
import argparse
import dataclasses
import io
import json
import math
import os
import sys
import uuid
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from wstal_jax.errors import WstalError, cli_main

RESULTS_VERSION = "VERSION 1.3"
_SCORE_FIELDS = ("cas", "actionness", "video_scores", "seconds_per_snippet")


# ------------------------------------------------------------------------------ file I/O


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _read_bytes(path: str) -> bytes:
  path = str(path)
  try:
    if _is_remote(path):
      import tensorflow as tf  # only for gs:// and friends; slow to import
      with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise WstalError(f"{path}: file not found") from None
  except IsADirectoryError:
    raise WstalError(f"{path}: is a directory, expected a file") from None
  except OSError as e:
    raise WstalError(f"{path}: cannot read ({e})") from None
  except Exception as e:  # tf.errors.NotFoundError and friends
    raise WstalError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def write_bytes_atomic(path: str, data: bytes):
  """Writes `data` to a temporary sibling of `path` and renames it into place."""
  path = str(path)
  if _is_remote(path):
    import tensorflow as tf
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise WstalError(f"{path}: directory {parent} does not exist")
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise WstalError(f"{path}: cannot write ({e})") from None


def load_json(path: str):
  """Parsed JSON of `path`; WstalError naming the file when missing or not JSON."""
  raw = _read_bytes(path)
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WstalError(f"{path}: not valid JSON ({e})") from None


def write_json_atomic(path: str, obj, indent: int | None = None):
  """json.dump to a temporary sibling, then rename into place."""
  write_bytes_atomic(path, json.dumps(obj, indent=indent).encode("utf-8"))


# ---------------------------------------------------------------------- flat tables


@dataclasses.dataclass
class GroundTruthTable:
  """Ground truth of the chosen videos as flat arrays (file order kept).

  classes: sorted names of the classes with at least one instance; videos: the chosen video
  names in file order (also those without instances); video / label_name: str [N];
  label: int64 [N] index into classes; start / end: float64 [N] seconds; durations: name ->
  seconds for videos whose entry has a duration; known_classes: every class the file names
  (annotations of any subset, and the `taxonomy` node names when present); source: the file.
  """
  classes: list
  videos: list
  video: np.ndarray
  label_name: np.ndarray
  label: np.ndarray
  start: np.ndarray
  end: np.ndarray
  durations: dict
  known_classes: frozenset = frozenset()
  source: str = "ground truth"


@dataclasses.dataclass
class ResultsTable:
  """Predictions as flat arrays in file order: video / label: str [P]; score, start, end [P];
  row: int [P], the prediction's position in its video's list (for messages); source: the
  file. A segment may end before it starts (the official evaluator scores such a row: it
  never overlaps anything), nothing may be NaN or infinite."""
  video: np.ndarray
  label: np.ndarray
  score: np.ndarray
  start: np.ndarray
  end: np.ndarray
  row: np.ndarray = None
  source: str = "results"

  def where(self, i: int) -> str:
    row = int(self.row[i]) if self.row is not None else "?"
    return f"{self.source}: results[{self.video[i]!r}][{row}]"


def _number(x, where: str) -> float:
  if isinstance(x, bool):
    raise WstalError(f"{where}: expected a number, got {x!r}")
  try:
    v = float(x)
  except (TypeError, ValueError):
    raise WstalError(f"{where}: expected a number, got {x!r}") from None
  if not math.isfinite(v):
    raise WstalError(f"{where}: not finite ({x!r})")
  return v


def segment(seg, where: str, allow_inverted: bool = False):
  """(start, end) of a [start, end] pair of finite numbers with end >= start (unless
  allow_inverted); WstalError naming `where` otherwise."""
  if not isinstance(seg, (list, tuple)) or len(seg) != 2:
    raise WstalError(f"{where}: expected [start, end], got {seg!r}")
  s = _number(seg[0], where)
  e = _number(seg[1], where)
  if e < s and not allow_inverted:
    raise WstalError(f"{where}: ends before it starts ({seg!r})")
  return s, e


def ground_truth_table(gt: Mapping, subset: str | None = None,
                       source: str = "ground truth") -> GroundTruthTable:
  """Validates a `database`-format dict and flattens the videos of `subset` (None: all).

  Raises WstalError naming `source` (the file) and the offending entry.
  """
  if not isinstance(gt, Mapping) or not isinstance(gt.get("database"), Mapping):
    raise WstalError(f"{source}: expected an object with a 'database' object "
                     "(ActivityNet ground-truth format)")
  videos, video, label, start, end, durations = [], [], [], [], [], {}
  subsets, known = set(), set()
  for node in gt.get("taxonomy") or []:
    if isinstance(node, Mapping) and isinstance(node.get("nodeName"), str):
      known.add(node["nodeName"])
  for vid, entry in gt["database"].items():
    where = f"{source}: database[{vid!r}]"
    if not isinstance(entry, Mapping):
      raise WstalError(f"{where}: expected an object, got {type(entry).__name__}")
    if subset is not None:
      if "subset" not in entry:
        raise WstalError(f"{where}: no 'subset' field, so --subset={subset} cannot select it")
      subsets.add(str(entry["subset"]))
      if entry["subset"] != subset:
        known.update(a["label"] for a in entry.get("annotations") or []
                     if isinstance(a, Mapping) and isinstance(a.get("label"), str))
        continue
    anns = entry.get("annotations")
    if not isinstance(anns, list):
      raise WstalError(f"{where}: 'annotations' must be a list")
    videos.append(vid)
    if "duration" in entry:
      durations[vid] = _number(entry["duration"], f"{where}.duration")
    for i, ann in enumerate(anns):
      w = f"{where}.annotations[{i}]"
      if not isinstance(ann, Mapping) or "segment" not in ann or "label" not in ann:
        raise WstalError(f"{w}: expected an object with 'segment' and 'label'")
      if not isinstance(ann["label"], str):
        raise WstalError(f"{w}.label: expected a class name string, got {ann['label']!r}")
      s, e = segment(ann["segment"], f"{w}.segment")
      video.append(vid)
      label.append(ann["label"])
      start.append(s)
      end.append(e)
  if subset is not None and not videos:
    raise WstalError(f"{source}: no video has subset {subset!r} "
                     f"(subsets present: {sorted(subsets)})")
  classes = sorted(set(label))
  index = {c: i for i, c in enumerate(classes)}
  return GroundTruthTable(
      classes=classes, videos=videos, video=np.array(video, dtype=object),
      label_name=np.array(label, dtype=object),
      label=np.array([index[c] for c in label], np.int64),
      start=np.array(start, np.float64), end=np.array(end, np.float64), durations=durations,
      known_classes=frozenset(known | set(classes)), source=str(source))


def results_table(results: Mapping, source: str = "results") -> ResultsTable:
  """Validates a results-format dict and flattens it in file order (WstalError naming source)."""
  if not isinstance(results, Mapping) or not isinstance(results.get("results"), Mapping):
    raise WstalError(f"{source}: expected an object with a 'results' object "
                     "(ActivityNet detection results format)")
  video, label, score, start, end, rows = [], [], [], [], [], []
  for vid, preds in results["results"].items():
    where = f"{source}: results[{vid!r}]"
    if not isinstance(preds, list):
      raise WstalError(f"{where}: expected a list of predictions")
    for i, p in enumerate(preds):
      w = f"{where}[{i}]"
      if not isinstance(p, Mapping) or not {"label", "score", "segment"} <= set(p):
        raise WstalError(f"{w}: expected an object with 'label', 'score' and 'segment'")
      if not isinstance(p["label"], str):
        raise WstalError(f"{w}.label: expected a class name string, got {p['label']!r}")
      s, e = segment(p["segment"], f"{w}.segment", allow_inverted=True)
      video.append(vid)
      label.append(p["label"])
      score.append(_number(p["score"], f"{w}.score"))
      start.append(s)
      end.append(e)
      rows.append(i)
  return ResultsTable(video=np.array(video, dtype=object), label=np.array(label, dtype=object),
                      score=np.array(score, np.float64), start=np.array(start, np.float64),
                      end=np.array(end, np.float64), row=np.array(rows, np.int64),
                      source=str(source))


def read_ground_truth(path: str) -> dict:
  """Loads and validates a ground-truth JSON; returns the parsed dict."""
  gt = load_json(path)
  ground_truth_table(gt, source=str(path))
  return gt


def read_results(path: str) -> dict:
  """Loads and validates a results JSON; returns the parsed dict."""
  res = load_json(path)
  results_table(res, source=str(path))
  return res


# ------------------------------------------------------------------------------ writing


def results_dict(proposals_by_video: Mapping, class_names, external_data=None) -> dict:
  """ActivityNet results dict from {video: Proposals} (postprocess.Proposals, label = class id)."""
  class_names = list(class_names)
  out = {}
  for vid, p in proposals_by_video.items():
    label = np.asarray(p.label, np.int64)
    if len(label) and (label.min() < 0 or label.max() >= len(class_names)):
      raise ValueError(f"video {vid!r}: class id out of range for {len(class_names)} classes")
    out[str(vid)] = [{"label": class_names[int(c)], "score": float(s),
                      "segment": [float(a), float(b)]}
                     for c, s, a, b in zip(label, p.score, p.start, p.end)]
  return {"version": RESULTS_VERSION, "results": out,
          "external_data": external_data or {"used": True,
                                             "details": "pre-extracted video features"}}


def write_results(path: str, proposals_by_video: Mapping, class_names,
                  external_data=None) -> dict:
  """Writes `results_dict(...)` atomically to `path`; returns the dict."""
  res = results_dict(proposals_by_video, class_names, external_data)
  write_json_atomic(path, res)
  return res


def short_float(x) -> float:
  """Shortest decimal that round-trips the float32 value (18.6, not 18.600000381469727)."""
  return float(str(np.float32(x)))


_short_float = short_float


def ground_truth_dict(videos: Iterable, class_names, subset: str) -> dict:
  """`database` dict from VideoInfo-like objects (name, duration, segments, segment_labels)."""
  class_names = list(class_names)
  database = {}
  for v in videos:
    segs = np.asarray(v.segments, np.float64).reshape(-1, 2)
    labs = np.asarray(v.segment_labels, np.int64).reshape(-1)
    database[v.name] = {
        "subset": subset,
        "duration": _short_float(v.duration),
        "annotations": [{"segment": [_short_float(s), _short_float(e)],
                         "label": class_names[int(c)]} for (s, e), c in zip(segs, labs)]}
  # The class list, as ActivityNet's taxonomy nodes: a class without an instance here is
  # still a class of the dataset (evaluate_results tells it from a misspelt label).
  return {"version": RESULTS_VERSION,
          "taxonomy": [{"nodeId": i, "nodeName": c} for i, c in enumerate(class_names)],
          "database": database}


def ground_truth_from_dataset(data_dir: str, splits=("test",)) -> dict:
  """`database` dict of a dataset directory's splits (subset = split name), manifest order."""
  from wstal_jax.data import format as data_format  # imports TensorFlow
  manifest = data_format.read_manifest(data_dir)
  database = {}
  for split in splits:
    if split not in manifest["splits"]:
      raise WstalError(f"{data_dir}: dataset has no split {split!r} "
                       f"(has {sorted(manifest['splits'])})")
    infos = data_format.read_video_info(data_dir, split)
    database.update(ground_truth_dict(infos, manifest["classes"], split)["database"])
  return {"version": RESULTS_VERSION,
          "taxonomy": [{"nodeId": i, "nodeName": c} for i, c in enumerate(manifest["classes"])],
          "database": database}


def write_ground_truth(path: str, data_dir: str, splits=("test",)) -> dict:
  """Writes `ground_truth_from_dataset(...)` atomically to `path`; returns the dict."""
  gt = ground_truth_from_dataset(data_dir, splits)
  write_json_atomic(path, gt)
  return gt


# ------------------------------------------------------------------------- score arrays


def save_scores_npz(path: str, videos: Mapping, *, seconds_per_snippet: float, class_names):
  """Saves per-video score sequences in the layout of the module docstring (atomic).

  `videos` maps a video name to {"cas": [T, C], "actionness": [T] (optional),
  "video_scores": [C] (optional), "seconds_per_snippet": float (optional)}.
  """
  class_names = [str(c) for c in class_names]
  arrays = {"seconds_per_snippet": np.float64(seconds_per_snippet),
            "class_names": np.array(class_names, dtype=str)}
  for name, fields in videos.items():
    if "/" in name or name in arrays:
      raise ValueError(f"video name {name!r} cannot be stored (contains '/' or is reserved)")
    unknown = set(fields) - set(_SCORE_FIELDS)
    if unknown or "cas" not in fields:
      raise ValueError(f"video {name!r}: fields must include 'cas' and be among "
                       f"{_SCORE_FIELDS}, got {sorted(fields)}")
    for key, val in fields.items():
      dtype = np.float64 if key == "seconds_per_snippet" else np.float32
      arrays[f"{name}/{key}"] = np.asarray(val, dtype)
  write_bytes_atomic(path, npz_bytes(arrays))


# 1980-01-01, the earliest time a zip entry can hold.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool = True) -> bytes:
  """The bytes of `np.savez_compressed(**arrays)` (`np.savez` with compress=False),
  deterministic: np.savez stamps each zip entry with the current time, so the same arrays
  saved a few seconds apart differ. Here every entry gets one fixed timestamp and fixed
  permissions; np.load reads the result as usual."""
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, mode="w", compression=method) as zf:
    for name, value in arrays.items():
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
      info.compress_type = method
      info.external_attr = 0o644 << 16
      with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
  return buf.getvalue()


def load_scores_npz(path: str) -> dict:
  """Reads a scores .npz -> {"class_names": [str], "seconds_per_snippet": float,
  "videos": {name: {"cas": [T, C], "actionness"?: [T], "video_scores"?: [C],
  "seconds_per_snippet": float (file value unless overridden)}}}."""
  raw = _read_bytes(path)
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile.BadZipFile, ValueError for pickled objects, ...
    raise WstalError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
  for key in ("seconds_per_snippet", "class_names"):
    if key not in arrays:
      raise WstalError(f"{path}: missing array {key!r}")
  class_names = [str(c) for c in np.asarray(arrays.pop("class_names")).reshape(-1)]
  sps = float(arrays.pop("seconds_per_snippet"))
  videos = {}
  for key, val in arrays.items():
    name, _, field = key.rpartition("/")
    if not name or field not in _SCORE_FIELDS:
      raise WstalError(f"{path}: unexpected array {key!r} (expected '<video>/<field>' with "
                       f"field in {_SCORE_FIELDS})")
    videos.setdefault(name, {})[field] = val
  for name, fields in videos.items():
    if "cas" not in fields:
      raise WstalError(f"{path}: video {name!r} has no '{name}/cas' array")
    cas = fields["cas"]
    if cas.ndim != 2 or cas.shape[1] != len(class_names):
      raise WstalError(f"{path}: '{name}/cas' has shape {cas.shape}, expected "
                       f"[T, {len(class_names)}] (one column per class name)")
    if "actionness" in fields and fields["actionness"].reshape(-1).shape[0] != cas.shape[0]:
      raise WstalError(f"{path}: '{name}/actionness' has shape {fields['actionness'].shape}, "
                       f"expected [{cas.shape[0]}]")
    fields["seconds_per_snippet"] = float(fields.get("seconds_per_snippet", sps))
  return {"class_names": class_names, "seconds_per_snippet": sps, "videos": videos}


# ------------------------------------------------------------------------------------ CLI


@cli_main
def main(argv=None):
  """Writes the ground-truth JSON of a dataset directory's splits."""
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.results_io",
      description="Write the ActivityNet-format ground-truth JSON of a dataset directory.")
  p.add_argument("--data_dir", required=True, help="dataset directory (manifest.json)")
  p.add_argument("--splits", default="test", help="comma-separated splits (default test)")
  p.add_argument("--output", required=True, help="ground-truth JSON to write")
  args = p.parse_args(argv)
  splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
  gt = write_ground_truth(args.output, args.data_dir, splits)
  n = sum(len(v["annotations"]) for v in gt["database"].values())
  print(f"{args.output}: {len(gt['database'])} videos, {n} instances ({', '.join(splits)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
