"""Features from any backbone: the converters take the primary stream's width from the first
video (RGB-only I3D 1024, VideoMAE 768, ...), the BaS-Net layout may hold rgb/ only, the stream
is named by --primary_name; a converted dataset trains and evaluates end to end."""
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from wstal_jax import train
from wstal_jax import workdir as workdir_lib
from wstal_jax.data import convert as cv
from wstal_jax.data import format as fmt

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _base_config(data_dir):
  spec = importlib.util.spec_from_file_location("base_config_for_test",
                                                ROOT / "configs" / "base.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  return workdir_lib.apply_overrides(config, {
      "data.dir": data_dir, "data.num_snippets": 8, "train.num_steps": 2,
      "train.eval_every": 2, "train.log_every": 1, "train.batch_size": 8,
      "eval.batch_size": 8, "eval.num_plots": 0, "eval.postprocess.upsample": 1,
      "mesh.num_devices": 1, "vlpo.act_hidden_dim": 8})


def _train_and_check(data_dir, name, dim, tmp_path):
  manifest = fmt.read_manifest(data_dir)
  assert manifest["primary_feature"] == name
  assert manifest["features"] == {name: {"dim": dim}}
  rec = next(fmt.read_videos(data_dir, "test"))
  assert rec.features[name].shape[1] == dim
  out = train.train_and_evaluate(_base_config(data_dir), str(tmp_path / f"run_{name}"))
  assert out["step"] == 2 and out["num_videos"] == manifest["splits"]["test"]["num_videos"]
  assert 0.0 <= out["average_mAP"] <= 100.0
  results = json.loads((tmp_path / f"run_{name}" / "results.json").read_text())
  assert len(results["results"]) == out["num_videos"]


def test_rgb_only_1024_basnet_layout_end_to_end(shared_data, tmp_path):
  """BaS-Net layout with rgb/ only (RGB-only I3D, 1024-d), 24 videos of THUMOS14."""
  gt = json.loads((shared_data / "thumos14" / "gt.json").read_text())["database"]
  splits_dir = tmp_path / "splits"
  splits_dir.mkdir()
  rng = np.random.default_rng(0)
  durations = {}
  for split in ("train", "test"):
    names = open(shared_data / "thumos14" / f"split_{split}.txt").read().split()[:12]
    (splits_dir / f"split_{split}.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "features" / split / "rgb").mkdir(parents=True)
    for i, name in enumerate(names):
      np.save(tmp_path / "features" / split / "rgb" / f"{name}.npy",
              rng.standard_normal((6 + i % 4, 1024), dtype=np.float32))
      durations[name] = 60.0
  (tmp_path / "durations.json").write_text(json.dumps(durations))
  small_gt = {"database": {n: gt[n] for n in durations}}
  (tmp_path / "gt.json").write_text(json.dumps(small_gt))
  out = str(tmp_path / "rgb_only")
  assert cv.main(["--format=basnet", f"--features={tmp_path / 'features'}",
                  f"--annotations={tmp_path / 'gt.json'}", f"--splits={splits_dir}",
                  f"--durations={tmp_path / 'durations.json'}", f"--out={out}",
                  "--num_shards=2", "--clip_gt=true"]) == 0
  assert fmt.read_manifest(out)["source"]["streams"] == ["rgb"]
  _train_and_check(out, "i3d", 1024, tmp_path)


def test_videomae_768_wtalc_layout_end_to_end(shared_data, tmp_path):
  """W-TALC layout with 768-d features named `videomae`, the real THUMOS14 annotations."""
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  names = np.load(ann / "videoname.npy")
  rng = np.random.default_rng(1)
  feats = np.empty(len(names), dtype=object)
  feats[:] = [rng.standard_normal((2 + i % 5, 768), dtype=np.float32) for i in range(len(names))]
  path = tmp_path / "videomae.npy"
  np.save(path, feats, allow_pickle=True)
  out = str(tmp_path / "videomae")
  assert cv.main(["--format=wtalc", f"--features={path}", f"--annotations={ann}",
                  f"--out={out}", "--num_shards=2", "--primary_name=videomae"]) == 0
  _train_and_check(out, "videomae", 768, tmp_path)


def test_vlm_name_must_differ_from_the_primary_name(shared_data, tmp_path, capsys):
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  feats = np.empty(len(np.load(ann / "videoname.npy")), dtype=object)
  feats[:] = [np.ones((2, 8), np.float32)] * len(feats)
  np.save(tmp_path / "x.npy", feats, allow_pickle=True)
  with pytest.raises(SystemExit) as e:
    cv.main(["--format=wtalc", f"--features={tmp_path / 'x.npy'}", f"--annotations={ann}",
             f"--out={tmp_path / 'o'}", "--primary_name=clip", f"--vlm_features={tmp_path}",
             "--vlm_name=clip"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err == "error: --vlm_name must differ from --primary_name ('clip')\n"
  assert not os.path.exists(tmp_path / "o")
