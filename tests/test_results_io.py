"""Results / ground-truth JSON and scores .npz I/O, and the evaluate_results command."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from wstal_jax import evaluate_results
from wstal_jax import postprocess as pp
from wstal_jax import results_io
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASSES = ["Jump", "Run", "Swim"]


def proposals():
  return {"v1": pp.Proposals(np.array([0, 2]), np.array([0.9, 0.4]), np.array([0.0, 3.2]),
                             np.array([1.28, 5.76])),
          "v2": pp.Proposals.empty()}


def gt_dict():
  return {"database": {
      "v1": {"subset": "test", "duration": 10.0, "annotations": [
          {"segment": ["0.0", "1.3"], "label": "Jump"}, {"segment": [3.0, 6.0], "label": "Swim"}]},
      "v2": {"subset": "test", "annotations": []},
      "v3": {"subset": "train", "annotations": [{"segment": [1, 2], "label": "Run"}]}}}


def test_results_round_trip_is_atomic(tmp_path):
  path = tmp_path / "res.json"
  written = results_io.write_results(str(path), proposals(), CLASSES)
  assert sorted(os.listdir(tmp_path)) == ["res.json"]  # no temp file left behind
  res = results_io.read_results(str(path))
  assert res == written and res["version"] == "VERSION 1.3" and "external_data" in res
  assert res["results"]["v1"][1] == {"label": "Swim", "score": 0.4, "segment": [3.2, 5.76]}
  tab = results_io.results_table(res)
  assert tab.video.tolist() == ["v1", "v1"] and tab.label.tolist() == ["Jump", "Swim"]
  np.testing.assert_allclose(tab.end, [1.28, 5.76])


def test_ground_truth_table_subset_and_strings():
  tab = results_io.ground_truth_table(gt_dict(), subset="test")
  assert tab.classes == ["Jump", "Swim"] and tab.videos == ["v1", "v2"]
  np.testing.assert_allclose(tab.start, [0.0, 3.0])
  np.testing.assert_allclose(tab.end, [1.3, 6.0])
  assert tab.label.tolist() == [0, 1] and tab.durations == {"v1": 10.0}
  assert results_io.ground_truth_table(gt_dict()).classes == CLASSES


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["database"]["v1"]["annotations"][0].update(segment=[2, 1]), "ends before"),
    (lambda d: d["database"]["v1"]["annotations"][0].update(segment=["a", 1]), "number"),
    (lambda d: d["database"]["v1"]["annotations"][0].update(segment=[1]), r"\[start, end\]"),
    (lambda d: d["database"]["v1"]["annotations"][0].update(label=3), "class name"),
    (lambda d: d["database"]["v1"].pop("annotations"), "annotations"),
    (lambda d: d.pop("database"), "database"),
])
def test_bad_ground_truth_names_file_and_entry(tmp_path, mutate, match):
  d = gt_dict()
  mutate(d)
  path = tmp_path / "gt.json"
  path.write_text(json.dumps(d))
  with pytest.raises(WstalError, match=match) as e:
    results_io.read_ground_truth(str(path))
  assert str(path) in str(e.value)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"results": []}', "'results' object"),
    ('{"results": {"v": [{"label": "a", "score": "x", "segment": [0, 1]}]}}', r"\[0\]\.score"),
    ('{"results": {"v": [{"label": "a", "score": NaN, "segment": [0, 1]}]}}', "not finite"),
    ('{"results": {"v": [{"label": "a", "segment": [0, 1]}]}}', "'score'"),
])
def test_bad_results_names_file_and_entry(tmp_path, content, match):
  path = tmp_path / "r.json"
  path.write_text(content)
  with pytest.raises(WstalError, match=match) as e:
    results_io.read_results(str(path))
  assert str(path) in str(e.value)
  with pytest.raises(WstalError, match="file not found"):
    results_io.read_results(str(tmp_path / "missing.json"))


def test_real_thumos14_gt_json(shared_data):
  gt = results_io.read_ground_truth(str(shared_data / "thumos14" / "gt.json"))
  test = results_io.ground_truth_table(gt, subset="test")
  train = results_io.ground_truth_table(gt, subset="train")
  assert (len(test.videos), len(test.label), len(test.classes)) == (210, 3311, 20)
  assert (len(train.videos), len(train.label)) == (200, 3007)
  assert np.all(test.end >= test.start)
  # the CO2-Net proposals file parses too (ActivityNet results format)
  res = results_io.read_results(
      str(shared_data / "thumos14" / "proposals_co2net" / "detection_result_base_test.json"))
  assert len(res["results"]) == 212


def test_scores_npz_round_trip_and_errors(tmp_path):
  path = tmp_path / "scores.npz"
  cas = np.random.default_rng(0).random((7, 3)).astype(np.float32)
  results_io.save_scores_npz(str(path), {"v1": {"cas": cas, "actionness": cas[:, 0]},
                                         "v2": {"cas": cas[:4], "seconds_per_snippet": 0.8}},
                             seconds_per_snippet=0.64, class_names=CLASSES)
  assert sorted(os.listdir(tmp_path)) == ["scores.npz"]
  got = results_io.load_scores_npz(str(path))
  assert got["class_names"] == CLASSES and got["seconds_per_snippet"] == 0.64
  np.testing.assert_array_equal(got["videos"]["v1"]["cas"], cas)
  np.testing.assert_array_equal(got["videos"]["v1"]["actionness"], cas[:, 0])
  assert got["videos"]["v1"]["seconds_per_snippet"] == 0.64
  assert got["videos"]["v2"]["seconds_per_snippet"] == 0.8
  with open(path, "rb") as f:
    assert f.read(2) == b"PK"
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(WstalError, match="bad.npz"):
    results_io.load_scores_npz(str(bad))
  np.savez(tmp_path / "wrong.npz", seconds_per_snippet=0.64, class_names=np.array(CLASSES),
           **{"v/cas": np.zeros((3, 2))})
  with pytest.raises(WstalError, match="one column per class"):
    results_io.load_scores_npz(str(tmp_path / "wrong.npz"))


def test_ground_truth_from_dataset(tmp_path):
  fmt = pytest.importorskip("wstal_jax.data.format")
  recs = []
  for i in range(3):
    recs.append(fmt.VideoRecord(
        name=f"video_{i}", duration=10.0 + i,
        features={"i3d": np.zeros((5, 4), np.float32)},
        label=np.eye(3, dtype=np.float32)[i], segments=np.array([[1.1, 2.3]] * i),
        segment_labels=np.full(i, i), source=f"src_{i}"))
  data_dir = tmp_path / "ds"
  fmt.write_dataset(str(data_dir), dataset="toy", classes=CLASSES, feature_dims={"i3d": 4},
                    splits={"test": recs}, num_shards=1)
  out = tmp_path / "gt.json"
  gt = results_io.write_ground_truth(str(out), str(data_dir), splits=("test",))
  assert results_io.read_ground_truth(str(out)) == json.loads(json.dumps(gt))
  db = gt["database"]
  assert list(db) == ["video_0", "video_1", "video_2"]
  assert db["video_2"] == {"subset": "test", "duration": 12.0, "annotations": [
      {"segment": [1.1, 2.3], "label": "Swim"}, {"segment": [1.1, 2.3], "label": "Swim"}]}
  with pytest.raises(WstalError, match="no split"):
    results_io.ground_truth_from_dataset(str(data_dir), splits=("train",))
  # the command writes the same file
  assert results_io.main([f"--data_dir={data_dir}", f"--output={tmp_path / 'gt2.json'}"]) == 0
  assert json.loads((tmp_path / "gt2.json").read_text()) == json.loads(out.read_text())
  # evaluate_results accepts the dataset directory as ground truth (split = --subset or test)
  res = tmp_path / "res.json"
  results_io.write_results(str(res), {"video_1": pp.Proposals(
      np.array([1]), np.array([0.5]), np.array([1.1]), np.array([2.3]))}, CLASSES)
  assert evaluate_results.main([f"--ground_truth={data_dir}", f"--results={res}",
                                f"--output={tmp_path / 'm.json'}"]) == 0
  assert json.loads((tmp_path / "m.json").read_text())["average_mAP"] == 50.0  # Swim: 0


# --------------------------------------------------------------------- evaluate_results CLI


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "wstal_jax.evaluate_results", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_evaluate_results_cli(tmp_path):
  gt = tmp_path / "gt.json"
  gt.write_text(json.dumps(gt_dict()))
  res = tmp_path / "res.json"
  results_io.write_results(str(res), proposals(), CLASSES)
  out = tmp_path / "metrics.json"
  p = run_cli(f"--ground_truth={gt}", f"--results={res}", "--subset=test",
              "--tiou=0.3,0.5,0.7", f"--output={out}")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  assert [line.split()[0] for line in lines] == ["mAP@0.30", "mAP@0.50", "mAP@0.70",
                                                 "average_mAP"]
  metrics = json.loads(out.read_text())
  assert list(metrics)[:4] == ["mAP@0.30", "mAP@0.50", "mAP@0.70", "average_mAP"]
  assert metrics["protocol"] == "official" and metrics["anomalies"] == {}
  assert metrics["num_gt_videos"] == 2 and "protocol official" in p.stderr
  # Jump: [0, 1.28] vs [0, 1.3] IoU .985 -> AP 1; Swim: [3.2, 5.76] vs [3, 6]: IoU .853 -> 1
  assert metrics["mAP@0.70"] == pytest.approx(100.0)
  p = run_cli(f"--ground_truth={gt}", f"--results={res}", "--tiou=0.5:0.05:0.95")
  assert p.returncode == 0, p.stderr
  assert p.stdout.split()[0] == "mAP@0.50" and "mAP@0.95" in p.stdout


def test_evaluate_results_cli_reports_each_anomaly_once(tmp_path):
  """Inverted segments and videos without ground truth are scored and counted: one warning
  line per kind with the count and the first example, and the same in the output JSON."""
  gt = tmp_path / "gt.json"
  gt.write_text(json.dumps(gt_dict()))
  res = tmp_path / "res.json"
  rows = {"v1": [{"label": "Jump", "score": 0.9, "segment": [0.0, 1.3]},
                 {"label": "Jump", "score": 0.8, "segment": [2.0, 1.0]},
                 {"label": "Swim", "score": 0.7, "segment": [5.0, 4.0]}],
          "v9": [{"label": "Jump", "score": 0.6, "segment": [0.0, 1.0]}]}
  res.write_text(json.dumps({"results": rows}))
  out = tmp_path / "m.json"
  p = run_cli(f"--ground_truth={gt}", f"--results={res}", "--subset=test", "--tiou=0.5",
              f"--output={out}")
  assert p.returncode == 0, p.stderr
  warnings = [l for l in p.stderr.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 2, p.stderr
  assert warnings[0].startswith("warning: 2 predictions whose segment ends before it starts")
  assert warnings[0].endswith(f"first: {res}: results['v1'][1]: segment [2.0, 1.0]")
  assert warnings[1].startswith("warning: 1 predictions on videos without ground truth")
  anomalies = json.loads(out.read_text())["anomalies"]
  assert anomalies["inverted_segment"]["count"] == 2
  assert anomalies["video_without_ground_truth"] == {
      "count": 1, "first": f"{res}: results['v9'][0]: video 'v9'"}


@pytest.mark.parametrize("content", ['{"results": {"v1": [{"label": "Jump"}]}}', "[1, 2"])
def test_evaluate_results_cli_bad_results_file(tmp_path, content):
  gt = tmp_path / "gt.json"
  gt.write_text(json.dumps(gt_dict()))
  res = tmp_path / "broken_results.json"
  res.write_text(content)
  p = run_cli(f"--ground_truth={gt}", f"--results={res}")
  assert p.returncode == 2
  assert p.stderr.startswith("error: ") and str(res) in p.stderr
  assert "Traceback" not in p.stderr
  p = run_cli(f"--ground_truth={gt}", f"--results={res}", "--tiou=abc")
  assert p.returncode == 2 and "--tiou" in p.stderr and "Traceback" not in p.stderr


def test_parse_tiou():
  from wstal_jax import metrics
  assert evaluate_results.parse_tiou("0.1:0.1:0.7") == list(metrics.THUMOS14_TIOU)
  assert evaluate_results.parse_tiou("activitynet") == list(metrics.ACTIVITYNET_TIOU)
  assert evaluate_results.parse_tiou("0.5:0.05:0.95") == list(metrics.ACTIVITYNET_TIOU)
  assert evaluate_results.parse_tiou("0.3, 0.5") == [0.3, 0.5]
  for bad in ("", "0.1:0:0.5", "1.5", "x"):
    with pytest.raises(WstalError, match="--tiou"):
      evaluate_results.parse_tiou(bad)
