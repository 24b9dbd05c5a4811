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
  with pytest.raises(WstalError, match="do not fit"):
    ckpts.restore_params(1, wrong)
  ckpts.close()
  assert os.path.isdir(tmp_path / "ck" / "1")
