"""Evaluation protocols: what a table's mAP means, and on which test videos.

  official  the ActivityNet algorithm (`metrics.detection_map`) on segments in seconds. With
            THUMOS14's gt.json (BaS-Net / UM / ASL / AICL) that is 210 test videos; with a
            dataset directory, every video of the split.
  wtalc     the copy of that algorithm the W-TALC / CO2-Net family evaluates with (CO2-Net,
            DELU, PVLR, P-MIL, SEAL, DDG-Net: `eval/eval_detection.py` and the proposal
            filter of `proposal_methods.py`), written here from reading it:
            * ground truth in snippet units, each bound rounded: round(t * fps / frames)
              (25 / 16 on THUMOS14; Python's round, halves to even), on the videos of the
              subset that have at least one instance (THUMOS14: 210 of the 212 test videos
              of the W-TALC arrays);
            * predictions in snippet units (seconds * fps / frames, here rounded to 1e-6 so
              that a snippet boundary written in seconds, 19.2 s, is the integer the family's
              code holds, 30, and not 30.000000000000004);
            * a prediction is dropped when the integer snippets range(int(start), int(end))
              shares a snippet with an ambiguous segment's range(round(a * fps / frames), ...)
              of its video (`Ambiguous_test.txt`);
            * then the same AP: predictions on videos without ground truth are false
              positives, mAP averages over the classes with instances.
            The numbers differ from `official` by the rounding of the ground truth to
            snippets and by the ambiguous filter (README, "Evaluation protocols").

Both the training evaluator (`config.eval.protocol`) and `python -m wstal_jax.evaluate_results
--protocol=...` go through `to_wtalc`, so they agree.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from wstal_jax import results_io
from wstal_jax.errors import WstalError

PROTOCOLS = ("official", "wtalc")
# Predictions are rounded to this many decimals of a snippet (see the module docstring).
_SNIPPET_DECIMALS = 6


def check(protocol: str, what: str = "protocol") -> str:
  if protocol not in PROTOCOLS:
    raise WstalError(f"{what}: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
  return protocol


def snippet_bounds(seconds, fps: float, snippet_frames: float) -> np.ndarray:
  """Ground-truth bounds in snippet units as the family computes them: round(t * fps / frames),
  halves to even (numpy's round is Python's round on floats)."""
  return np.round(np.asarray(seconds, np.float64) * fps / snippet_frames)


def ambiguous_mask(video, start_snip, end_snip, ambiguous: Mapping, fps: float,
                   snippet_frames: float) -> np.ndarray:
  """True for the predictions the family's ambiguous filter drops: the snippets
  range(int(start), int(end)) meet range(round(a_s * fps / frames), round(a_e * fps / frames))
  of an ambiguous segment (a_s, a_e) of the same video (seconds)."""
  drop = np.zeros(len(video), bool)
  for i, (v, s, e) in enumerate(zip(video, start_snip, end_snip)):
    segs = ambiguous.get(v)
    if segs is None or not len(segs):
      continue
    lo, hi = int(s), int(e)       # int() truncates toward zero, as the family's code does
    if hi <= lo:
      continue                     # an empty range meets nothing
    a = snippet_bounds(np.asarray(segs, np.float64).reshape(-1, 2), fps, snippet_frames)
    drop[i] = bool(np.any((np.maximum(a[:, 0], lo) < np.minimum(a[:, 1], hi))
                          & (a[:, 1] > a[:, 0])))
  return drop


def wtalc_predictions(pred: Mapping, ambiguous: Mapping, fps: float,
                      snippet_frames: float) -> dict:
  """Predictions {video, label, score, start, end (seconds)} -> the same in snippet units,
  without those the ambiguous filter drops ({video: [M, 2] seconds})."""
  ratio = fps / snippet_frames
  start = np.round(np.asarray(pred["start"], np.float64) * ratio, _SNIPPET_DECIMALS)
  end = np.round(np.asarray(pred["end"], np.float64) * ratio, _SNIPPET_DECIMALS)
  keep = ~ambiguous_mask(pred["video"], start, end, ambiguous, fps, snippet_frames)
  return {"video": np.asarray(pred["video"])[keep], "label": np.asarray(pred["label"])[keep],
          "score": np.asarray(pred["score"])[keep], "start": start[keep], "end": end[keep]}


def to_wtalc(gt_t: results_io.GroundTruthTable, res_t: results_io.ResultsTable, *,
             ambiguous: Mapping, fps: float, snippet_frames: float):
  """(ground truth, predictions, number dropped by the ambiguous filter) of the `wtalc`
  protocol, from tables in seconds. The ground truth keeps the videos with instances (and
  their durations, in seconds, for `evaluate_results.check_results`)."""
  with_instances = set(gt_t.video.tolist())
  gt_w = dataclasses.replace(
      gt_t, videos=[v for v in gt_t.videos if v in with_instances],
      start=snippet_bounds(gt_t.start, fps, snippet_frames),
      end=snippet_bounds(gt_t.end, fps, snippet_frames),
      durations={v: d for v, d in gt_t.durations.items() if v in with_instances})
  ratio = fps / snippet_frames
  start = np.round(res_t.start * ratio, _SNIPPET_DECIMALS)
  end = np.round(res_t.end * ratio, _SNIPPET_DECIMALS)
  drop = ambiguous_mask(res_t.video, start, end, ambiguous, fps, snippet_frames)
  keep = ~drop
  res_w = dataclasses.replace(
      res_t, video=res_t.video[keep], label=res_t.label[keep], score=res_t.score[keep],
      start=start[keep], end=end[keep],
      row=None if res_t.row is None else res_t.row[keep])
  return gt_w, res_w, int(drop.sum())


def wtalc_folder_ground_truth(ann_dir: str, split: str = "test"):
  """(GroundTruthTable in seconds, {video: ambiguous [M, 2] s}) of a W-TALC annotation folder
  (Thumos14reduced-Annotations: videoname / subset / segments / labels / classlist /
  duration .npy, Ambiguous_test.txt), read by the converter's readers. `split` is the
  project's split name: THUMOS14's test subset is `test`, its validation subset `train`;
  ActivityNet1.2's validation subset is `test`."""
  import tensorflow as tf   # pylint: disable=import-outside-toplevel
  from wstal_jax.data import convert   # pylint: disable=import-outside-toplevel
  classes, videos, _ = convert.load_wtalc_annotations(ann_dir, video_label="instances")
  amb_path = tf.io.gfile.join(ann_dir, "Ambiguous_test.txt")
  if tf.io.gfile.exists(amb_path):
    convert.load_ambiguous(amb_path, videos)
  chosen = [v for v in videos if v.split == split]
  if not chosen:
    raise WstalError(f"{ann_dir}: no video of split {split!r} (splits present: "
                     f"{sorted({v.split for v in videos})})")
  database = {v.name: {"subset": split, "duration": float(v.duration),
                       "annotations": [{"segment": [float(s), float(e)], "label": c}
                                       for (s, e), c in zip(v.segments, v.segment_names)]}
              for v in chosen}
  gt = {"taxonomy": [{"nodeName": c} for c in classes], "database": database}
  table = results_io.ground_truth_table(gt, split, source=ann_dir)
  return table, {v.name: v.ambiguous for v in chosen if len(v.ambiguous)}
