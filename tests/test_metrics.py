"""Detection mAP (official ActivityNet algorithm) and video classification metrics.

Hand-computed cases with exact APs, then agreement with an independent brute-force
transcription of the official `compute_average_precision_detection` (Python loops, pandas-free,
same `argsort()[::-1]` tie orders) on random predictions against the real THUMOS14 test
annotations.
"""
import numpy as np
import pytest

from wstal_jax import metrics
from wstal_jax import results_io
from wstal_jax.evaluate_results import evaluate_detections
from wstal_jax.errors import WstalError


def table(rows, with_score=False):
  """rows of (video, label, start, end[, score]) -> dict of arrays."""
  keys = ["video", "label", "start", "end"] + (["score"] if with_score else [])
  if not rows:
    return {k: np.zeros(0, object if k == "video" else float) for k in keys}
  cols = list(zip(*rows))
  return {k: np.array(c, object if k == "video" else None) for k, c in zip(keys, cols)}


def ap_of(gt_rows, pred_rows, thr, num_classes=1):
  map_k, ap_kc = metrics.detection_map(table(gt_rows), table(pred_rows, True), thr, num_classes)
  return map_k, ap_kc


# ------------------------------------------------------------------------ brute force


def brute_force_ap(gt, pred, thresholds, num_classes):
  """Straight transcription of the official evaluator, class by class, with Python loops."""
  thresholds = list(thresholds)
  ap_all = np.full((len(thresholds), num_classes), np.nan)
  for cidx in range(num_classes):
    g_rows = [i for i in range(len(gt["label"])) if gt["label"][i] == cidx]
    if not g_rows:
      continue
    p_rows = [i for i in range(len(pred["label"])) if pred["label"][i] == cidx]
    ap = np.zeros(len(thresholds))
    if p_rows:
      npos = float(len(g_rows))
      lock_gt = np.ones((len(thresholds), len(g_rows))) * -1
      scores = np.array([pred["score"][i] for i in p_rows], dtype=float)
      sort_idx = scores.argsort()[::-1]
      p_sorted = [p_rows[i] for i in sort_idx]
      tp = np.zeros((len(thresholds), len(p_sorted)))
      fp = np.zeros((len(thresholds), len(p_sorted)))
      gt_by_video = {}
      for local, g in enumerate(g_rows):
        gt_by_video.setdefault(gt["video"][g], []).append(local)
      for idx, p in enumerate(p_sorted):
        if pred["video"][p] not in gt_by_video:
          fp[:, idx] = 1
          continue
        this_gt = gt_by_video[pred["video"][p]]
        seg = np.array([[gt["start"][g_rows[j]], gt["end"][g_rows[j]]] for j in this_gt])
        tt1 = np.maximum(pred["start"][p], seg[:, 0])
        tt2 = np.minimum(pred["end"][p], seg[:, 1])
        inter = (tt2 - tt1).clip(0)
        union = (seg[:, 1] - seg[:, 0]) + (pred["end"][p] - pred["start"][p]) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
          tiou_arr = inter.astype(float) / union
        tiou_sorted_idx = tiou_arr.argsort()[::-1]
        for tidx, tiou_thr in enumerate(thresholds):
          for jdx in tiou_sorted_idx:
            if tiou_arr[jdx] < tiou_thr:
              fp[tidx, idx] = 1
              break
            if lock_gt[tidx, this_gt[jdx]] >= 0:
              continue
            tp[tidx, idx] = 1
            lock_gt[tidx, this_gt[jdx]] = idx
            break
          if fp[tidx, idx] == 0 and tp[tidx, idx] == 0:
            fp[tidx, idx] = 1
      tp_cumsum = np.cumsum(tp, axis=1).astype(float)
      fp_cumsum = np.cumsum(fp, axis=1).astype(float)
      recall = tp_cumsum / npos
      precision = tp_cumsum / (tp_cumsum + fp_cumsum)
      for tidx in range(len(thresholds)):
        mprec = np.hstack([[0], precision[tidx], [0]])
        mrec = np.hstack([[0], recall[tidx], [1]])
        for i in range(len(mprec) - 1)[::-1]:
          mprec[i] = max(mprec[i], mprec[i + 1])
        i2 = np.where(mrec[1::] != mrec[0:-1])[0] + 1
        ap[tidx] = np.sum((mrec[i2] - mrec[i2 - 1]) * mprec[i2])
    ap_all[:, cidx] = ap
  return ap_all


# ------------------------------------------------------------------- hand-computed cases


def test_perfect_and_exact_threshold():
  gt = [("a", 0, 0.0, 10.0)]
  # tIoU of [0, 5] with [0, 10] is exactly 5 / 10 = 0.5: "not below" 0.5, below 0.55.
  m, ap = ap_of(gt, [("a", 0, 0.0, 5.0, 0.9)], [0.5, 0.55])
  np.testing.assert_array_equal(ap[:, 0], [1.0, 0.0])
  # 3 / 10 == 0.3 in floating point too, so a threshold of 0.3 matches.
  m, ap = ap_of(gt, [("a", 0, 0.0, 3.0, 0.9)], [0.3])
  assert ap[0, 0] == 1.0


def test_duplicate_detections_of_one_instance():
  gt = [("a", 0, 0.0, 10.0), ("a", 0, 20.0, 30.0)]
  pred = [("a", 0, 0.0, 10.0, 0.9), ("a", 0, 0.0, 10.0, 0.8), ("a", 0, 20.0, 30.0, 0.7)]
  # tp = [1, 0, 1]: precision [1, 1/2, 2/3], recall [1/2, 1/2, 1]
  # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
  _, ap = ap_of(gt, pred, [0.5])
  assert ap[0, 0] == pytest.approx(5 / 6, abs=1e-15)


def test_ties_in_score_follow_argsort_reversed():
  gt = [("a", 0, 0.0, 10.0)]
  pred = [("a", 0, 20.0, 30.0, 0.5), ("a", 0, 0.0, 10.0, 0.5)]  # FP first, TP second
  order = np.array([0.5, 0.5]).argsort()[::-1]
  # If the TP (row 1) ranks first: precision [1, 1/2] -> AP 1; else [0, 1/2] -> AP 1/2.
  expected = 1.0 if order[0] == 1 else 0.5
  _, ap = ap_of(gt, pred, [0.5])
  assert ap[0, 0] == expected
  np.testing.assert_array_equal(
      ap, brute_force_ap(table(gt), table(pred, True), [0.5], 1))


def test_class_without_predictions_scores_zero_and_class_without_gt_is_ignored():
  gt = [("a", 0, 0.0, 10.0), ("b", 1, 0.0, 10.0)]
  pred = [("a", 0, 0.0, 10.0, 0.9), ("a", 2, 0.0, 10.0, 0.9)]  # class 2 has no ground truth
  m, ap = ap_of(gt, pred, [0.5, 0.7], num_classes=3)
  np.testing.assert_array_equal(ap[:, 0], [1.0, 1.0])
  np.testing.assert_array_equal(ap[:, 1], [0.0, 0.0])
  assert np.isnan(ap[:, 2]).all()
  np.testing.assert_array_equal(m, [0.5, 0.5])


def test_prediction_on_video_without_that_class_is_false_positive():
  gt = [("a", 0, 0.0, 10.0), ("b", 1, 0.0, 10.0)]
  pred = [("b", 0, 0.0, 10.0, 0.9), ("a", 0, 0.0, 10.0, 0.8),
          ("c", 0, 0.0, 10.0, 0.85)]  # video c is not in the ground truth at all
  # ranked: b (FP), c (FP), a (TP): precision [0, 0, 1/3], recall [0, 0, 1] -> AP 1/3
  _, ap = ap_of(gt, pred, [0.5], num_classes=2)
  assert ap[0, 0] == pytest.approx(1 / 3, abs=1e-15)


def test_zero_length_ground_truth():
  gt = [("a", 0, 5.0, 5.0), ("a", 0, 10.0, 20.0)]
  pred = [("a", 0, 4.0, 6.0, 0.9), ("a", 0, 10.0, 20.0, 0.8)]
  # the zero-length instance has tIoU 0 with everything of positive length: FP, TP;
  # precision [0, 1/2], recall [0, 1/2] -> AP 1/4 (npos counts the zero-length instance)
  _, ap = ap_of(gt, pred, [0.1, 0.5])
  np.testing.assert_array_equal(ap[:, 0], [0.25, 0.25])
  # A zero-length prediction on it is 0/0 = NaN, which the official code never finds "below
  # the threshold", so it matches.
  _, ap = ap_of([("a", 0, 5.0, 5.0)], [("a", 0, 5.0, 5.0, 0.9)], [0.5, 0.9])
  np.testing.assert_array_equal(ap[:, 0], [1.0, 1.0])


def test_locks_are_per_threshold_and_visit_gt_by_descending_iou():
  gt = [("a", 0, 0.0, 10.0)]
  pred = [("a", 0, 0.0, 6.0, 0.9), ("a", 0, 0.0, 10.0, 0.8)]
  # t=0.5: first (IoU .6) matches, second FP -> AP 1; t=0.7: first FP, second TP -> AP 1/2
  _, ap = ap_of(gt, pred, [0.1, 0.5, 0.7])
  np.testing.assert_array_equal(ap[:, 0], [1.0, 1.0, 0.5])
  gt = [("a", 0, 0.0, 10.0), ("a", 0, 8.0, 18.0)]
  pred = [("a", 0, 0.0, 10.0, 0.9), ("a", 0, 1.0, 11.0, 0.8)]
  # second prediction: best GT (IoU 9/11) locked -> next GT has IoU 3/17 = 0.176:
  # TP at 0.1 (AP 1), FP at 0.5 (precision [1, 1/2], recall [1/2, 1/2] -> AP 1/2)
  _, ap = ap_of(gt, pred, [0.1, 0.5])
  np.testing.assert_array_equal(ap[:, 0], [1.0, 0.5])


def test_ties_in_tiou_follow_argsort_reversed():
  gt = [("a", 0, 0.0, 10.0), ("a", 0, 10.0, 20.0)]
  pred = [("a", 0, 5.0, 15.0, 0.9),   # tIoU 1/3 with both instances: the tie decides
          ("a", 0, 0.0, 10.0, 0.8), ("a", 0, 10.0, 20.0, 0.7)]
  first = np.array([5 / 15, 5 / 15]).argsort()[::-1][0]
  # first takes instance 1: tp [1, 1, 0] -> AP 1; takes instance 0: tp [1, 0, 1] -> AP 5/6
  expected = 1.0 if first == 1 else 5 / 6
  _, ap = ap_of(gt, pred, [0.3])
  assert ap[0, 0] == pytest.approx(expected, abs=1e-15)
  np.testing.assert_array_equal(ap, brute_force_ap(table(gt), table(pred, True), [0.3], 1))


def test_empty_inputs():
  m, ap = ap_of([("a", 0, 0.0, 10.0)], [], [0.5])
  np.testing.assert_array_equal(ap, [[0.0]])
  m, ap = metrics.detection_map(table([]), table([], True), [0.5], 2)
  assert np.isnan(m).all() and np.isnan(ap).all()


def test_segment_iou_and_interpolated_ap():
  iou = metrics.segment_iou([0.0, 10.0], [10.0, 20.0], [5.0], [15.0])
  np.testing.assert_allclose(iou, [[5 / 15, 5 / 15]])
  # precision [1, 1/2, 2/3], recall [1/2, 1/2, 1] -> 5/6
  ap = metrics.interpolated_ap([[1.0, 0.5, 2 / 3]], [[0.5, 0.5, 1.0]])
  assert ap[0] == pytest.approx(5 / 6)


# --------------------------------------------------------------- against brute force


def _random_predictions(rng, gt, videos, num_classes, per_video, score_decimals):
  rows = []
  by_video = {}
  for i, v in enumerate(gt["video"]):
    by_video.setdefault(v, []).append(i)
  for v in videos:
    idx = by_video.get(v, [])
    for _ in range(per_video):
      if idx and rng.random() < 0.6:
        g = idx[rng.integers(len(idx))]
        length = gt["end"][g] - gt["start"][g]
        s = gt["start"][g] + rng.normal(0, 0.25) * (length + 0.3)
        e = gt["end"][g] + rng.normal(0, 0.25) * (length + 0.3)
        c = gt["label"][g] if rng.random() < 0.85 else rng.integers(num_classes)
        if rng.random() < 0.05:  # exact copy: duplicates and exact-IoU cases
          s, e = gt["start"][g], gt["end"][g]
      else:
        s = rng.uniform(0, 300)
        e = s + rng.gamma(2.0, 2.5)
        c = rng.integers(num_classes)
      s, e = min(s, e), max(s, e)
      rows.append((v, int(c), float(s), float(e), float(np.round(rng.random(), score_decimals))))
  rows.append(("not_a_video", 0, 1.0, 5.0, 0.5))
  return table(rows, True)


def _thumos_gt_json(shared_data):
  gt = results_io.ground_truth_table(
      results_io.load_json(shared_data / "thumos14" / "gt.json"), subset="test")
  return gt, {"video": gt.video, "label": gt.label, "start": gt.start, "end": gt.end}


def _thumos_wtalc(shared_data):
  """The W-TALC annotation arrays (212 test videos incl. the known defects)."""
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  load = lambda n: np.load(ann / n, allow_pickle=True, encoding="bytes")
  dec = lambda x: x.decode() if isinstance(x, bytes) else str(x)
  classes = [dec(c) for c in load("classlist.npy")]
  index = {c: i for i, c in enumerate(classes)}
  rows, videos = [], []
  for name, sub, segs, labs in zip(load("videoname.npy"), load("subset.npy"),
                                   load("segments.npy"), load("labels.npy")):
    if dec(sub) != "test":
      continue
    videos.append(dec(name))
    for (s, e), lab in zip(segs, labs):
      rows.append((dec(name), index[dec(lab)], float(s), float(e)))
  return classes, videos, table(rows)


@pytest.mark.parametrize("seed,score_decimals", [(0, 1), (1, 3), (2, 16)])
def test_agrees_with_brute_force_on_thumos14_gt_json(shared_data, seed, score_decimals):
  gt_t, gt = _thumos_gt_json(shared_data)
  assert (len(gt_t.videos), len(gt_t.label), len(gt_t.classes)) == (210, 3311, 20)
  rng = np.random.default_rng(seed)
  pred = _random_predictions(rng, gt, gt_t.videos, 20, 12, score_decimals)
  for thr in (metrics.THUMOS14_TIOU, metrics.ACTIVITYNET_TIOU):
    m, ap = metrics.detection_map(gt, pred, thr, 20)
    ref = brute_force_ap(gt, pred, thr, 20)
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m, ref.mean(axis=1), rtol=0, atol=1e-12)


def test_agrees_with_brute_force_on_thumos14_wtalc_annotations(shared_data):
  classes, videos, gt = _thumos_wtalc(shared_data)
  assert len(videos) == 212 and len(gt["label"]) == 3358
  rng = np.random.default_rng(7)
  pred = _random_predictions(rng, gt, videos, len(classes), 10, 2)
  m, ap = metrics.detection_map(gt, pred, metrics.THUMOS14_TIOU, len(classes))
  ref = brute_force_ap(gt, pred, metrics.THUMOS14_TIOU, len(classes))
  np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)


def test_real_co2net_proposals_pinned(shared_data):
  """CO2-Net's released base proposals against THUMOS14 gt.json: brute force and a pinned value."""
  gt_t, gt = _thumos_gt_json(shared_data)
  res = results_io.results_table(results_io.load_json(
      shared_data / "thumos14" / "proposals_co2net" / "detection_result_base_test.json"))
  index = {c: i for i, c in enumerate(gt_t.classes)}
  pred = {"video": res.video, "label": np.array([index[c] for c in res.label]),
          "score": res.score, "start": res.start, "end": res.end}
  m, ap = metrics.detection_map(gt, pred, metrics.THUMOS14_TIOU, 20)
  np.testing.assert_allclose(ap, brute_force_ap(gt, pred, metrics.THUMOS14_TIOU, 20),
                             rtol=0, atol=1e-12)
  np.testing.assert_allclose(100 * m, [69.0908, 63.1278, 54.2449, 44.5892, 33.9444, 23.2795,
                                       12.4661], atol=5e-4)


def test_every_file_the_official_code_scores_is_scored_as_it_scores_it(shared_data):
  """Issue 15: random predictions against the real THUMOS14 test annotations, including
  segments that end before they start (one of them with a zero union: 0/0 = NaN, which the
  official code matches) and predictions on videos without ground truth: the whole
  `evaluate_detections` path (results dict -> table -> checks -> mAP) equals the brute-force
  transcription of the official loop to 1e-9 (percent)."""
  gt_json = results_io.load_json(shared_data / "thumos14" / "gt.json")
  gt_t, gt = _thumos_gt_json(shared_data)
  rng = np.random.default_rng(11)
  pred = _random_predictions(rng, gt, gt_t.videos, 20, 10, 3)
  n = len(pred["score"])
  flip = rng.random(n) < 0.1                          # inverted segments
  pred["start"], pred["end"] = (np.where(flip, pred["end"], pred["start"]),
                                np.where(flip, pred["start"], pred["end"]))
  # within the video (up to the 1 s tolerance before 0; gt.json has no durations)
  pred["start"], pred["end"] = np.maximum(pred["start"], -0.9), np.maximum(pred["end"], -0.9)
  # zero union: a prediction of length -L on a ground truth of length L
  g = 0
  pred = {k: np.append(v, x) for (k, v), x in zip(pred.items(), (
      gt["video"][g], gt["label"][g], gt["end"][g] + 3.0,
      gt["end"][g] + 3.0 - (gt["end"][g] - gt["start"][g]), 0.999))}
  extra_videos = ["video_test_9999990", "video_test_9999991"]   # no ground truth anywhere
  pred = {k: np.concatenate([v, np.array(x, v.dtype)]) for (k, v), x in zip(pred.items(), (
      extra_videos, [1, 2], [3.0, 10.0], [8.0, 12.0], [0.95, 0.5]))}
  results = {"results": {}}
  for v, c, s, e, sc in zip(pred["video"], pred["label"], pred["start"], pred["end"],
                            pred["score"]):
    if v == "not_a_video":
      v = "video_test_9999992"
    results["results"].setdefault(v, []).append(
        {"label": gt_t.classes[int(c)], "score": float(sc), "segment": [float(s), float(e)]})
  table = results_io.results_table(results)
  assert (table.end < table.start).sum() > 50
  diag = {}
  for thr in (metrics.THUMOS14_TIOU, metrics.ACTIVITYNET_TIOU):
    out = evaluate_detections(gt_json, results, thr, subset="test", diagnostics=diag)
    ref = brute_force_ap(gt, {"video": table.video, "label": np.array(
        [gt_t.classes.index(c) for c in table.label]), "score": table.score,
        "start": table.start, "end": table.end}, thr, 20)
    got = np.array([out[f"mAP@{t:.2f}"] for t in thr])
    assert np.max(np.abs(got - 100 * ref.mean(axis=1))) < 1e-9
    assert abs(out["average_mAP"] - 100 * ref.mean()) < 1e-9
  assert diag["anomalies"]["inverted_segment"]["count"] == int((table.end < table.start).sum())
  assert diag["anomalies"]["video_without_ground_truth"]["count"] == 3
  # The zero-union row matched (NaN is never below a threshold): it is a true positive.
  assert brute_force_ap(gt, {"video": np.array([gt["video"][g]], object),
                             "label": np.array([gt["label"][g]]), "score": np.array([1.0]),
                             "start": np.array([gt["end"][g] + 3.0]),
                             "end": np.array([gt["start"][g] + 3.0])},
                        [0.5], 20)[0, gt["label"][g]] > 0


@pytest.mark.parametrize("row,match", [
    ({"label": "Dive", "score": 0.5, "segment": [1, 2]},
     r"r.json: results\['a'\]\[1\]: label 'Dive' is not a class of the ground truth"),
    ({"label": "Jump", "score": 0.5, "segment": [-1.5, 2]},
     r"results\['a'\]\[1\]: segment \[-1.5, 2.0\] lies before the start of the video"),
    ({"label": "Jump", "score": 0.5, "segment": [3, 11.5]},
     r"results\['a'\]\[1\]: segment \[3.0, 11.5\] lies past the end of the video \(10.0 s"),
    ({"label": "Jump", "score": float("nan"), "segment": [1, 2]},
     r"results\['a'\]\[1\]\.score: not finite"),
    ({"label": "Jump", "score": 0.5, "segment": [1, float("inf")]},
     r"results\['a'\]\[1\]\.segment: not finite"),
])
def test_what_the_official_code_scores_oddly_is_one_error(row, match):
  gt = {"database": {"a": {"subset": "test", "duration": 10.0, "annotations": [
      {"segment": [0, 5], "label": "Jump"}]}, "b": {"subset": "train", "annotations": [
          {"segment": [0, 5], "label": "Run"}]}}}
  res = {"results": {"a": [{"label": "Jump", "score": 0.9, "segment": [0, 5]}, row]}}
  with pytest.raises(WstalError, match=match):
    evaluate_detections(gt, results_io.results_table(res, source="r.json"), [0.5],
                        subset="test")
  # A class known to the file but without instances in the subset is counted and left out;
  # a segment within the tolerance past the end is scored.
  ok = {"results": {"a": [{"label": "Run", "score": 0.9, "segment": [0, 5]},
                          {"label": "Jump", "score": 0.8, "segment": [0, 10.9]}]}}
  diag = {}
  out = evaluate_detections(gt, ok, [0.5], subset="test", diagnostics=diag)
  assert out["mAP@0.50"] == 0.0   # [0, 10.9] vs [0, 5]: tIoU 0.46
  assert diag["anomalies"] == {"class_without_ground_truth": {
      "count": 1, "first": "results: results['a'][0]: label 'Run'"}}


def test_evaluate_detections_percent_keys_and_label_checks():
  gt = {"database": {"a": {"subset": "test", "annotations": [
      {"segment": ["0", "10"], "label": "Jump"}]},
                     "b": {"subset": "train", "annotations": [
                         {"segment": [0, 10], "label": "Run"}]}}}
  res = {"results": {"a": [{"label": "Jump", "score": 0.9, "segment": [0, 5]},
                           {"label": "Run", "score": 0.9, "segment": [0, 5]}]}}
  diag = {}
  out = evaluate_detections(gt, res, [0.5, 0.55], subset="test", diagnostics=diag)
  assert out == {"mAP@0.50": 100.0, "mAP@0.55": 0.0, "average_mAP": 50.0}
  assert diag["num_ignored_label"] == 1
  out = evaluate_detections(gt, res, [0.5])  # all videos: class Run has no prediction -> 0
  assert out["mAP@0.50"] == 50.0
  with pytest.raises(WstalError, match="label 'x' is not a class of the ground truth"):
    evaluate_detections(gt, {"results": {"a": [{"label": "x", "score": 1, "segment": [0, 1]}]}})
  with pytest.raises(WstalError, match="subset"):
    evaluate_detections(gt, res, subset="validation")


# ------------------------------------------------------------------------ classification


def test_classification_map_hand_computed():
  scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6], [0.3, 0.2]])
  labels = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
  # class 0 ranking: v0 (+), v1, v3, v2 (+): precisions at positives 1, 2/4 -> AP 0.75
  # class 1 ranking: v1 (+), v2, v3, v0: AP 1
  assert metrics.classification_map(scores, labels) == pytest.approx(0.875)
  # a class without positives is left out of the mean
  assert metrics.classification_map(np.c_[scores, [0.5, 0.1, 0.2, 0.3]],
                                    np.c_[labels, np.zeros(4)]) == pytest.approx(0.875)


def test_top1_accuracy_over_labelled_videos():
  scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6], [0.3, 0.2]])
  labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])  # v3 has no label: skipped
  # v0 correct, v1 wrong (argmax 0), v2 correct (argmax 1 in labels) -> 2/3
  assert metrics.top1_accuracy(scores, labels) == pytest.approx(2 / 3)
  assert np.isnan(metrics.top1_accuracy(scores, np.zeros((4, 2))))
