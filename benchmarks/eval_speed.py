"""How fast is detection mAP? Times `metrics.detection_map` on THUMOS14-sized inputs.

    python benchmarks/eval_speed.py [--repeats=5] [--naive] [--data=../shared/data]

Ground truth: the real THUMOS14 test annotations (gt.json, 210 videos / 3,311 instances) when
the shared data folder is found, else a synthetic stand-in with the same counts. Predictions:
synthetic, about 150 per video (jittered copies of ground truth, some with a wrong class, and
random segments; scores rounded to 3 decimals so ties occur), plus the real CO2-Net proposals
(proposals_co2net/detection_result_base_test.json) when present. Prints one row per case:
the median wall time of the vectorised evaluator over --repeats runs, and with --naive the
time of a straightforward loop transcription of the official algorithm (one run) and whether
both give identical APs. Runs on one CPU core (numpy does not thread these operations).
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wstal_jax import metrics  # noqa: E402
from wstal_jax import results_io  # noqa: E402


def _find_data(arg):
  for cand in (arg, ROOT.parent / "shared" / "data", os.environ.get("WSTAL_SHARED_DATA"),
               "/work/shared/data"):
    if cand and (pathlib.Path(cand) / "thumos14" / "gt.json").is_file():
      return pathlib.Path(cand)
  return None


def _ground_truth(data, rng):
  """(video names, gt table dict, num_classes) of THUMOS14 test or a synthetic stand-in."""
  if data is not None:
    gt = results_io.ground_truth_table(results_io.load_json(data / "thumos14" / "gt.json"),
                                       subset="test")
    table = {"video": gt.video, "label": gt.label, "start": gt.start, "end": gt.end}
    return gt.videos, table, len(gt.classes), gt.classes, "THUMOS14 test gt.json"
  videos = [f"video_{i:04d}" for i in range(210)]
  counts = rng.integers(1, 32, size=len(videos))
  video = np.repeat(np.array(videos, dtype=object), counts)
  label = np.repeat(rng.integers(0, 20, size=len(videos)), counts)
  start = rng.uniform(0, 200, size=len(video))
  end = start + rng.gamma(2.0, 2.2, size=len(video))
  return videos, {"video": video, "label": label, "start": start, "end": end}, 20, None, \
      "synthetic (THUMOS14-sized)"


def _predictions(videos, gt, num_classes, per_video, rng):
  """~per_video proposals per video: jittered ground truth (10% wrong class) + random."""
  by_video = {}
  for i, v in enumerate(gt["video"]):
    by_video.setdefault(v, []).append(i)
  cols = {k: [] for k in ("video", "label", "score", "start", "end")}
  for v in videos:
    idx = np.array(by_video.get(v, []), np.int64)
    n_jit = int(per_video * 0.6) if len(idx) else 0
    pick = rng.choice(idx, size=n_jit) if n_jit else np.zeros(0, np.int64)
    length = gt["end"][pick] - gt["start"][pick]
    s = gt["start"][pick] + rng.normal(0, 0.3, n_jit) * (length + 0.5)
    e = gt["end"][pick] + rng.normal(0, 0.3, n_jit) * (length + 0.5)
    lab = gt["label"][pick].copy()
    wrong = rng.random(n_jit) < 0.1
    lab[wrong] = rng.integers(0, num_classes, wrong.sum())
    n_rand = per_video - n_jit
    s_r = rng.uniform(0, max(gt["end"][idx].max() if len(idx) else 100.0, 10.0), n_rand)
    e_r = s_r + rng.gamma(2.0, 2.5, n_rand)
    lab_r = (gt["label"][rng.choice(idx, size=n_rand)] if len(idx)
             else rng.integers(0, num_classes, n_rand))
    start = np.concatenate([s, s_r])
    end = np.maximum(np.concatenate([e, e_r]), start)
    cols["video"] += [v] * per_video
    cols["label"].append(np.concatenate([lab, lab_r]))
    cols["score"].append(np.round(rng.random(per_video), 3))
    cols["start"].append(start)
    cols["end"].append(end)
  out = {"video": np.array(cols["video"], dtype=object)}
  for k in ("label", "score", "start", "end"):
    out[k] = np.concatenate(cols[k])
  return out


def naive_detection_ap(gt, pred, thresholds, num_classes):
  """Loop transcription of the official algorithm (reference timing), [K, C]."""
  thresholds = list(thresholds)
  ap = np.full((len(thresholds), num_classes), np.nan)
  for c in range(num_classes):
    gidx = np.flatnonzero(gt["label"] == c)
    if not len(gidx):
      continue
    ap[:, c] = 0.0
    pidx = np.flatnonzero(pred["label"] == c)
    if not len(pidx):
      continue
    pidx = pidx[pred["score"][pidx].argsort()[::-1]]
    lock = -np.ones((len(thresholds), len(gidx)))
    tp = np.zeros((len(thresholds), len(pidx)))
    fp = np.zeros((len(thresholds), len(pidx)))
    videos = {}
    for j, g in enumerate(gidx):
      videos.setdefault(gt["video"][g], []).append(j)
    for n, p in enumerate(pidx):
      js = videos.get(pred["video"][p])
      if js is None:
        fp[:, n] = 1
        continue
      g = gidx[js]
      inter = (np.minimum(pred["end"][p], gt["end"][g])
               - np.maximum(pred["start"][p], gt["start"][g])).clip(0)
      union = (gt["end"][g] - gt["start"][g]) + (pred["end"][p] - pred["start"][p]) - inter
      with np.errstate(all="ignore"):
        iou = inter / union
      for t, thr in enumerate(thresholds):
        for k in iou.argsort()[::-1]:
          if iou[k] < thr:
            fp[t, n] = 1
            break
          if lock[t, js[k]] >= 0:
            continue
          tp[t, n] = 1
          lock[t, js[k]] = n
          break
        if not tp[t, n]:
          fp[t, n] = 1
    tp_c = np.cumsum(tp, axis=1)
    fp_c = np.cumsum(fp, axis=1)
    ap[:, c] = metrics.interpolated_ap(tp_c / (tp_c + fp_c), tp_c / len(gidx))
  return ap


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median shown)")
  p.add_argument("--naive", action="store_true",
                 help="also time the loop transcription (slow) and compare APs")
  p.add_argument("--data", default=None, help="shared data folder (default: auto)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  data = _find_data(args.data)
  videos, gt, num_classes, classes, gt_name = _ground_truth(data, rng)

  cases = []
  for per_video, thr, name in ((150, metrics.THUMOS14_TIOU, "THUMOS14 protocol"),
                               (150, metrics.ACTIVITYNET_TIOU, "ActivityNet tIoU list"),
                               (600, metrics.THUMOS14_TIOU, "4x proposals")):
    cases.append((f"{name}, synthetic {per_video}/video",
                  _predictions(videos, gt, num_classes, per_video, rng), thr))
  co2 = None if data is None else data / "thumos14" / "proposals_co2net" / \
      "detection_result_base_test.json"
  if co2 is not None and co2.is_file() and classes is not None:
    res = results_io.results_table(json.loads(co2.read_text()))
    index = {c: i for i, c in enumerate(classes)}
    cases.append(("THUMOS14 protocol, CO2-Net proposals",
                  {"video": res.video, "label": np.array([index.get(c, -1) for c in res.label]),
                   "score": res.score, "start": res.start, "end": res.end},
                  metrics.THUMOS14_TIOU))

  print(f"ground truth: {gt_name}: {len(videos)} videos, {len(gt['label'])} instances, "
        f"{num_classes} classes; median of {args.repeats} runs, one CPU core")
  head = f"{'case':<44s} {'preds':>7s} {'K':>3s} {'vectorised':>11s} {'avg mAP %':>10s}"
  if args.naive:
    head += f" {'naive loop':>11s} {'identical':>9s}"
  print(head)
  print("-" * len(head))
  for name, pred, thr in cases:
    sec, (map_k, ap_kc) = _time(
        lambda pred=pred, thr=thr: metrics.detection_map(gt, pred, thr, num_classes),
        args.repeats)
    row = (f"{name:<44s} {len(pred['label']):>7d} {len(thr):>3d} {sec * 1e3:>9.1f}ms "
           f"{100 * map_k.mean():>10.2f}")
    if args.naive:
      t0 = time.perf_counter()
      ap_naive = naive_detection_ap(gt, pred, thr, num_classes)
      naive_sec = time.perf_counter() - t0
      same = np.array_equal(np.nan_to_num(ap_naive, nan=-1), np.nan_to_num(ap_kc, nan=-1))
      row += f" {naive_sec * 1e3:>9.1f}ms {str(same):>9s}"
    print(row)
  return 0


if __name__ == "__main__":
  sys.exit(main())
