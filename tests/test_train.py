"""Training loop, checkpoints, evaluation outputs, resume, signals and NaN stop.

The loop is method-agnostic, so most tests drive it with `TinyMethod` (a linear snippet
classifier with a top-k MIL loss) on a tiny dataset written here with format.write_dataset;
they take seconds. tests/test_train_cli.py runs the real command line with VLPO.
"""
import glob
import json
import os
import shutil
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import checkpointing
from wstal_jax import config_common
from wstal_jax import layers
from wstal_jax import train
from wstal_jax import workdir as workdir_lib
from wstal_jax.data import format as data_format
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_CLASSES, DIM = 3, 8


# ----------------------------------------------------------------------------- tiny method


class _Classifier(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, feat_BxTxD):
    x = nn.relu(nn.Dense(16, name="embed")(feat_BxTxD))
    return {"logits_BxTxC": nn.Dense(self.num_classes, name="head")(x)}


class TinyMethod:
  """Snippet classifier + top-k MIL (k = T // 4): a real, learnable stand-in for a method.

  nan_at_step: from this step on the aux term `l_bad` is NaN (NaN-stop test).
  phase_starts: with two phases, phase 0 trains `embed` only and phase 1 `head` only.
  """
  postprocess_preset = "vlpo"

  def __init__(self, num_classes=NUM_CLASSES, nan_at_step=None, phase_starts=(0,),
               l2_weight=0.0):
    self.model = _Classifier(num_classes)
    self.nan_at_step = nan_at_step
    self.l2_weight = l2_weight   # > 0: a second term, weight decay on `head` only
    self.phase_starts = tuple(phase_starts)

  def init(self, rng, batch, consts):
    del consts
    return self.model.init(rng, batch["feat_BxTxD"])

  def _video_logits(self, params, batch):
    logits_BxTxC = self.model.apply({"params": params}, batch["feat_BxTxD"])["logits_BxTxC"]
    mask_BxT = batch["mask_BxT"]
    k = max(1, logits_BxTxC.shape[1] // 4)
    masked = jnp.where(mask_BxT[..., None] > 0, logits_BxTxC, -1e9)
    top_BxKxC = jax.lax.top_k(jnp.swapaxes(masked, 1, 2), k)[0]
    return logits_BxTxC, top_BxKxC.mean(-1)

  def loss(self, params, batch, consts, rng, step):
    del consts
    _, video_BxC = self._video_logits(params, batch)
    noise = 1e-3 * jax.random.normal(rng, video_BxC.shape)   # exercises the step RNG
    target = batch["label_BxC"] / jnp.maximum(batch["label_BxC"].sum(-1, keepdims=True), 1)
    ce_B = -(target * jax.nn.log_softmax(video_BxC + noise)).sum(-1)
    valid_B = batch["valid_B"]
    l_mil = (ce_B * valid_B).sum() / jnp.maximum(valid_B.sum(), 1)
    aux = {"l_mil": l_mil}
    total = l_mil
    if self.l2_weight:
      aux["l_l2"] = jnp.sum(params["head"]["kernel"] ** 2)
      total = total + self.l2_weight * aux["l_l2"]
    if self.nan_at_step is not None:
      aux["l_bad"] = jnp.where(step >= self.nan_at_step, jnp.nan, 0.0)
      total = total + aux["l_bad"]
    return total, aux

  def predict(self, params, batch, consts):
    del consts
    logits_BxTxC, video_BxC = self._video_logits(params, batch)
    return {"video_scores_BxC": jax.nn.softmax(video_BxC), "cas_BxTxC": jax.nn.sigmoid(
        logits_BxTxC), "actionness_BxT": jax.nn.sigmoid(logits_BxTxC).max(-1)}

  def extra_consts(self):
    return {}

  def loss_weights(self):
    return {"l_mil": 1.0, **({"l_bad": 1.0} if self.nan_at_step is not None else {}),
            **({"l_l2": self.l2_weight} if self.l2_weight else {})}

  def param_labels(self, params, step):
    if len(self.phase_starts) == 1:
      return jax.tree.map(lambda _: "train", params)
    stage = 0 if step < self.phase_starts[1] else 1
    return {name: jax.tree.map(lambda _: "train" if (name == "embed") == (stage == 0)
                               else "freeze", sub)
            for name, sub in params.items()}


# ----------------------------------------------------------------------------- tiny data


def _video(rng, name, num_t, cls, split):
  feat = rng.normal(0, 1, (num_t, DIM)).astype(np.float32)
  start = int(rng.integers(0, num_t // 2))
  end = int(min(num_t, start + rng.integers(3, max(4, num_t // 2))))
  feat[start:end, cls] += 2.5   # class evidence inside the action
  label = np.zeros(NUM_CLASSES, np.float32)
  label[cls] = 1
  sps = 0.64
  return data_format.VideoRecord(
      name=name, duration=num_t * sps, features={"i3d": feat}, label=label,
      segments=np.array([[start * sps, end * sps]], np.float32),
      segment_labels=np.array([cls], np.int32), source=f"test {split}")


def write_tiny_dataset(out_dir, seed=0):
  rng = np.random.default_rng(seed)
  splits = {}
  for split, n in (("train", 24), ("test", 12)):
    splits[split] = [_video(rng, f"{split}_{i:03d}", int(rng.integers(12, 60)), i % NUM_CLASSES,
                            split) for i in range(n)]
  data_format.write_dataset(str(out_dir), dataset="tiny",
                            classes=[f"class{c}" for c in range(NUM_CLASSES)],
                            feature_dims={"i3d": DIM}, splits=splits, num_shards=2)
  return str(out_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


def tiny_config(data_dir, *, num_steps=8, num_devices=1, **overrides):
  config = config_common.base_config(name="tiny", method="tiny", dataset="builtin")
  config.data.dir = data_dir
  config.data.num_snippets = 16
  config.train.batch_size = 8
  config.train.num_steps = num_steps
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.sync_every = 2
  config.eval.batch_size = 8
  config.eval.tiou = (0.1, 0.3, 0.5)
  config.eval.num_plots = 2
  config.eval.postprocess = {"upsample": 1}
  config.mesh.num_devices = num_devices
  return workdir_lib.apply_overrides(config, overrides)


def read_params(workdir, step):
  """Params of checkpoint `step` as numpy (structure from TinyMethod.init)."""
  method = TinyMethod()
  batch = {"feat_BxTxD": jnp.zeros((1, 4, DIM))}
  shapes = jax.eval_shape(lambda: method.init(jax.random.key(0), batch, {}))["params"]
  sharding = jax.sharding.NamedSharding(
      jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                    devices=jax.devices()[:1]), jax.sharding.PartitionSpec())
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  params = ckpts.restore_params(step, checkpointing.abstract_like(shapes, sharding))
  ckpts.close()
  return jax.device_get(params)


def tb_scalars(workdir, tag):
  """{step: value} of one scalar from the TensorBoard event files."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  """One uninterrupted 8-step run on 1 device: its workdir and metrics."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  metrics = train.train_and_evaluate(tiny_config(tiny_data), workdir, method=TinyMethod())
  return workdir, metrics


def test_outputs_of_a_run(reference):
  workdir, metrics = reference
  with open(os.path.join(workdir, "metrics.json")) as fh:
    on_disk = json.load(fh)
  assert on_disk == metrics
  assert set(on_disk) >= {"mAP@0.10", "mAP@0.30", "mAP@0.50", "average_mAP", "acc", "cls_mAP",
                          "step", "selected_on"}
  assert on_disk["selected_on"] == "test" and on_disk["step"] in (4, 8)
  assert on_disk["average_mAP"] == pytest.approx(
      np.mean([on_disk["mAP@0.10"], on_disk["mAP@0.30"], on_disk["mAP@0.50"]]), abs=1e-3)
  assert 0 <= on_disk["acc"] <= 100
  with open(os.path.join(workdir, "results.json")) as fh:
    results = json.load(fh)
  assert set(results) == {"version", "results", "external_data"}
  assert len(results["results"]) == 12
  first = next(r for rs in results["results"].values() for r in rs)
  assert set(first) == {"label", "score", "segment"} and first["label"].startswith("class")
  assert len(glob.glob(os.path.join(workdir, "plots", "*.png"))) == 2
  assert os.path.exists(os.path.join(workdir, "plots", "scores.npz"))
  with open(os.path.join(workdir, "config.json")) as fh:
    assert json.load(fh)["train"]["num_steps"] == 8
  losses = tb_scalars(workdir, "train/loss")
  assert sorted(losses) == [2, 4, 6, 8] and all(np.isfinite(list(losses.values())))
  test = tb_scalars(workdir, "test/average_mAP")
  assert sorted(test) == [4, 8]
  assert tb_scalars(workdir, "test/mAP@0.50")
  # The last checkpoint's test metrics beside the selected one's; selecting on test, the best
  # on test is the selected checkpoint.
  assert on_disk["last"]["step"] == 8
  assert on_disk["last"]["average_mAP"] == pytest.approx(test[8], abs=1e-3)
  assert set(on_disk["last"]) >= {"mAP@0.10", "mAP@0.50", "average_mAP", "acc", "step"}
  assert on_disk["best_on_test"] == {**{k: v for k, v in on_disk.items()
                                        if k in on_disk["last"] and k != "step"},
                                     "step": on_disk["step"]}
  assert on_disk["protocol"] == "official"
  ckpt_steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                      if p.isdigit())
  assert ckpt_steps == [4, 8]


def test_training_metrics_equal_the_scoring_command(reference, tiny_data, tmp_path):
  """The run's metrics.json equals evaluate_results on its results.json against the GT JSON
  written from the dataset: one evaluation, whichever way a user computes it."""
  from wstal_jax import evaluate_results
  from wstal_jax import results_io
  workdir, metrics = reference
  gt_path = str(tmp_path / "gt.json")
  results_io.write_ground_truth(gt_path, tiny_data, ["test"])
  with open(gt_path) as fh:
    gt = json.load(fh)
  with open(os.path.join(workdir, "results.json")) as fh:
    results = json.load(fh)
  got = evaluate_results.evaluate_detections(gt, results, (0.1, 0.3, 0.5), subset="test")
  for key in ("mAP@0.10", "mAP@0.30", "mAP@0.50", "average_mAP"):
    assert got[key] == pytest.approx(metrics[key], abs=1e-3), key


def test_wtalc_protocol_in_training_equals_the_scoring_command(reference, tiny_data, tmp_path):
  """config.eval.protocol='wtalc' (ground truth rounded to snippets, ambiguous filter): the
  evaluator's metrics equal `evaluate_results --protocol=wtalc` on its results.json against
  the dataset directory, and differ from the official protocol's."""
  from wstal_jax import evaluate, evaluate_results
  data = str(tmp_path / "with_ambiguous")
  splits = {s: list(data_format.read_videos(tiny_data, s)) for s in ("train", "test")}
  for v in splits["test"]:   # an ambiguous stretch in every test video
    v.ambiguous = np.array([[0.55 * v.duration, 0.75 * v.duration]], np.float32)
  data_format.write_dataset(data, dataset="tiny",
                            classes=[f"class{c}" for c in range(NUM_CLASSES)],
                            feature_dims={"i3d": DIM}, splits=splits, num_shards=2)
  ref_dir, _ = reference
  out = {}
  for protocol in ("wtalc", "official"):
    out[protocol] = evaluate.evaluate_checkpoint(
        tiny_config(data, **{"eval.protocol": protocol}), ref_dir, checkpoint="latest",
        eval_dir=str(tmp_path / protocol), method=TinyMethod())
    assert out[protocol]["protocol"] == protocol
  scored = tmp_path / "scored.json"
  assert evaluate_results.main([
      "--protocol=wtalc", f"--ground_truth={data}", "--tiou=0.1,0.3,0.5",
      f"--results={tmp_path / 'wtalc' / 'results.json'}", f"--output={scored}"]) == 0
  scored = json.loads(scored.read_text())
  assert scored["num_dropped_ambiguous"] > 0
  for key in ("mAP@0.10", "mAP@0.30", "mAP@0.50", "average_mAP"):
    assert scored[key] == pytest.approx(out["wtalc"][key], abs=1e-3), key
  assert out["wtalc"]["average_mAP"] != out["official"]["average_mAP"]


def test_eval_mode_restores_and_rewrites_the_same_metrics(reference, tiny_data, tmp_path):
  from wstal_jax import evaluate
  workdir, metrics = reference
  out_dir = str(tmp_path / "eval")
  content = evaluate.evaluate_checkpoint(tiny_config(tiny_data), workdir,
                                         checkpoint=str(metrics["step"]), eval_dir=out_dir,
                                         method=TinyMethod())
  for key in ("mAP@0.10", "mAP@0.50", "average_mAP", "acc", "cls_mAP", "step"):
    assert content[key] == metrics[key]
  for name in ("metrics.json", "results.json", "plots/scores.npz"):
    assert os.path.exists(os.path.join(out_dir, name))
  assert len(glob.glob(os.path.join(out_dir, "plots", "*.png"))) == 2
  with pytest.raises(WstalError, match="no checkpoint for step 5"):
    evaluate.evaluate_checkpoint(tiny_config(tiny_data), workdir, checkpoint="5",
                                 eval_dir=out_dir, method=TinyMethod())
  assert "oracle_labels" not in content
  # The oracle diagnostic marks metrics.json and the printed table.
  oracle_dir = str(tmp_path / "oracle")
  oracle = evaluate.evaluate_checkpoint(
      tiny_config(tiny_data, **{"eval.oracle_labels": True}), workdir,
      checkpoint=str(metrics["step"]), eval_dir=oracle_dir, method=TinyMethod())
  assert oracle["oracle_labels"] is True
  with open(os.path.join(oracle_dir, "metrics.json")) as fh:
    assert json.load(fh)["oracle_labels"] is True
  assert "ORACLE" in evaluate.format_table(oracle, (0.1, 0.3, 0.5))
  assert "ORACLE" not in evaluate.format_table(content, (0.1, 0.3, 0.5))


def test_same_seed_same_numbers(reference, tiny_data, tmp_path):
  workdir, metrics = reference
  again = train.train_and_evaluate(tiny_config(tiny_data), str(tmp_path), method=TinyMethod())
  assert again == metrics
  _assert_trees_equal(read_params(str(tmp_path), 8), read_params(workdir, 8))


def test_eight_devices_match_one(reference, tiny_data, tmp_path):
  """Data parallel over 8 fake devices = 1 device, up to float reduction order."""
  assert jax.device_count() == 8, "conftest.py should fake 8 CPU devices"
  workdir, _ = reference
  train.train_and_evaluate(tiny_config(tiny_data, num_devices=8), str(tmp_path),
                           method=TinyMethod())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               read_params(str(tmp_path), 8), read_params(workdir, 8))
  one, eight = tb_scalars(workdir, "train/loss"), tb_scalars(str(tmp_path), "train/loss")
  assert sorted(one) == sorted(eight)
  np.testing.assert_allclose([eight[s] for s in sorted(eight)], [one[s] for s in sorted(one)],
                             rtol=1e-5)


def test_rerunning_a_finished_run_only_evaluates(reference, tiny_data):
  """The same command again: nothing is trained (no new checkpoint, no new train scalars),
  the selected checkpoint is evaluated again and the same metrics.json is written."""
  workdir, metrics = reference
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert train.train_and_evaluate(tiny_config(tiny_data), workdir,
                                  method=TinyMethod()) == metrics
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert sorted(tb_scalars(workdir, "train/loss")) == [2, 4, 6, 8]


def test_damaged_latest_checkpoint_resumes_from_the_newest_that_restores(
    reference, tiny_data, tmp_path, caplog):
  """The finished reference run with its step-8 checkpoint damaged (array files cut short, as
  by a killed copy): re-running the command warns once naming steps 8 and 4, trains 4 -> 8
  again and ends with exactly the uninterrupted run's metrics and parameters. With every
  checkpoint damaged it is one error."""
  ref_dir, ref_metrics = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  assert _checkpoint_steps(str(workdir)) == [4, 8]
  for path in (workdir / "checkpoints" / "8" / "state" / "d").iterdir():
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)
  with caplog.at_level("WARNING"):
    final = train.train_and_evaluate(tiny_config(tiny_data), str(workdir), method=TinyMethod())
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint 8 cannot be restored" in warnings[0]
  assert "resuming from step 4" in warnings[0]
  assert final == ref_metrics
  _assert_trees_equal(read_params(str(workdir), 8), read_params(ref_dir, 8))
  assert (workdir / "checkpoints" / "8.damaged").is_dir()

  for step in (4, 8):
    (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(WstalError, match=r"no checkpoint restores \(step 8: damaged"):
    train.train_and_evaluate(tiny_config(tiny_data), str(workdir), method=TinyMethod())


def test_resume_refuses_a_different_config(reference, tiny_data):
  workdir, _ = reference
  with pytest.raises(WstalError, match="optim.lr.*new --workdir"):
    train.train_and_evaluate(tiny_config(tiny_data, **{"optim.lr": 0.5}), workdir,
                             method=TinyMethod())


def test_nan_loss_stops_with_step_and_term(tiny_data, tmp_path):
  with pytest.raises(WstalError, match=r"'l_bad' is nan at step 3\b"):
    train.train_and_evaluate(tiny_config(tiny_data), str(tmp_path),
                             method=TinyMethod(nan_at_step=2))
  assert not os.path.exists(tmp_path / "metrics.json")


def test_phases_freeze_and_switch(tiny_data, tmp_path):
  """Phase 0 (steps 0-2) trains only `embed`, phase 1 (steps 3-7) only `head`; resuming at the
  phase boundary restores the phase-1 optimizer state."""
  method = TinyMethod(phase_starts=(0, 3))
  every_step = {"train.checkpoint_every": 1, "checkpoint.keep_latest": 10}
  config = tiny_config(tiny_data, num_steps=3, **every_step)
  train.train_and_evaluate(config, str(tmp_path), method=method)
  init = jax.device_get(method.init(jax.random.split(jax.random.key(0))[0], {
      "feat_BxTxD": jnp.zeros((1, 16, DIM))}, {})["params"])
  p1, p3 = read_params(str(tmp_path), 1), read_params(str(tmp_path), 3)
  _assert_trees_equal(p3["head"], init["head"])
  assert not np.allclose(p3["embed"]["kernel"], init["embed"]["kernel"])
  assert not np.allclose(p3["embed"]["kernel"], p1["embed"]["kernel"])
  train.train_and_evaluate(tiny_config(tiny_data, num_steps=6, **every_step), str(tmp_path),
                           method=method)
  p6 = read_params(str(tmp_path), 6)
  _assert_trees_equal(p6["embed"], p3["embed"])
  assert not np.allclose(p6["head"]["kernel"], p3["head"]["kernel"])


def test_gradient_shares_follow_the_trained_parameters(tiny_data, tmp_path):
  """train/grad_share/<term>: each weighted term's gradient-norm share on the parameters the
  phase trains. l_l2 reaches only `head`, which phase 0 (steps 0-2) freezes: share 0 there,
  > 0 in phase 1; the shares sum to 1."""
  method = TinyMethod(phase_starts=(0, 3), l2_weight=0.5)
  train.train_and_evaluate(tiny_config(tiny_data, num_steps=6), str(tmp_path), method=method)
  mil = tb_scalars(str(tmp_path), "train/grad_share/l_mil")
  l2 = tb_scalars(str(tmp_path), "train/grad_share/l_l2")
  assert sorted(mil) == sorted(l2) == [2, 4, 6]
  assert l2[2] == 0.0 and mil[2] == pytest.approx(1.0)
  for step in (4, 6):
    assert 0.0 < l2[step] < 1.0
    assert mil[step] + l2[step] == pytest.approx(1.0, abs=1e-6)
  assert tb_scalars(str(tmp_path), "train/share/l_l2")[4] > 0   # its loss share too


def test_heldout_selection(tiny_data, tmp_path):
  config = tiny_config(tiny_data, **{"eval.select_on": "heldout",
                                     "eval.heldout_fraction": 0.25})
  metrics = train.train_and_evaluate(config, str(tmp_path), method=TinyMethod())
  assert metrics["selected_on"] == "heldout" and metrics["split"] == "test"
  assert metrics["heldout_average_mAP"] is not None
  held = tb_scalars(str(tmp_path), "heldout/average_mAP")
  assert sorted(held) == [4, 8]
  assert metrics["heldout_average_mAP"] == pytest.approx(held[metrics["step"]], abs=1e-3)
  # Selection reads the held-out videos only (ties: the later step); the test split is also
  # evaluated at each evaluation, for the "best on test" column, and never selects.
  assert metrics["step"] == max(held, key=lambda s: (round(held[s], 4), s))
  test = tb_scalars(str(tmp_path), "test/average_mAP")
  assert sorted(test) == [4, 8]
  best = metrics["best_on_test"]
  assert best["step"] == max(test, key=lambda s: (round(test[s], 4), s))
  assert best["average_mAP"] == pytest.approx(test[best["step"]], abs=1e-3)
  assert metrics["last"]["step"] == 8
  assert metrics["last"]["average_mAP"] == pytest.approx(test[8], abs=1e-3)
  assert metrics["average_mAP"] == pytest.approx(test[metrics["step"]], abs=1e-3)
  history = json.loads((tmp_path / "eval_history.json").read_text())
  assert sorted(history) == ["4", "8"] and history["8"]["selection"] == "heldout"


def test_bad_config_values(tiny_data, tmp_path):
  for key, value, match in (("eval.select_on", "best", "select_on"),
                            ("optim.weight_decay_style", "adamw", "weight_decay_style"),
                            ("train.batch_size", 12, "multiple of the number of devices")):
    with pytest.raises(WstalError, match=match):
      train.train_and_evaluate(tiny_config(tiny_data, num_devices=8, **{key: value}),
                               str(tmp_path / key), method=TinyMethod())


def test_a_config_error_before_the_first_checkpoint_leaves_the_folder_usable(tiny_data,
                                                                             tmp_path):
  """A post-processing typo stops the run before its first step; the corrected command then
  runs in the same folder (nothing was trained there, so there is nothing to protect)."""
  workdir = str(tmp_path / "run")
  with pytest.raises(WstalError, match=r"config.eval.postprocess .*upsample must be an integer"):
    train.train_and_evaluate(tiny_config(tiny_data, **{"eval.postprocess.upsample": -1}),
                             workdir, method=TinyMethod())
  assert not _checkpoint_steps(workdir) and not tb_scalars(workdir, "train/loss")
  out = train.train_and_evaluate(tiny_config(tiny_data, num_steps=4), workdir,
                                 method=TinyMethod())
  assert out["step"] == 4


class MaskedTinyMethod(TinyMethod):
  """TinyMethod with k from the valid snippets, as the real methods: outputs do not depend on
  the padding or on the other videos of a batch."""

  def _video_logits(self, params, batch):
    logits_BxTxC = self.model.apply({"params": params}, batch["feat_BxTxD"])["logits_BxTxC"]
    k_B = layers.topk_count(batch["mask_BxT"], 4)
    return logits_BxTxC, layers.masked_topk_mean(logits_BxTxC, batch["mask_BxT"], k_B)


class LocalTinyMethod(MaskedTinyMethod):
  """MaskedTinyMethod declaring its network local (a per-snippet MLP: receptive field 0), so
  the Evaluator runs it in exact chunks (eval_forward.py)."""
  receptive_field = 0

  def snippet_outputs(self, params, batch, consts):
    del consts
    return self.model.apply({"params": params}, batch["feat_BxTxD"])

  def predict_from_outputs(self, out, batch, consts):
    del consts
    logits_BxTxC = out["logits_BxTxC"]
    k_B = layers.topk_count(batch["mask_BxT"], 4)
    video_BxC = layers.masked_topk_mean(logits_BxTxC, batch["mask_BxT"], k_B)
    return {"video_scores_BxC": jax.nn.softmax(video_BxC), "cas_BxTxC": jax.nn.sigmoid(
        logits_BxTxC), "actionness_BxT": jax.nn.sigmoid(logits_BxTxC).max(-1)}

  def predict(self, params, batch, consts):
    return self.predict_from_outputs(self.snippet_outputs(params, batch, consts), batch, consts)


def test_eval_order_does_not_change_results(tmp_path):
  """Length-sorted eval batches (the default) and manifest order: the same per-video outputs,
  proposals and metrics, with far fewer padded snippets."""
  from wstal_jax import evaluate
  from wstal_jax import input_pipeline
  from wstal_jax import run_setup
  rng = np.random.default_rng(3)
  splits = {split: [_video(rng, f"{split}_{i:03d}", int(rng.integers(10, 300)),
                           i % NUM_CLASSES, split) for i in range(n)]
            for split, n in (("train", 4), ("test", 14))}
  data_dir = str(tmp_path / "data")
  data_format.write_dataset(data_dir, dataset="tiny",
                            classes=[f"class{c}" for c in range(NUM_CLASSES)],
                            feature_dims={"i3d": DIM}, splits=splits, num_shards=3)
  config = tiny_config(data_dir, **{"eval.batch_size": 4})
  run = run_setup.setup(config, method=MaskedTinyMethod())
  evaluators = {o: evaluate.Evaluator(run, split="test", order=o) for o in ("length", "manifest")}
  padded = {o: sum(input_pipeline.eval_plan(run.manifest, data_dir, "test", batch_size=4,
                                            order=o)[1]) for o in evaluators}
  assert padded["length"] < padded["manifest"]
  params = run.init_params(jax.random.key(1),
                           run.put_batch(next(iter(evaluators["manifest"].batches()))))
  got = {o: ev(params, keep_scores=14) for o, ev in evaluators.items()}
  by_len, by_index = got["length"], got["manifest"]
  assert by_len.metrics == by_index.metrics
  assert list(by_len.proposals) == list(by_index.proposals) and len(by_len.proposals) == 14
  assert sum(len(p.label) for p in by_len.proposals.values()) > 0
  for name, p in by_len.proposals.items():
    q = by_index.proposals[name]
    for field in ("label", "score", "start", "end"):
      np.testing.assert_array_equal(getattr(p, field), getattr(q, field))
  assert list(by_len.scores) == list(by_index.scores)
  for name, sc in by_len.scores.items():
    for key, value in sc.items():
      np.testing.assert_array_equal(value, by_index.scores[name][key])


def test_weight_decay_styles_differ():
  """'l2' adds wd * w to the gradient before Adam (torch Adam); 'decoupled' is AdamW."""
  config = config_common.base_config(name="x", method="x")
  config.optim.lr, config.optim.weight_decay = 0.1, 0.5
  params = {"w": jnp.array([4.0])}
  grads = {"w": jnp.array([0.0])}
  labels = {"w": "train"}
  out = {}
  for style in ("l2", "decoupled"):
    config.optim.weight_decay_style = style
    tx = train.make_optimizer(config, labels)
    out[style], _ = tx.update(grads, tx.init(params), params)
  # l2: Adam-normalised decay gradient -> step of -lr; decoupled: -lr * wd * w = -0.1.
  np.testing.assert_allclose(out["l2"]["w"], [-0.1], rtol=1e-4)
  np.testing.assert_allclose(out["decoupled"]["w"], [-0.1 * 0.5 * 4.0], rtol=1e-4)


@pytest.mark.parametrize("style", ["l2", "decoupled"])
def test_no_decay_names_are_not_decayed(style):
  """config.optim.no_decay (default: PVLR's learnable 'log_logit_scale', as CLIP) leaves those
  leaves out of weight decay wherever they sit in the tree; every other leaf decays."""
  config = config_common.base_config(name="x", method="x")
  config.optim.lr, config.optim.weight_decay = 0.1, 0.5
  config.optim.weight_decay_style = style
  assert tuple(config.optim.no_decay) == ("log_logit_scale",)
  params = {"head": {"log_logit_scale": jnp.array([4.0]), "kernel": jnp.array([4.0])}}
  grads = jax.tree.map(jnp.zeros_like, params)
  labels = jax.tree.map(lambda _: "train", params)
  tx = train.make_optimizer(config, labels)
  out, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(out["head"]["log_logit_scale"], [0.0])
  assert float(out["head"]["kernel"][0]) < -0.05
  config.optim.no_decay = ()   # the old behaviour: everything decays
  tx = train.make_optimizer(config, labels)
  out, _ = tx.update(grads, tx.init(params), params)
  assert float(out["head"]["log_logit_scale"][0]) < -0.05


_RUNNER = """
import sys, time
sys.path.insert(0, {tests!r})
import test_train as T
from wstal_jax import input_pipeline, train
real_batches = input_pipeline.train_batches

def slow_batches(*args, **kwargs):   # room to interrupt the run between steps
  for batch in real_batches(*args, **kwargs):
    time.sleep({delay})
    yield batch

input_pipeline.train_batches = slow_batches
config = T.tiny_config({data!r}, **{{"train.checkpoint_every": 2}})
out = train.train_and_evaluate(config, {workdir!r}, method=T.TinyMethod())
print("RESULT", "stopped" if out is None else "finished", flush=True)
"""


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if os.path.isdir(path) else []


def _start(tiny_data, workdir, delay):
  script = _RUNNER.format(tests=str(ROOT / "tests"), data=tiny_data, workdir=workdir,
                          delay=delay)
  # A persistent compilation cache shared by the two processes: B reuses A's programs.
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, workdir, after, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [s for s in _checkpoint_steps(workdir) if s > after]
    if steps:
      return steps[0]
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"run ended before a checkpoint after step {after}:\n{out}\n{err[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail("no checkpoint appeared in time")


def test_kill9_then_sigterm_then_resume_matches_uninterrupted(reference, tiny_data, tmp_path):
  """Process A is killed with SIGKILL right after its first checkpoint; process B resumes it
  and gets SIGTERM, saves a checkpoint and exits 0 before the end; finishing the run then
  gives exactly the metrics and parameters of the uninterrupted reference run."""
  ref_dir, ref_metrics = reference
  workdir = str(tmp_path / "run")
  a = _start(tiny_data, workdir, delay=0.4)
  first = _wait_for_checkpoint(a, workdir, after=0)
  a.send_signal(signal.SIGKILL)
  a.communicate(timeout=60)
  assert a.returncode == -signal.SIGKILL and first < 8

  resumed_at = max(_checkpoint_steps(workdir))
  b = _start(tiny_data, workdir, delay=0.6)
  _wait_for_checkpoint(b, workdir, after=resumed_at)
  b.send_signal(signal.SIGTERM)
  out, err = b.communicate(timeout=120)
  assert b.returncode == 0, err[-3000:]
  assert "RESULT stopped" in out
  assert "stopped by signal 15" in err
  stopped_at = max(_checkpoint_steps(workdir))
  assert resumed_at < stopped_at < 8
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))

  config = tiny_config(tiny_data, **{"train.checkpoint_every": 2})
  final = train.train_and_evaluate(config, workdir, method=TinyMethod())
  assert final == ref_metrics
  _assert_trees_equal(read_params(workdir, 8), read_params(ref_dir, 8))
