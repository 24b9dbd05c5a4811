"""Converters, on the real annotation files of ../shared/data.

No feature release is available offline (they are GBs), so the tests generate feature arrays
of the real layout and dims (I3D 2048 = rgb 1024 || flow 1024) but with a small T of 2..6
snippets per video: the converter must not require T to match the duration (it takes the
duration from the annotations, or from --durations), and full-length features for 412 videos
would be ~1 GB.
"""
import json
import os
import shutil

import numpy as np
import pytest

from wstal_jax.data import convert as cv
from wstal_jax.data import format as fmt

THUMOS_CLASSES = [
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow",
    "HighJump", "JavelinThrow", "LongJump", "PoleVault", "Shotput", "SoccerPenalty",
    "TennisSwing", "ThrowDiscus", "VolleyballSpiking"]


def _t(i):
  return 2 + i % 5


@pytest.fixture(scope="module")
def thumos(shared_data):
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  names = [n.decode() for n in np.load(ann / "videoname.npy")]
  return {"ann": str(ann), "gt": str(shared_data / "thumos14" / "gt.json"),
          "splits": str(shared_data / "thumos14"), "names": names}


def _feature_list(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((_t(i), 2048), dtype=np.float32) for i in range(n)]


def _save_object_array(path, arrays):
  obj = np.empty(len(arrays), dtype=object)
  obj[:] = arrays
  np.save(path, obj, allow_pickle=True)
  return str(path)


@pytest.fixture(scope="module")
def wtalc_feats(thumos, tmp_path_factory):
  arrays = _feature_list(len(thumos["names"]))
  path = _save_object_array(tmp_path_factory.mktemp("wtalc") / "I3D-JOINTFeatures.npy", arrays)
  return path, arrays


@pytest.fixture(scope="module")
def wtalc_dataset(thumos, wtalc_feats, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "thumos14")
  cv.main(["--format=wtalc", f"--features={wtalc_feats[0]}", f"--annotations={thumos['ann']}",
           f"--out={out}", "--num_shards=4"])
  return out


def run_error(argv, capsys):
  """Runs the CLI expecting `error: ...` and exit 2; returns the message."""
  with pytest.raises(SystemExit) as e:
    cv.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  return err


def assert_no_output(parent):
  assert [p for p in os.listdir(parent) if p.startswith(("out", ".out"))] == []


# -------------------------------------------------------------------------------- W-TALC


def test_wtalc_thumos14(wtalc_dataset, wtalc_feats, thumos):
  m = fmt.read_manifest(wtalc_dataset)
  assert m["dataset"] == "thumos14" and m["classes"] == THUMOS_CLASSES
  assert m["features"] == {"i3d": {"dim": 2048}}
  # Default: GT kept as distributed -> the official counts.
  assert (m["splits"]["train"]["num_videos"], m["splits"]["train"]["num_instances"]) == (200,
                                                                                          3007)
  assert (m["splits"]["test"]["num_videos"], m["splits"]["test"]["num_instances"]) == (212, 3358)
  assert m["source"]["defects"]["dropped_past_end"] == 0
  assert m["source"]["defects"]["past_end"] >= 30  # incl. the 30 that start after the end
  assert fmt.seconds_per_snippet(m) == pytest.approx(0.64)
  fmt.verify_shards(wtalc_dataset)
  test = fmt.read_video_info(wtalc_dataset, "test")
  by_name = {v.name: v for v in test}
  v270 = by_name["video_test_0000270"]
  assert len(v270.segments) == 29 and v270.segments.max() > v270.duration  # as distributed
  assert v270.label.sum() == 0  # labels_all.npy is empty for this video
  assert sum(len(v.ambiguous) for v in test) == 96  # 99 lines, 3 of video_test_0001292
  # Features round trip, in W-TALC order within each split.
  feats = wtalc_feats[1]
  train_names = [n for n in thumos["names"] if "validation" in n]
  got = list(fmt.read_videos(wtalc_dataset, "train"))
  assert [g.name for g in got] == train_names
  for g in got[:5]:
    np.testing.assert_array_equal(g.features["i3d"], feats[thumos["names"].index(g.name)])


def test_wtalc_clip_gt_drops_unreachable_instances(thumos, wtalc_feats, tmp_path):
  out = tmp_path / "out"
  manifest = cv.convert_wtalc(features=wtalc_feats[0], annotations=thumos["ann"],
                              out=str(out), clip_gt=True, video_label="instances",
                              num_shards=2)
  # 4 train / 26 test instances start after their video ends -> dropped; the rest clipped.
  assert manifest["splits"]["train"]["num_instances"] == 3003
  assert manifest["splits"]["test"]["num_instances"] == 3332
  assert manifest["splits"]["test"]["num_videos"] == 212
  assert manifest["source"]["defects"]["dropped_past_end"] == 30
  test = fmt.read_video_info(str(out), "test")
  info = {v.name: v for v in test}
  v = info["video_test_0000270"]
  assert len(v.segments) == 7 and v.segments.max() <= v.duration
  assert v.label[THUMOS_CLASSES.index("HammerThrow")] == 1  # --video_label=instances
  assert all(np.all(v.segments[:, 1] <= v.duration + 1e-3) for v in test)


def test_wtalc_activitynet_annotations(shared_data):
  ann = str(shared_data / "activitynet12" / "ActivityNet1.2-Annotations")
  classes, videos, family = cv.load_wtalc_annotations(ann)
  assert family == "activitynet" and len(classes) == 100
  assert sum(v.split == "train" for v in videos) == 4819
  assert sum(v.split == "test" for v in videos) == 2383
  defects = cv.fix_segments(videos, clip_gt=True)
  assert sum(len(v.segments) for v in videos if v.split == "test") == 3582
  assert defects["dropped_past_end"] == 0 and defects["clipped"] == 185
  assert defects["zero_length"] == 10  # end == start in seconds: kept
  assert all(v.segments.max(initial=0) <= v.duration for v in videos)


# ------------------------------------------------------------------------------- BaS-Net


@pytest.fixture(scope="module")
def basnet_feats(thumos, tmp_path_factory):
  root = tmp_path_factory.mktemp("basnet") / "features"
  gt = json.load(open(thumos["gt"]))["database"]
  rng = np.random.default_rng(1)
  for split in ("train", "test"):
    for stream in ("rgb", "flow"):
      (root / split / stream).mkdir(parents=True)
    names = open(os.path.join(thumos["splits"], f"split_{split}.txt")).read().split()
    for i, name in enumerate(names):
      assert gt[name]["subset"] == split
      for stream in ("rgb", "flow"):
        np.save(root / split / stream / f"{name}.npy",
                rng.standard_normal((_t(i), 1024), dtype=np.float32))
  return str(root)


def test_basnet_thumos14(thumos, basnet_feats, tmp_path):
  out = tmp_path / "out"
  cv.main(["--format=basnet", f"--features={basnet_feats}", f"--annotations={thumos['gt']}",
           f"--splits={thumos['splits']}", f"--out={out}", f"--durations={thumos['ann']}",
           "--num_shards=3", "--clip_gt",
           f"--ambiguous={thumos['ann']}/Ambiguous_test.txt"])
  m = fmt.read_manifest(str(out))
  assert m["classes"] == THUMOS_CLASSES  # sorted unique labels of gt.json
  assert m["splits"]["test"]["num_videos"] == 210  # without test videos 270, 1292, 1496
  assert m["splits"]["train"]["num_videos"] == 200
  # --clip_gt: gt.json's 3,007 train / 3,311 test instances; 4 + 4 start after their video
  # ends and are dropped.
  assert m["splits"]["train"]["num_instances"] == 3003
  assert m["splits"]["test"]["num_instances"] == 3307
  rec = next(fmt.read_videos(str(out), "test"))
  assert rec.name == "video_test_0000004"
  rgb = np.load(os.path.join(basnet_feats, "test", "rgb", "video_test_0000004.npy"))
  flow = np.load(os.path.join(basnet_feats, "test", "flow", "video_test_0000004.npy"))
  np.testing.assert_array_equal(rec.features["i3d"], np.concatenate([rgb, flow], 1))
  names = [v.name for v in fmt.read_video_info(str(out), "test")]
  assert names == open(os.path.join(thumos["splits"], "split_test.txt")).read().split()


def test_basnet_durations_from_features(thumos, basnet_feats, tmp_path):
  classes = tmp_path / "classes.txt"
  classes.write_text("\n".join(THUMOS_CLASSES) + "\n")
  manifest = cv.convert_basnet(features=basnet_feats, annotations=thumos["gt"],
                               splits=thumos["splits"], out=str(tmp_path / "out"),
                               classes=str(classes), clip_gt=False, num_shards=1)
  assert manifest["splits"]["train"]["num_instances"] == 3007
  assert manifest["splits"]["test"]["num_instances"] == 3311
  info = fmt.read_video_info(str(tmp_path / "out"), "train")
  assert [v.duration for v in info[:5]] == pytest.approx([_t(i) * 0.64 for i in range(5)])


# ------------------------------------------------------------------------ VLM and text


def test_vlm_features_and_text_embeddings(thumos, wtalc_feats, tmp_path, caplog):
  vlm = tmp_path / "vlm"
  (vlm / "test").mkdir(parents=True)
  rng = np.random.default_rng(2)
  expect = {}
  for i, name in enumerate(thumos["names"]):
    num_t = _t(i) + (1 if i == 3 else 0)  # video 3: one snippet more -> resampled
    arr = rng.standard_normal((num_t, 16), dtype=np.float32)
    np.save((vlm / "test" if "test" in name else vlm) / f"{name}.npy", arr)
    expect[name] = arr
  text = tmp_path / "text.npy"
  np.save(text, rng.standard_normal((20, 16), dtype=np.float32))
  out = tmp_path / "out"
  cv.main(["--format=wtalc", f"--features={wtalc_feats[0]}", f"--annotations={thumos['ann']}",
           f"--out={out}", f"--vlm_features={vlm}", f"--text_embeddings={text}",
           "--num_shards=1"])
  m = fmt.read_manifest(str(out))
  assert m["features"] == {"i3d": {"dim": 2048}, "videoclip": {"dim": 16}}
  np.testing.assert_array_equal(fmt.load_text_embeddings(str(out)), np.load(text))
  recs = {r.name: r for r in fmt.read_videos(str(out), "train", features=["videoclip"])}
  name3 = thumos["names"][3]
  np.testing.assert_allclose(recs[name3].features["videoclip"],
                             cv.resample_linear(expect[name3], _t(3)), rtol=1e-6)
  np.testing.assert_array_equal(recs[thumos["names"][0]].features["videoclip"],
                                expect[thumos["names"][0]])
  assert "resampled" in caplog.text


def test_resample_linear():
  x = np.arange(4, dtype=np.float32)[:, None]
  np.testing.assert_allclose(cv.resample_linear(x, 8)[:, 0],
                             [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
  np.testing.assert_allclose(cv.resample_linear(x, 2)[:, 0], [0.5, 2.5])
  assert cv.resample_linear(x, 4) is x


# ---------------------------------------------------------------------------- bad inputs


def _wtalc_argv(feats, thumos, tmp_path, *extra):
  return ["--format=wtalc", f"--features={feats}", f"--annotations={thumos['ann']}",
          f"--out={tmp_path / 'out'}", "--num_shards=2", *extra]


# The first video of W-TALC order is the first train record, so errors come early; its width
# is the dataset's, so a width error names the next video that differs.
@pytest.mark.parametrize("index,entry,message", [
    (0, np.zeros((0, 2048), np.float32), "T=0"),
    (0, np.full((3, 2048), np.nan, np.float32), "NaN/Inf"),
    (0, np.full((3, 2048), np.inf, np.float32), "NaN/Inf"),
    (1, np.zeros((3, 1024), np.float32), "feature 'i3d' has dim 1024, expected 2048"),
    (0, np.zeros((3, 1024), np.float32), "feature 'i3d' has dim 2048, expected 1024"),
    (0, np.zeros((3, 2, 1024), np.float32), "must be a float array"),
])
def test_wtalc_bad_feature_entries(thumos, wtalc_feats, tmp_path, capsys, index, entry, message):
  arrays = list(wtalc_feats[1])
  arrays[index] = entry
  feats = _save_object_array(tmp_path / "feats.npy", arrays)
  err = run_error(_wtalc_argv(feats, thumos, tmp_path), capsys)
  named = thumos["names"][1 if "has dim" in message else index]
  assert message in err and "feats.npy" in err and named in err
  assert_no_output(tmp_path)


def test_wtalc_bad_feature_files(thumos, wtalc_feats, tmp_path, capsys):
  err = run_error(_wtalc_argv(tmp_path / "missing.npy", thumos, tmp_path), capsys)
  assert "missing.npy: W-TALC feature file not found" in err
  data = open(wtalc_feats[0], "rb").read()
  (tmp_path / "trunc.npy").write_bytes(data[:len(data) // 2])
  err = run_error(_wtalc_argv(tmp_path / "trunc.npy", thumos, tmp_path), capsys)
  assert "trunc.npy: cannot read" in err and "truncated" in err
  short = _save_object_array(tmp_path / "short.npy", wtalc_feats[1][:-1])
  err = run_error(_wtalc_argv(short, thumos, tmp_path), capsys)
  assert "short.npy: holds 411 feature arrays" in err and "412 videos" in err
  assert_no_output(tmp_path)


def test_bad_annotations(thumos, wtalc_feats, tmp_path, capsys):
  ann = tmp_path / "ann"
  shutil.copytree(thumos["ann"], ann)
  for p in ann.iterdir():
    p.chmod(0o644)
  classes = np.load(ann / "classlist.npy")
  np.save(ann / "classlist.npy", classes[1:])  # drop BaseballPitch
  argv = ["--format=wtalc", f"--features={wtalc_feats[0]}", f"--annotations={ann}",
          f"--out={tmp_path / 'out'}"]
  err = run_error(argv, capsys)
  assert "label 'BaseballPitch' is not in the class list" in err and str(ann) in err
  np.save(ann / "classlist.npy", classes)
  (ann / "segments.npy").write_bytes(b"\x93NUMPY garbage")
  err = run_error(argv, capsys)
  assert "segments.npy: cannot read W-TALC annotation file" in err
  (ann / "segments.npy").unlink()
  err = run_error(argv, capsys)
  assert "segments.npy: W-TALC annotation file not found" in err
  shutil.copy(os.path.join(thumos["ann"], "segments.npy"), ann / "segments.npy")
  (ann / "Ambiguous_test.txt").write_text("video_test_0000278 0.0\n")
  err = run_error(argv, capsys)
  assert "Ambiguous_test.txt:1: expected 'video start end'" in err
  assert_no_output(tmp_path)


def test_basnet_bad_inputs(thumos, basnet_feats, tmp_path, capsys):
  feats = tmp_path / "features"
  shutil.copytree(basnet_feats, feats)
  argv = ["--format=basnet", f"--features={feats}", f"--annotations={thumos['gt']}",
          f"--splits={thumos['splits']}", f"--out={tmp_path / 'out'}",
          f"--durations={thumos['ann']}"]
  first = feats / "train" / "rgb" / "video_validation_0000051.npy"
  flow = feats / "train" / "flow" / "video_validation_0000051.npy"
  good = first.read_bytes()
  first.unlink()
  err = run_error(argv, capsys)
  assert f"{first}: BaS-Net features not found" in err
  first.write_bytes(good[:len(good) - 100])
  err = run_error(argv, capsys)
  assert f"{first}: cannot read BaS-Net features" in err
  np.save(first, np.zeros((_t(0) + 1, 1024), np.float32))
  err = run_error(argv, capsys)
  assert str(first) in err and str(flow) in err and "T=" in err
  first.write_bytes(good)
  second = feats / "train" / "rgb" / "video_validation_0000052.npy"
  good2 = second.read_bytes()
  np.save(second, np.zeros((_t(1), 1000), np.float32))   # rgb 1000 + flow 1024 = 2024
  err = run_error(argv, capsys)
  assert "video_validation_0000052" in err and str(second) in err
  assert "feature 'i3d' has dim 2024, expected 2048" in err
  second.write_bytes(good2)
  np.save(first, np.full((_t(0), 1024), np.nan, np.float32))
  err = run_error(argv, capsys)
  assert "NaN/Inf" in err and str(first) in err
  first.write_bytes(good)
  classes = tmp_path / "classes.txt"
  classes.write_text("\n".join(THUMOS_CLASSES[:-1]))
  err = run_error(argv + [f"--classes={classes}"], capsys)
  assert "gt.json: video" in err and "'VolleyballSpiking' is not in the class list" in err
  (tmp_path / "gt.json").write_text("{\"database\": ")
  err = run_error(argv[:2] + [f"--annotations={tmp_path / 'gt.json'}"] + argv[3:], capsys)
  assert "gt.json: cannot read" in err or "gt.json: not a BaS-Net gt.json" in err
  err = run_error(argv[:3] + argv[4:], capsys)
  assert "--splits" in err
  assert_no_output(tmp_path)


def test_vlm_bad_inputs(thumos, wtalc_feats, tmp_path, capsys):
  vlm = tmp_path / "vlm"
  vlm.mkdir()
  for i, name in enumerate(thumos["names"][:3]):
    np.save(vlm / f"{name}.npy", np.zeros((_t(i), 8), np.float32))
  first = vlm / f"{thumos['names'][0]}.npy"
  base = _wtalc_argv(wtalc_feats[0], thumos, tmp_path, f"--vlm_features={vlm}")
  err = run_error(base, capsys)  # the 4th video has no VLM file
  assert f"{thumos['names'][3]}.npy: VLM features for video" in err
  np.save(first, np.zeros((_t(0) + 1, 8), np.float32))
  err = run_error(base + ["--vlm_resample=false"], capsys)
  assert f"{first}: VLM features have T={_t(0) + 1} but the I3D features have T={_t(0)}" in err
  np.save(first, np.zeros((_t(0) * 3, 8), np.float32))
  err = run_error(base, capsys)
  assert f"{first}:" in err and "ratio 3.00 > 2.0" in err
  np.save(first, np.zeros((0, 8), np.float32))
  err = run_error(base, capsys)
  assert f"{first}: VLM features must be [T > 0, E]" in err
  np.save(first, np.zeros((_t(0), 8), np.float32))
  np.save(tmp_path / "text.npy", np.zeros((19, 8), np.float32))
  err = run_error(base + [f"--text_embeddings={tmp_path / 'text.npy'}"], capsys)
  assert "text.npy: text embeddings must be [C=20, E]" in err
  assert_no_output(tmp_path)


def test_existing_output_and_flag_errors(thumos, wtalc_feats, wtalc_dataset, capsys, tmp_path):
  err = run_error(["--format=wtalc", f"--features={wtalc_feats[0]}",
                   f"--annotations={thumos['ann']}", f"--out={wtalc_dataset}"], capsys)
  assert "already exists" in err
  err = run_error(_wtalc_argv(wtalc_feats[0], thumos, tmp_path, "--splits=x"), capsys)
  assert "--splits only applies to --format=basnet" in err


def test_cli_help_and_exit_status(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cv.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith("usage: python -m wstal_jax.data.convert")
  for flag in ("--format", "--features", "--annotations", "--splits", "--out", "--overwrite",
               "--dataset", "--classes", "--durations", "--ambiguous", "--vlm_features",
               "--vlm_name", "--vlm_resample", "--text_embeddings", "--num_shards",
               "--clip_gt", "--video_label", "--fps", "--snippet_frames"):
    assert flag in text
  # The `python -m` path is not run in a subprocess here: a fresh TF import costs 6-15 s.
  err = run_error(["--format=wtalc", "--features=nope.npy", f"--annotations={tmp_path}/nope",
                   f"--out={tmp_path}/o"], capsys)
  assert "nope: annotation folder not found" in err and not (tmp_path / "o").exists()
