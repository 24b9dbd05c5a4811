"""Evaluation protocols (wstal_jax/protocols.py): the W-TALC / CO2-Net family's evaluation,
checked on hand-made cases and, on the real CO2-Net proposal files, against an independent
transcription of that family's evaluator (written here from reading CO2-Net's
`eval/eval_detection.py` and the filter of `proposal_methods.py`: Python loops, sets of
snippet indices, `round`)."""
import json
import pathlib
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from wstal_jax import protocols
from wstal_jax import results_io
from wstal_jax.evaluate_results import evaluate_detections
from test_metrics import brute_force_ap

ROOT_DIR = pathlib.Path(__file__).resolve().parent.parent

THUMOS_TIOU = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


# ---------------------------------------------------------------------------- hand cases


def test_ground_truth_rounds_to_snippets_halves_to_even():
  # 0.32 s = 0.5 snippets -> 0 (half to even); 0.96 s = 1.5 -> 2; 1.6 s = 2.5 -> 2; exactly
  # what Python's round gives on t * 25 / 16.
  t = [0.32, 0.96, 1.6, 4.8, 8.0, 33.3]
  assert protocols.snippet_bounds(t, 25.0, 16.0).tolist() == [round(x * 25 / 16) for x in t]
  assert protocols.snippet_bounds(t, 25.0, 16.0).tolist()[:5] == [0, 2, 2, 8, 12]


@pytest.mark.parametrize("start,end,dropped", [
    (2.9, 5.9, False),   # snippets range(2, 5): meets nothing of range(5, 6)
    (2.9, 6.0, True),    # range(2, 6) holds snippet 5
    (5.5, 5.9, False),   # range(5, 5) is empty: an empty range meets nothing
    (6.0, 9.0, False),   # range(6, 9): the ambiguous range ends at 6 (exclusive)
    (-0.5, 5.2, False),  # int() truncates toward zero: range(0, 5)
])
def test_ambiguous_filter_on_snippet_ranges(start, end, dropped):
  # ambiguous [3.2 s, 3.84 s] = snippets [5, 6)
  amb = {"v": np.array([[3.2, 3.84]])}
  mask = protocols.ambiguous_mask(np.array(["v", "w"], object), np.array([start, start]),
                                  np.array([end, end]), amb, 25.0, 16.0)
  assert mask.tolist() == [dropped, False]   # only the video's own ambiguous segments count


def test_wtalc_protocol_by_hand():
  """Ground truth [0.32 s, 1.6 s] is snippets [0, 3] under wtalc; a prediction [0, 1.92 s]
  (snippets [0, 3]) matches it exactly there, while in seconds its tIoU is 0.667."""
  gt = {"database": {"v": {"subset": "test", "duration": 10.0, "annotations": [
      {"segment": [0.32, 1.6], "label": "A"}]}, "u": {"subset": "test", "annotations": []}}}
  res = {"results": {"v": [{"label": "A", "score": 0.9, "segment": [0.0, 1.92]},
                           {"label": "A", "score": 0.8, "segment": [3.2, 5.0]}],
                     "u": [{"label": "A", "score": 0.95, "segment": [0.0, 1.0]}]}}
  gt_t = results_io.ground_truth_table(gt, "test")
  res_t = results_io.results_table(res)
  gt_w, res_w, dropped = protocols.to_wtalc(gt_t, res_t, ambiguous={"v": [[3.0, 4.0]]},
                                            fps=25.0, snippet_frames=16.0)
  assert dropped == 1 and res_w.start.tolist() == [0.0, 0.0]   # the [3.2, 5.0] one is gone
  assert gt_w.videos == ["v"] and (gt_w.start.tolist(), gt_w.end.tolist()) == ([0.0], [2.0])
  official = evaluate_detections(gt_t, res_t, [0.7, 0.8])
  wtalc = evaluate_detections(gt_w, res_w, [0.7, 0.8])
  # official: the prediction on u (no ground truth) ranks first (false positive), then the
  # match at tIoU 0.667 < 0.7. wtalc: [0, 3] vs [0, 2]: tIoU 0.667 too, but precision 1/2.
  assert official == {"mAP@0.70": 0.0, "mAP@0.80": 0.0, "average_mAP": 0.0}
  assert wtalc["mAP@0.70"] == 0.0
  res2 = {"results": {"v": [{"label": "A", "score": 0.9, "segment": [0.0, 1.28]}]}}
  gt_w, res_w, _ = protocols.to_wtalc(gt_t, results_io.results_table(res2), ambiguous={},
                                      fps=25.0, snippet_frames=16.0)
  # [0, 2] snippets vs [0, 2]: exact under wtalc; [0, 1.28] vs [0.32, 1.6] s: tIoU 0.6
  assert evaluate_detections(gt_w, res_w, [0.7])["mAP@0.70"] == 100.0
  assert evaluate_detections(gt_t, results_io.results_table(res2), [0.7])["mAP@0.70"] == 0.0


# ------------------------------------------------- the family's evaluator, transcribed


def _dec(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def wtalc_reference(ann_dir, results, subset, thresholds):
  """mAP per threshold (fractions) the W-TALC / CO2-Net evaluator gives for `results`
  (seconds, ActivityNet format), from the annotation arrays and Ambiguous_test.txt."""
  load = lambda n: np.load(ann_dir / n, allow_pickle=True)
  names = [_dec(x) for x in load("videoname.npy")]
  subsets = [_dec(x) for x in load("subset.npy")]
  segments, labels = load("segments.npy"), load("labels.npy")
  classlist = [_dec(c) for c in load("classlist.npy")]
  gt = {"video": [], "label": [], "start": [], "end": []}
  for i in range(len(names)):
    if subsets[i] != subset or len(segments[i]) == 0:
      continue
    for j in range(len(segments[i])):
      gt["video"].append(names[i])
      gt["label"].append(classlist.index(_dec(labels[i][j])))
      gt["start"].append(round(segments[i][j][0] * 25 / 16))
      gt["end"].append(round(segments[i][j][1] * 25 / 16))
  amb = [line.strip("\n").split(" ") for line in open(ann_dir / "Ambiguous_test.txt")]
  pred = {"video": [], "label": [], "score": [], "start": [], "end": []}
  dropped = 0
  for video, rows in results["results"].items():
    for r in rows:
      # the family holds snippet indices: recover them exactly from the decimal seconds
      s = float(Fraction(repr(float(r["segment"][0]))) * 25 / 16)
      e = float(Fraction(repr(float(r["segment"][1]))) * 25 / 16)
      hit = False
      for a in amb:
        if a[0] == video:
          g = set(range(int(round(float(a[2]) * 25 / 16)), int(round(float(a[3]) * 25 / 16))))
          p = set(range(int(s), int(e)))
          if g | p and len(g & p) / len(g | p) > 0:
            hit = True
      if hit:
        dropped += 1
        continue
      pred["video"].append(video)
      pred["label"].append(classlist.index(r["label"]))
      pred["score"].append(float(r["score"]))
      pred["start"].append(s)
      pred["end"].append(e)
  gt = {k: np.array(v, object if k == "video" else float) for k, v in gt.items()}
  pred = {k: np.array(v, object if k == "video" else float) for k, v in pred.items()}
  ap = brute_force_ap(gt, pred, thresholds, len(classlist))
  return np.nanmean(ap, axis=1), dropped


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "wstal_jax.evaluate_results", *args],
                        cwd=ROOT_DIR, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("split,subset,name", [
    ("test", "test", "detection_result_base_test.json"),
    ("train", "validation", "detection_result_base_train.json")])
def test_wtalc_protocol_equals_the_family_on_the_real_co2net_proposals(
    shared_data, tmp_path, split, subset, name):
  """`evaluate_results --protocol=wtalc` on CO2-Net's released proposals equals the
  transcription to 1e-9; so does it with extra predictions over every ambiguous segment
  (which the filter must drop), and it differs from the official protocol."""
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  results = json.loads((shared_data / "thumos14" / "proposals_co2net" / name).read_text())
  if split == "test":   # predictions the ambiguous filter drops, and some it keeps
    for line in open(ann / "Ambiguous_test.txt"):
      video, s, e = line.split()
      if video in results["results"]:
        results["results"][video].append(
            {"label": "CliffDiving", "score": 0.99, "segment": [float(s), float(e)]})
        results["results"][video].append(
            {"label": "CliffDiving", "score": 0.98, "segment": [0.0, 0.64]})
  path = tmp_path / "results.json"
  path.write_text(json.dumps(results))
  ref, ref_dropped = wtalc_reference(ann, results, subset, THUMOS_TIOU)
  out = {}
  for protocol in ("wtalc", "official"):
    p = _cli(f"--protocol={protocol}", f"--ground_truth={ann}", f"--results={path}",
             f"--subset={split}", f"--output={tmp_path / protocol}.json")
    assert p.returncode == 0, p.stderr[-3000:]
    out[protocol] = json.loads((tmp_path / f"{protocol}.json").read_text())
  got = np.array([out["wtalc"][f"mAP@{t:.2f}"] for t in THUMOS_TIOU])
  assert np.max(np.abs(got - 100 * ref)) < 1e-9
  assert out["wtalc"]["num_dropped_ambiguous"] == ref_dropped
  assert (ref_dropped > 90) == (split == "test")
  assert out["wtalc"]["num_gt_videos"] == (212 if split == "test" else 200)
  assert abs(out["wtalc"]["average_mAP"] - out["official"]["average_mAP"]) > 0.1
