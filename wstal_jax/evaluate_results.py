"""Score any ActivityNet-format results JSON against any ground-truth JSON.

    python -m wstal_jax.evaluate_results --ground_truth=GT.json --results=RESULTS.json \
        [--subset=test] [--tiou=0.1,0.2,0.3] [--output=metrics.json]
    python -m wstal_jax.evaluate_results --protocol=wtalc \
        --ground_truth=PATH/Thumos14reduced-Annotations --results=RESULTS.json --output=M.json

GT.json is the ActivityNet `database` format (our `results_io.write_ground_truth` output, or a
peer repo's, e.g. THUMOS14's gt.json with string segments); --ground_truth may also be a
dataset directory (manifest.json), whose --subset split (default test) is used. Without
--subset every video of GT.json counts. --tiou takes a comma list, start:step:stop
(inclusive), or a protocol name: thumos14 = 0.1:0.1:0.7 (the default), activitynet =
0.5:0.05:0.95.

--protocol=official (default) is the ActivityNet algorithm on seconds; --protocol=wtalc is the
W-TALC / CO2-Net family's evaluation (wstal_jax/protocols.py): the ground truth is the W-TALC
annotation folder (or a dataset directory), rounded to snippets, and predictions that meet an
ambiguous segment are dropped.

Prints which protocol and which test videos, then one line per threshold and the average, in
PERCENT (0-100); --output writes {"mAP@0.10": ..., "average_mAP": ..., "protocol": ...,
"num_gt_videos": ..., "anomalies": {...}}. Every file the official code scores is scored as it
scores it; what it scores oddly is rejected with one error naming the file, the video and the
row (a label the ground truth does not know, NaN / Inf, a segment outside its video); what it
scores although it is odd (a segment that ends before it starts, a video without ground
truth, a class without instances in the subset) is counted, with one warning line per kind
(count + first example) and an entry in the output's "anomalies".

`evaluate_detections` is the function the training evaluator calls too, so numbers printed
during training and by this command come from the same code.
"""
import argparse
import os
import sys

import numpy as np

from wstal_jax import metrics
from wstal_jax import protocols
from wstal_jax import results_io
from wstal_jax.errors import WstalError, cli_main


def metric_key(tiou: float) -> str:
  """'mAP@0.10' for 0.1: the key used in printed tables and metrics.json."""
  return f"mAP@{tiou:.2f}"


# A predicted segment may reach this far before 0 or past the video's end (peers' last
# upsampled snippet overhangs the end by up to one snippet, 0.64 s on THUMOS14; an outer
# region can start slightly before 0); further out it is not a segment of the video.
OUTSIDE_TOLERANCE_S = 1.0

# What the official evaluator scores although it is odd: each is counted, reported in one
# warning line (count + first example) and in the output JSON under "anomalies".
ANOMALIES = {
    "inverted_segment": "predictions whose segment ends before it starts: scored as the "
                        "official code scores them (they overlap nothing: false positives)",
    "video_without_ground_truth": "predictions on videos without ground truth in the chosen "
                                  "subset: false positives, as in the official code",
    "class_without_ground_truth": "predictions of a class of the ground truth that has no "
                                  "instance in the chosen subset: left out (the official code "
                                  "stops with a KeyError; they cannot change the mAP, which "
                                  "averages over the classes with instances)",
}


def check_results(gt_t, res_t) -> dict:
  """Rejects what the official evaluator would score oddly, counts what it scores.

  WstalError (naming the results file, the video and the row) for a label the ground truth
  does not know (the official code stops with a KeyError) and for a segment outside its
  video (a bound before -OUTSIDE_TOLERANCE_S, or past the duration + OUTSIDE_TOLERANCE_S
  where the ground truth gives a duration); NaN / Inf were refused when the file was read. Returns
  {kind: {"count": n, "first": "where: what"}} for the kinds of ANOMALIES present."""
  known = gt_t.known_classes or frozenset(gt_t.classes)
  for i, label in enumerate(res_t.label):
    if label not in known:
      raise WstalError(f"{res_t.where(i)}: label {label!r} is not a class of the ground truth "
                       f"{gt_t.source} (classes: {', '.join(sorted(known)[:8])}"
                       f"{', ...' if len(known) > 8 else ''})")
  for i in np.flatnonzero(np.minimum(res_t.start, res_t.end) < -OUTSIDE_TOLERANCE_S):
    raise WstalError(f"{res_t.where(i)}: segment [{res_t.start[i]}, {res_t.end[i]}] lies "
                     "before the start of the video")
  for i, (v, s, e) in enumerate(zip(res_t.video, res_t.start, res_t.end)):
    d = gt_t.durations.get(v)
    if d is not None and max(s, e) > d + OUTSIDE_TOLERANCE_S:
      raise WstalError(f"{res_t.where(i)}: segment [{s}, {e}] lies past the end of the video "
                       f"({d} s in {gt_t.source})")
  gt_videos = set(gt_t.videos)
  with_gt = set(gt_t.classes)
  masks = {
      "inverted_segment": res_t.end < res_t.start,
      "video_without_ground_truth": np.array([v not in gt_videos for v in res_t.video], bool),
      "class_without_ground_truth": np.array([c not in with_gt for c in res_t.label], bool),
  }
  out = {}
  for kind, mask in masks.items():
    if mask.any():
      i = int(np.argmax(mask))
      example = {"inverted_segment": f"segment [{res_t.start[i]}, {res_t.end[i]}]",
                 "video_without_ground_truth": f"video {res_t.video[i]!r}",
                 "class_without_ground_truth": f"label {res_t.label[i]!r}"}[kind]
      out[kind] = {"count": int(mask.sum()), "first": f"{res_t.where(i)}: {example}"}
  return out


def evaluate_detections(gt, results, tiou_thresholds=metrics.THUMOS14_TIOU, *,
                        subset: str | None = None, per_class: bool = False,
                        diagnostics: dict | None = None, anomalies: dict | None = None) -> dict:
  """Detection mAP of `results` against `gt`, in PERCENT.

  Args:
    gt: `database`-format dict, or a results_io.GroundTruthTable.
    results: results-format dict, or a results_io.ResultsTable.
    tiou_thresholds: K thresholds (keys are rounded to two decimals, so they must differ there).
    subset: only ground-truth videos with this `subset` (dict input only; None: all).
    per_class: also return "AP@0.50/<class>" entries.
    anomalies: check_results' answer when the caller already checked the predictions (in
      seconds, before a protocol moved them to snippets); None: checked here.
    diagnostics: if a dict is given, it is filled with num_predictions and `anomalies`
      (check_results), plus the older counts num_ignored_label (class without ground truth in
      the subset), num_on_unknown_videos (predictions on videos absent from the chosen ground
      truth: false positives) and unknown_videos.

  Returns:
    {"mAP@0.10": ..., ..., "average_mAP": ...} (+ per-class AP), floats in percent.
  """
  gt_t = gt if isinstance(gt, results_io.GroundTruthTable) else results_io.ground_truth_table(
      gt, subset)
  res_t = results if isinstance(results, results_io.ResultsTable) else (
      results_io.results_table(results))
  thr_K = [float(t) for t in np.asarray(tiou_thresholds, np.float64).reshape(-1)]
  keys = [metric_key(t) for t in thr_K]
  if not thr_K or len(set(keys)) != len(keys):
    raise WstalError(f"tIoU thresholds {thr_K} must be non-empty and distinct at two decimals")
  if anomalies is None:
    anomalies = check_results(gt_t, res_t)
  index = {c: i for i, c in enumerate(gt_t.classes)}
  pred_label = np.array([index.get(c, -1) for c in res_t.label], np.int64)
  ignored = pred_label < 0
  if diagnostics is not None:
    gt_videos = set(gt_t.videos)
    unknown = np.array([v not in gt_videos for v in res_t.video], bool) & ~ignored
    diagnostics.update(
        num_predictions=int(len(pred_label)), num_ignored_label=int(ignored.sum()),
        num_on_unknown_videos=int(unknown.sum()),
        unknown_videos=len(set(res_t.video[unknown].tolist())), anomalies=anomalies)
  map_K, ap_KxC = metrics.detection_map(
      {"video": gt_t.video, "label": gt_t.label, "start": gt_t.start, "end": gt_t.end},
      {"video": res_t.video, "label": pred_label, "score": res_t.score, "start": res_t.start,
       "end": res_t.end},
      thr_K, num_classes=len(gt_t.classes))
  out = {k: float(100.0 * m) for k, m in zip(keys, map_K)}
  out["average_mAP"] = float(100.0 * np.mean(map_K))
  if per_class:
    for k, ap_C in zip(keys, ap_KxC):
      for c, ap in zip(gt_t.classes, ap_C):
        out[f"AP{k[3:]}/{c}"] = float(100.0 * ap)
  return out


def parse_tiou(text: str) -> list[float]:
  """'0.1,0.2', 'start:step:stop' (inclusive), 'thumos14' or 'activitynet' -> thresholds.

  WstalError when malformed.
  """
  text = text.strip()
  named = {"thumos14": metrics.THUMOS14_TIOU, "activitynet": metrics.ACTIVITYNET_TIOU}
  if text.lower() in named:
    return list(named[text.lower()])
  try:
    if ":" in text:
      start, step, stop = (float(x) for x in text.split(":"))
      if step <= 0 or stop < start:
        raise ValueError
      n = int(np.floor((stop - start) / step + 1e-9)) + 1
      values = [round(start + i * step, 10) for i in range(n)]
    else:
      values = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise WstalError(f"--tiou={text!r}: expected a comma list (0.1,0.3,0.5), "
                     "start:step:stop (0.1:0.1:0.7), thumos14 or activitynet") from None
  if not values or any(not 0.0 < v <= 1.0 for v in values):
    raise WstalError(f"--tiou={text!r}: thresholds must lie in (0, 1]")
  return values


def format_table(metrics_dict: dict, thresholds) -> str:
  """One line per threshold and the average, percent with two decimals."""
  lines = [f"{metric_key(t):<12s} {metrics_dict[metric_key(t)]:6.2f}" for t in thresholds]
  lines.append(f"{'average_mAP':<12s} {metrics_dict['average_mAP']:6.2f}")
  return "\n".join(lines)


def _parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.evaluate_results",
      description="Detection mAP (percent) of an ActivityNet-format results JSON against a "
                  "ground truth (official ActivityNet algorithm, or the W-TALC family's "
                  "protocol).")
  p.add_argument("--ground_truth", required=True,
                 help="ground-truth JSON (ActivityNet 'database' format), dataset directory, "
                      "or (--protocol=wtalc) a W-TALC annotation folder")
  p.add_argument("--results", required=True, help="results JSON (ActivityNet format, seconds)")
  p.add_argument("--protocol", default="official", choices=protocols.PROTOCOLS,
                 help="official: ActivityNet's algorithm on seconds (default); wtalc: the "
                      "W-TALC / CO2-Net family's (snippet-rounded ground truth, ambiguous "
                      "filter)")
  p.add_argument("--subset", default=None,
                 help="only ground-truth videos of this subset (default: all; for a dataset "
                      "directory or a W-TALC folder: the split, default test)")
  p.add_argument("--fps", type=float, default=25.0,
                 help="--protocol=wtalc with a W-TALC folder: frame rate of the features")
  p.add_argument("--snippet_frames", type=float, default=16.0,
                 help="--protocol=wtalc with a W-TALC folder: frames per snippet")
  p.add_argument("--tiou", default="0.1:0.1:0.7",
                 help="comma list, start:step:stop (inclusive), 'thumos14' (= 0.1:0.1:0.7, "
                      "the default) or 'activitynet' (= 0.5:0.05:0.95)")
  p.add_argument("--output", default=None, help="write the metrics as JSON here (percent)")
  p.add_argument("--per_class", action="store_true", help="also print per-class AP")
  return p


def _is_wtalc_folder(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "videoname.npy"))


def load_ground_truth(path: str, protocol: str, subset: str | None, *, fps: float = 25.0,
                      snippet_frames: float = 16.0):
  """(GroundTruthTable in seconds, ambiguous {video: [M, 2] s}, fps, snippet_frames, test-set
  description) of a ground-truth JSON, a dataset directory or a W-TALC annotation folder."""
  if _is_wtalc_folder(path):
    split = subset or "test"
    gt_t, ambiguous = protocols.wtalc_folder_ground_truth(path, split)
    return gt_t, ambiguous, fps, snippet_frames, f"W-TALC annotation folder, split {split}"
  if os.path.isdir(path):
    from wstal_jax.data import format as data_format   # pylint: disable=import-outside-toplevel
    split = subset or "test"
    gt = results_io.ground_truth_from_dataset(path, splits=(split,))
    gt_t = results_io.ground_truth_table(gt, split, source=path)
    manifest = data_format.read_manifest(path)
    ambiguous = {v.name: v.ambiguous.astype(np.float64)
                 for v in data_format.read_video_info(path, split) if len(v.ambiguous)}
    # float32 in the shards: the shortest decimal gives back the annotation's own value
    ambiguous = {k: np.vectorize(results_io.short_float, otypes=[np.float64])(a)
                 for k, a in ambiguous.items()}
    return (gt_t, ambiguous, float(manifest["fps"]), float(manifest["snippet_frames"]),
            f"dataset directory, split {split}")
  if protocol == "wtalc":
    raise WstalError(f"--ground_truth={path}: --protocol=wtalc needs the W-TALC annotation "
                     "folder (Thumos14reduced-Annotations: segments and Ambiguous_test.txt) or "
                     "a dataset directory; a ground-truth JSON has no ambiguous segments")
  gt_t = results_io.ground_truth_table(results_io.load_json(path), subset, source=path)
  return gt_t, {}, fps, snippet_frames, (f"ground-truth JSON, subset {subset}" if subset
                                         else "ground-truth JSON, every video")


@cli_main
def main(argv=None):
  args = _parser().parse_args(argv)
  thresholds = parse_tiou(args.tiou)
  gt_t, ambiguous, fps, frames, described = load_ground_truth(
      args.ground_truth, args.protocol, args.subset, fps=args.fps,
      snippet_frames=args.snippet_frames)
  res_t = results_io.results_table(results_io.load_json(args.results), source=args.results)
  dropped = None
  if args.protocol == "wtalc":
    gt_t, res_scored, dropped = protocols.to_wtalc(gt_t, res_t, ambiguous=ambiguous, fps=fps,
                                                   snippet_frames=frames)
    anomalies = check_results(gt_t, res_t)   # in seconds, against the videos scored
  else:
    res_scored, anomalies = res_t, None
  diag = {}
  out = evaluate_detections(gt_t, res_scored, thresholds, per_class=args.per_class,
                            diagnostics=diag, anomalies=anomalies)
  anomalies = diag["anomalies"]
  print(f"protocol {args.protocol}: {described}; ground truth {len(gt_t.videos)} videos with "
        f"{len(gt_t.label)} instances of {len(gt_t.classes)} classes; results "
        f"{len(res_t.score)} predictions on {len(set(res_t.video.tolist()))} videos"
        + (f", {dropped} dropped by the ambiguous filter" if dropped is not None else ""),
        file=sys.stderr)
  for kind, entry in anomalies.items():
    print(f"warning: {entry['count']} {ANOMALIES[kind]}; first: {entry['first']}",
          file=sys.stderr)
  print(format_table(out, thresholds))
  if args.per_class:
    width = max(len(c) for c in gt_t.classes) if gt_t.classes else 5
    print(f"{'AP (%)':<{width}s} " + " ".join(f"{t:6.2f}" for t in thresholds))
    for c in gt_t.classes:
      print(f"{c:<{width}s} " + " ".join(f"{out[f'AP@{t:.2f}/{c}']:6.2f}" for t in thresholds))
  if args.output:
    summary = {metric_key(t): out[metric_key(t)] for t in thresholds}
    summary["average_mAP"] = out["average_mAP"]
    summary.update(protocol=args.protocol, ground_truth=described,
                   num_gt_videos=len(gt_t.videos), num_predictions=int(len(res_t.score)),
                   anomalies=anomalies)
    if dropped is not None:
      summary["num_dropped_ambiguous"] = dropped
    results_io.write_json_atomic(args.output, summary, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
