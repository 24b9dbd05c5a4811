"""The method contract: every registered method satisfies `methods.Method` on a tiny batch.

A new method is one file under wstal_jax/methods/, one row in `methods.REGISTRY` and its
recipe configs/<name>.py; this test picks it up from the table.
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import methods, train
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent
B, T, C = 2, 24, 3
DIMS = {"feat": 16, "vlm": 8, "text": 8, "words": 5, "vocab": 12}
LK, LC = 4, 6   # description token lengths (MLLM4WTAL's inputs)


def description_consts():
  """What run_setup.description_consts gives a method on a dataset with descriptions."""
  rng = np.random.default_rng(5)
  vectors = rng.normal(size=(DIMS["vocab"], DIMS["words"])).astype(np.float32)
  vectors[:2] = 0
  toks = lambda rows, n: jnp.asarray([r + [0] * (n - len(r)) for r in rows], jnp.int32)
  return {"word_vectors_VxD": jnp.asarray(vectors),
          "class_name_tokens_CxL": toks([[2], [3, 4], [5]], LK),
          "class_key_tokens_CxL": toks([[6, 2], [7, 3], [8, 5]], LK),
          "template_tokens_CxL": toks([[9, 10, 2], [9, 10, 3], [9, 10, 5]], LC)}


def dataset_stand_ins(method):
  """Stand-ins for what run_setup adds from the dataset (`dataset_consts`: SEAL's
  descriptors; tests/test_seal.py computes real ones)."""
  return method.stand_in_consts() if hasattr(method, "dataset_consts") else {}


def recipe(name):
  """configs/<name>.py's get_config() (built-in preset), loaded by path as main.py does."""
  path = ROOT / "configs" / f"{name}.py"
  assert path.is_file(), f"method {name!r} is registered but has no recipe {path}"
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((B, T), np.float32)
  mask[1, T // 2:] = 0.0   # the second video is padded
  label = np.zeros((B, C), np.float32)
  label[0, 0] = label[1, 1] = label[1, 2] = 1.0
  return {"feat_BxTxD": rng.normal(size=(B, T, DIMS["feat"])).astype(np.float32),
          "vlm_BxTxE": rng.normal(size=(B, T, DIMS["vlm"])).astype(np.float32),
          "mask_BxT": mask, "label_BxC": label,
          "index_B": np.arange(B, dtype=np.int32), "valid_B": np.ones(B, np.float32),
          "scale_B": np.ones(B, np.float32),
          "key_tokens_BxL": np.array([[6, 2, 11, 0], [7, 3, 4, 8]], np.int32),
          "complete_tokens_BxL": np.array([[9, 2, 11, 4, 0, 0], [10, 3, 5, 6, 7, 0]], np.int32),
          # Candidate proposals (P-MIL's, SEAL's inputs), overlapping; 18 in the first video
          # (top-k sets of k = 18 // 8 = 2: SEAL's L_st needs two), 4 in the second, whose
          # other rows are padding.
          "proposals_BxMx2": np.array(
              [[[0, 6], [2, 8], [3, 5], [10, 20], [12, 24], [1, 3], [4, 9], [6, 12], [7, 10],
                [9, 14], [11, 16], [13, 18], [15, 19], [16, 22], [17, 21], [18, 23], [19, 24],
                [20, 24]],
               [[0, 4], [1, 6], [5, 9], [8, 12]] + [[0, 0]] * 14], np.float32),
          "proposal_mask_BxM": np.array([[1] * 18, [1] * 4 + [0] * 14], np.float32)}


def test_rank_promotion_raises_in_the_whole_suite():
  """conftest.py sets jax_numpy_rank_promotion='raise' for every test file."""
  assert jax.config.jax_numpy_rank_promotion == "raise"
  with pytest.raises(ValueError, match="rank_promotion"):
    jnp.ones((2, 3)) + jnp.ones((3,))


def test_registry_names_classes_and_unknown_method_errors():
  assert set(methods.METHODS) == set(methods.REGISTRY) >= {"base", "vlpo", "co2net", "pvlr"}
  for name in methods.REGISTRY:
    assert isinstance(methods.method_class(name), type)
  with pytest.raises(WstalError, match="unknown method.*choose one of"):
    methods.method_class("nope")


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_method_contract_on_a_tiny_batch(name):
  config = recipe(name)
  assert config.method == name
  rng = np.random.default_rng(1)
  text = rng.normal(size=(C, DIMS["text"])).astype(np.float32)
  method = methods.get_method(config, C, DIMS, class_names=[f"Class{c}" for c in range(C)])
  assert isinstance(method, methods.Method)
  from wstal_jax import postprocess
  assert method.postprocess_preset in postprocess.PRESETS
  starts = tuple(method.phase_starts)
  assert starts[0] == 0 and all(b > a for a, b in zip(starts, starts[1:]))
  extra = method.extra_consts()
  assert isinstance(extra, dict)
  consts = {"text_CxE": jnp.asarray(text), **description_consts(), **extra,
            **dataset_stand_ins(method)}
  batch = {k: jnp.asarray(v) for k, v in tiny_batch().items()}

  params = method.init(jax.random.key(0), batch, consts)["params"]
  for start in starts:
    labels = method.param_labels(params, start)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert all(l in ("train", "freeze") or l.startswith("train@")
               for l in jax.tree.leaves(labels))
    assert any(train.is_trained(l) for l in jax.tree.leaves(labels))

  def loss_fn(p):
    return method.loss(p, batch, consts, jax.random.key(2), jnp.int32(0))

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert loss.shape == () and np.isfinite(float(loss))
  assert aux and all(np.isfinite(float(v)) for v in aux.values()), aux
  # loss_weights names the terms the total sums, with their weights.
  weights = method.loss_weights()
  assert weights and set(weights) <= set(aux), (weights, aux)
  np.testing.assert_allclose(sum(w * float(aux[k]) for k, w in weights.items()), float(loss),
                             rtol=1e-5, atol=1e-6)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(np.abs(g).sum()) for g in leaves) > 0   # the loss trains something

  out = jax.jit(method.predict)(params, batch, consts)
  assert out["video_scores_BxC"].shape == (B, C)
  assert out["cas_BxTxC"].shape == (B, T, C)
  if "actionness_BxT" in out:
    assert out["actionness_BxT"].shape == (B, T)
  for key, value in out.items():
    assert np.all(np.isfinite(np.asarray(value))), key
  # Padded snippets score 0.
  np.testing.assert_array_equal(np.asarray(out["cas_BxTxC"])[1, T // 2:], 0.0)
  # A local network (chunked evaluation, eval_forward.py): predict is the scoring of the
  # per-snippet network outputs (tests/test_eval_forward.py checks the chunks are exact).
  if getattr(method, "receptive_field", None) is not None:
    assert isinstance(method.receptive_field, int) and method.receptive_field >= 0
    snip = jax.jit(method.snippet_outputs)(params, batch, consts)
    assert all(v.shape[:2] == (B, T) for v in snip.values())
    composed = jax.jit(method.predict_from_outputs)(snip, batch, consts)
    assert set(composed) == set(out)
    for key in out:
      np.testing.assert_allclose(composed[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_weighted_term_has_a_gradient_at_init(name):
  """The "every term acts" criterion at init (README, "Every term acts"): on a tiny batch,
  each weighted term of the recipe has a non-zero gradient on the parameters some phase
  trains (at that phase's first step; a multi-phase method gates its terms by phase), and
  train.term_grad_norms_fn agrees with one jax.grad per term (first phase)."""
  from wstal_jax import train
  config = recipe(name)
  text = np.random.default_rng(1).normal(size=(C, DIMS["text"])).astype(np.float32)
  method = methods.get_method(config, C, DIMS, class_names=[f"Class{c}" for c in range(C)])
  consts = {"text_CxE": jnp.asarray(text), **description_consts(), **method.extra_consts(),
            **dataset_stand_ins(method)}
  batch = tiny_batch()
  batch["label_BxC"][0, 1] = 1.0   # the two videos share class 1 (pair terms: L_oppo, ...)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = method.init(jax.random.key(0), batch, consts)["params"]
  weights = method.loss_weights()
  rng = jax.random.key(2)
  best = dict.fromkeys(weights, 0.0)
  seen = set()
  for start in method.phase_starts:
    labels = method.param_labels(params, start)
    # Phases that train the same parameters with the same terms are checked once (Ju et
    # al.'s warm-up and F steps both train CBP, with different terms).
    aux = method.loss(params, batch, consts, rng, jnp.int32(start))[1]
    key = (tuple(jax.tree.leaves(labels)), tuple(k for k in weights if float(aux[k]) != 0))
    if key in seen:
      continue
    seen.add(key)
    names, fn = train.term_grad_norms_fn(method, labels)
    assert names == tuple(weights)
    step = jnp.int32(start)
    if start == 0:
      # Op by op, like the per-term reference below (the check is of the weights, the
      # 'train' mask and the norms; a compiled program may round the forward differently).
      norms = np.asarray(fn(params, batch, consts, rng, step))
      trained = [train.is_trained(l) for l in jax.tree.leaves(labels)]
      for k, got in zip(names, norms):
        g = jax.grad(lambda p, k=k: weights[k] * method.loss(p, batch, consts, rng, step)[1][k])(
            params)
        want = np.sqrt(sum(float(np.sum(np.square(np.asarray(x))))
                           for x, t in zip(jax.tree.leaves(g), trained) if t))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8, err_msg=k)
    else:
      norms = np.asarray(jax.jit(fn)(params, batch, consts, rng, step))
    for k, got in zip(names, norms):
      best[k] = max(best[k], float(got))
  for k, w in weights.items():
    if w:
      assert best[k] > 0, f"{name}: weighted term {k} has no gradient in any phase at init"
