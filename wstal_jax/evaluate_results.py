"""Score any ActivityNet-format results JSON against any ground-truth JSON.

    python -m wstal_jax.evaluate_results --ground_truth=GT.json --results=RESULTS.json \
        [--subset=test] [--tiou=0.1,0.2,0.3] [--output=metrics.json]

GT.json is the ActivityNet `database` format (our `results_io.write_ground_truth` output, or a
peer repo's, e.g. THUMOS14's gt.json with string segments); --ground_truth may also be a
dataset directory (manifest.json), whose --subset split (default test) is used. Without
--subset every video of GT.json counts. --tiou takes a comma list, start:step:stop
(inclusive), or a protocol name: thumos14 = 0.1:0.1:0.7 (the default), activitynet =
0.5:0.05:0.95.

Prints one line per threshold and the average, in PERCENT (0-100); --output writes
{"mAP@0.10": ..., "average_mAP": ...} in percent. Predictions on videos without ground truth
count as false positives and predictions of classes without ground truth are ignored, both as
in the official ActivityNet evaluator; both are reported on stderr.

`evaluate_detections` is the function the training evaluator calls too, so numbers printed
during training and by this command come from the same code.
"""
import argparse
import os
import sys

import numpy as np

from wstal_jax import metrics
from wstal_jax import results_io
from wstal_jax.errors import WstalError, cli_main


def metric_key(tiou: float) -> str:
  """'mAP@0.10' for 0.1: the key used in printed tables and metrics.json."""
  return f"mAP@{tiou:.2f}"


def evaluate_detections(gt, results, tiou_thresholds=metrics.THUMOS14_TIOU, *,
                        subset: str | None = None, per_class: bool = False,
                        diagnostics: dict | None = None) -> dict:
  """Detection mAP of `results` against `gt`, in PERCENT.

  Args:
    gt: `database`-format dict, or a results_io.GroundTruthTable.
    results: results-format dict, or a results_io.ResultsTable.
    tiou_thresholds: K thresholds (keys are rounded to two decimals, so they must differ there).
    subset: only ground-truth videos with this `subset` (dict input only; None: all).
    per_class: also return "AP@0.50/<class>" entries.
    diagnostics: if a dict is given, it is filled with counts: num_predictions,
      num_ignored_label (class without ground truth), num_on_unknown_videos (predictions on
      videos absent from the chosen ground truth: false positives) and unknown_videos.

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
  index = {c: i for i, c in enumerate(gt_t.classes)}
  pred_label = np.array([index.get(c, -1) for c in res_t.label], np.int64)
  ignored = pred_label < 0
  if len(pred_label) and ignored.all() and gt_t.classes:
    raise WstalError(
        "no predicted label matches a ground-truth class name (results labels e.g. "
        f"{sorted(set(res_t.label))[:3]}, ground-truth classes e.g. {gt_t.classes[:3]})")
  if diagnostics is not None:
    gt_videos = set(gt_t.videos)
    unknown = np.array([v not in gt_videos for v in res_t.video], bool) & ~ignored
    diagnostics.update(
        num_predictions=int(len(pred_label)), num_ignored_label=int(ignored.sum()),
        num_on_unknown_videos=int(unknown.sum()),
        unknown_videos=len(set(res_t.video[unknown].tolist())))
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
                  "ground-truth JSON (official ActivityNet algorithm).")
  p.add_argument("--ground_truth", required=True,
                 help="ground-truth JSON (ActivityNet 'database' format) or dataset directory")
  p.add_argument("--results", required=True, help="results JSON (ActivityNet format)")
  p.add_argument("--subset", default=None,
                 help="only ground-truth videos of this subset (default: all; for a dataset "
                      "directory: the split, default test)")
  p.add_argument("--tiou", default="0.1:0.1:0.7",
                 help="comma list, start:step:stop (inclusive), 'thumos14' (= 0.1:0.1:0.7, "
                      "the default) or 'activitynet' (= 0.5:0.05:0.95)")
  p.add_argument("--output", default=None, help="write the metrics as JSON here (percent)")
  p.add_argument("--per_class", action="store_true", help="also print per-class AP")
  return p


@cli_main
def main(argv=None):
  args = _parser().parse_args(argv)
  thresholds = parse_tiou(args.tiou)
  if os.path.isdir(args.ground_truth):
    split = args.subset or "test"
    gt = results_io.ground_truth_from_dataset(args.ground_truth, splits=(split,))
    gt_t = results_io.ground_truth_table(gt, split, source=args.ground_truth)
  else:
    gt = results_io.load_json(args.ground_truth)
    gt_t = results_io.ground_truth_table(gt, args.subset, source=args.ground_truth)
  res_t = results_io.results_table(results_io.load_json(args.results), source=args.results)
  diag = {}
  out = evaluate_detections(gt_t, res_t, thresholds, per_class=args.per_class,
                            diagnostics=diag)
  print(f"ground truth: {len(gt_t.videos)} videos, {len(gt_t.label)} instances, "
        f"{len(gt_t.classes)} classes; results: {diag['num_predictions']} predictions "
        f"on {len(set(res_t.video.tolist()))} videos", file=sys.stderr)
  if diag["num_ignored_label"]:
    print(f"warning: {diag['num_ignored_label']} predictions have a label without ground "
          "truth and are ignored", file=sys.stderr)
  if diag["num_on_unknown_videos"]:
    print(f"warning: {diag['num_on_unknown_videos']} predictions on {diag['unknown_videos']} "
          "videos absent from the ground truth count as false positives", file=sys.stderr)
  print(format_table(out, thresholds))
  if args.per_class:
    width = max(len(c) for c in gt_t.classes) if gt_t.classes else 5
    print(f"{'AP (%)':<{width}s} " + " ".join(f"{t:6.2f}" for t in thresholds))
    for c in gt_t.classes:
      print(f"{c:<{width}s} " + " ".join(f"{out[f'AP@{t:.2f}/{c}']:6.2f}" for t in thresholds))
  if args.output:
    summary = {metric_key(t): out[metric_key(t)] for t in thresholds}
    summary["average_mAP"] = out["average_mAP"]
    results_io.write_json_atomic(args.output, summary, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
