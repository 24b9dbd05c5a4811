"""wstal_jax.checkpointing: round trip with shardings, latest + best preservation, read-only."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import checkpointing
from wstal_jax.errors import WstalError


def _mesh(n):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _state(value, sharding):
  state = {"step": jnp.asarray(value, jnp.int32),
           "params": {"w": jnp.full((3, 4), float(value)), "b": jnp.arange(4.0) + value},
           "opt_state": (jnp.zeros(()), {"mu": jnp.ones((3, 4)) * value})}
  return jax.device_put(state, sharding)


def _replicated(n):
  return jax.sharding.NamedSharding(_mesh(n), jax.sharding.PartitionSpec())


def test_round_trip_onto_another_mesh(tmp_path):
  """Saved from 8 devices, restored onto 1 device (and the other way): same values, and the
  restored arrays carry the requested sharding."""
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), async_save=True)
  state = _state(7, _replicated(8))
  assert ckpts.save(7, state, meta={"phase": 0}, metrics={"average_mAP": 1.5})
  assert not ckpts.save(7, state, meta={"phase": 0})   # an existing step is left alone
  ckpts.wait()
  target = checkpointing.abstract_like(state, _replicated(1))
  restored, meta = ckpts.restore(7, target)
  assert meta == {"phase": 0}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  assert restored["params"]["w"].sharding == _replicated(1)
  params = ckpts.restore_params(7, checkpointing.abstract_like(state["params"], _replicated(8)))
  assert set(params) == {"w", "b"}
  np.testing.assert_array_equal(np.asarray(params["b"]), np.arange(4.0) + 7)
  assert params["w"].sharding == _replicated(8)
  assert ckpts.metrics(7)["average_mAP"] == 1.5
  ckpts.close()


def test_keeps_latest_and_best(tmp_path):
  """keep_latest=2, keep_best=1: the best evaluated step survives however old it is; a step
  saved without metrics survives only while it is among the latest."""
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), keep_latest=2, keep_best=1,
                                    async_save=False)
  sharding = _replicated(1)
  scores = {1: 10.0, 2: 30.0, 3: 20.0, 4: None, 5: 5.0, 6: None}
  for step, score in scores.items():
    ckpts.save(step, _state(step, sharding), meta={},
               metrics=None if score is None else {"average_mAP": score})
  ckpts.wait()
  assert ckpts.all_steps() == [2, 5, 6]
  assert ckpts.best_step() == 2
  assert ckpts.latest_step() == 6
  assert ckpts.resolve("best") == 2 and ckpts.resolve("latest") == 6
  assert ckpts.resolve("5") == 5
  with pytest.raises(WstalError, match="no checkpoint for step 3"):
    ckpts.resolve(3)
  with pytest.raises(WstalError, match="best, latest or a step"):
    ckpts.resolve("newest")
  ckpts.close()
  # A new manager (a resumed run) sees the same steps and the same best.
  again = checkpointing.Checkpoints(str(tmp_path / "ck"), read_only=True)
  assert again.all_steps() == [2, 5, 6] and again.best_step() == 2
  again.close()


def test_best_is_none_without_metrics_and_read_only_needs_a_dir(tmp_path):
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), async_save=False)
  ckpts.save(3, _state(3, _replicated(1)), meta={})
  assert ckpts.best_step() is None
  with pytest.raises(WstalError, match="no evaluated checkpoint"):
    ckpts.resolve("best")
  ckpts.close()
  with pytest.raises(WstalError, match="no checkpoints here"):
    checkpointing.Checkpoints(str(tmp_path / "missing"), read_only=True)


def test_restore_into_wrong_structure_is_a_clear_error(tmp_path):
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), async_save=False)
  state = _state(1, _replicated(1))
  ckpts.save(1, state, meta={})
  wrong = checkpointing.abstract_like(
      {"params": {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4)}}, _replicated(1))["params"]
  with pytest.raises(WstalError, match="does not fit this model"):
    ckpts.restore_params(1, wrong)
  ckpts.close()
  assert os.path.isdir(tmp_path / "ck" / "1")


# ------------------------------------------------------------------ damaged checkpoints


def _damage(step_dir, how):
  """Damages a saved checkpoint the ways a shared filesystem or object store does."""
  state = step_dir / "state"
  if how == "truncated_arrays":   # a killed copy: every array data file cut in half
    for path in (state / "d").iterdir():
      with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
  elif how == "deleted_manifest":   # a user deleting files
    (state / "manifest.ocdbt").unlink()
  elif how == "deleted_tree_metadata":
    (state / "_METADATA").unlink()
  elif how == "zeroed_meta":   # a quota hit: a file of zeros
    path = step_dir / "meta" / "metadata"
    path.write_bytes(b"\0" * path.stat().st_size)
  else:
    raise ValueError(how)


def _three_steps(directory):
  ckpts = checkpointing.Checkpoints(str(directory), keep_latest=3, async_save=False)
  for step in (1, 2, 3):
    ckpts.save(step, _state(step, _replicated(1)), meta={"phase": 0},
               metrics={"average_mAP": float(step)})
  ckpts.close()
  return checkpointing.abstract_like(_state(0, _replicated(1)), _replicated(1))


@pytest.mark.parametrize("how", ["truncated_arrays", "deleted_manifest", "deleted_tree_metadata",
                                 "zeroed_meta"])
def test_restore_newest_falls_back_and_sets_the_damaged_aside(tmp_path, how, caplog):
  target = _three_steps(tmp_path / "ck")
  _damage(tmp_path / "ck" / "3", how)
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), keep_latest=3)
  with caplog.at_level("WARNING"):
    step, state, meta = ckpts.restore_newest(lambda s: target)
  assert step == 2 and meta == {"phase": 0}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state),
               jax.device_get(_state(2, _replicated(1))))
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1
  assert "checkpoint 3 cannot be restored" in warnings[0]
  assert "resuming from step 2" in warnings[0]
  # Set aside, not deleted, and out of the step list: training re-creates step 3.
  assert ckpts.all_steps() == [1, 2]
  assert (tmp_path / "ck" / "3.damaged" / "state").is_dir()
  assert ckpts.save(3, _state(3, _replicated(1)), meta={"phase": 0})
  ckpts.close()


def test_no_checkpoint_restores_is_one_error(tmp_path):
  target = _three_steps(tmp_path / "ck")
  for step in (1, 2, 3):
    _damage(tmp_path / "ck" / str(step), "deleted_manifest")
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), keep_latest=3)
  with pytest.raises(WstalError, match=r"no checkpoint restores \(step 3: damaged or "
                                       r"incomplete .*step 2: .*step 1: "):
    ckpts.restore_newest(lambda s: target)
  ckpts.close()


def test_damaged_checkpoint_in_evaluation_names_it_and_the_others(tmp_path):
  target = _three_steps(tmp_path / "ck")
  _damage(tmp_path / "ck" / "3", "truncated_arrays")
  ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), read_only=True)
  best = ckpts.resolve("best")
  assert best == 3
  with pytest.raises(WstalError, match=r"ck/3: checkpoint cannot be restored: damaged or "
                                       r"incomplete .*checkpoints present: \[1, 2, 3\]"):
    ckpts.restore_params(best, target["params"])
  np.testing.assert_array_equal(np.asarray(ckpts.restore_params(2, target["params"])["b"]),
                                np.arange(4.0) + 2)
  assert (tmp_path / "ck" / "3").is_dir()   # evaluation never moves anything


def test_damaged_metrics_file(tmp_path, caplog):
  """Orbax reads every step's metrics when it opens the folder: a damaged one is named in one
  error when evaluating, and set aside (with a warning) when a run resumes."""
  target = _three_steps(tmp_path / "ck")
  (tmp_path / "ck" / "2" / "metrics" / "metrics").write_text('{"average_mAP": 2.')
  with pytest.raises(WstalError, match=r"ck/2/metrics/metrics: damaged .*checkpoints present: "
                                       r"\[1, 2, 3\]"):
    checkpointing.Checkpoints(str(tmp_path / "ck"), read_only=True)
  with caplog.at_level("WARNING"):
    ckpts = checkpointing.Checkpoints(str(tmp_path / "ck"), keep_latest=3)
  assert any("2/metrics/metrics is damaged" in r.getMessage() for r in caplog.records)
  assert ckpts.all_steps() == [1, 3] and ckpts.best_step() == 3
  assert ckpts.restore_newest(lambda s: target)[0] == 3
  ckpts.close()
