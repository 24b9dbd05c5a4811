"""Chunked evaluation forward (eval_forward.py): the snippet stream against a direct
per-video computation, and the Evaluator's chunked mode against length buckets (identical
outputs, proposals and metrics) for VLPO and its baseline."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from wstal_jax import eval_forward
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def window_sum(x_TxD, halo):
  """Each snippet's sum over [t - halo, t + halo] with zeros outside the video."""
  padded = np.concatenate([np.zeros((halo,) + x_TxD.shape[1:]), x_TxD,
                           np.zeros((halo,) + x_TxD.shape[1:])])
  return sum(padded[i:i + len(x_TxD)] for i in range(2 * halo + 1))


@pytest.mark.parametrize("halo,row_len,rows", [(0, 5, 1), (1, 7, 3), (3, 4, 2), (2, 64, 2)])
def test_stream_reproduces_each_video(halo, row_len, rows):
  """A windowed 'network' run on the stream's rows gives every video exactly its own
  zero-padded windowed sums (videos shorter and longer than a row, added in batches)."""
  rng = np.random.default_rng(halo * 100 + row_len)
  lengths = [1, 3, 17, 2, 40, 9, 1, 25]
  videos = {i: rng.normal(size=(t, 2)) for i, t in enumerate(lengths)}
  stream = eval_forward.SnippetStream(halo, row_len, rows)
  plan = eval_forward.num_row_batches([lengths], halo, row_len, rows)
  cut = []

  def network(batch):
    assert batch["feat"].shape == (rows, row_len + 2 * halo, 2)
    mask = batch["mask_BxT"][:, :, None]
    # Masked inputs read as 0 (the stream's gaps are already 0; this checks they are masked).
    x = np.where(mask > 0, batch["feat"], 0.0)
    out = np.stack([window_sum(r, halo) for r in x])
    return {"out": out, "mask_out": batch["mask_BxT"]}

  for start in range(0, len(lengths), 3):
    for i in range(start, min(start + 3, len(lengths))):
      stream.add(i, {"feat": videos[i]})
    for batch in stream.rows_ready():
      cut.append(batch)
      stream.put_outputs(network(batch))
  for batch in stream.finish(plan):
    cut.append(batch)
    stream.put_outputs(network(batch))
  assert len(cut) == plan
  for i, x in videos.items():
    got = stream.video_outputs(i)
    np.testing.assert_allclose(got["out"], window_sum(x, halo), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got["mask_out"], np.ones(len(x)))


def test_stream_plan_too_small_is_an_error():
  stream = eval_forward.SnippetStream(1, 4, 1)
  stream.add(0, {"feat": np.ones((20, 1))})
  with pytest.raises(WstalError, match="do not cover"):
    for batch in stream.finish(2):
      stream.put_outputs({"out": batch["feat"]})


def _config(method):
  spec = importlib.util.spec_from_file_location("vlpo_cfg", ROOT / "configs" / f"{method}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.vlpo.embed_dim = 16
  config.vlpo.act_hidden_dim = 16
  config.eval.batch_size = 8
  config.eval.num_plots = 0
  return config


@pytest.mark.parametrize("method", ["vlpo", "base"])
def test_chunked_evaluator_equals_buckets(method):
  """The Evaluator's chunked forward (rows of 24 snippets: most videos span several) gives
  the length-bucket forward's metrics and proposals exactly, and its per-video scores to
  float32 rounding: XLA fuses the network into the pooling in one program but not in the
  other, so the last bit of a score may differ (measured: at most 1e-6 relative)."""
  from wstal_jax import evaluate
  from wstal_jax import run_setup
  results = {}
  for mode, extra in (("buckets", {}), ("chunked", {"chunk_snippets": 24})):
    config = _config(method)
    config.eval.forward = mode
    for k, v in extra.items():
      config.eval[k] = v
    run = run_setup.setup(config)
    evaluator = evaluate.Evaluator(run, split="test", video_indices=np.arange(0, 200, 5))
    assert evaluator.forward_mode == mode
    params = run.init_params(jax.random.key(0),
                             run.put_batch(next(iter(evaluator.batches()))))
    results[mode] = evaluator(params, keep_scores=40)
  got, want = results["chunked"], results["buckets"]
  assert got.metrics == want.metrics
  assert sum(len(p.label) for p in want.proposals.values()) > 0
  assert list(got.scores) == list(want.scores) and len(got.scores) == 40
  for name, sc in want.scores.items():
    for key, value in sc.items():
      np.testing.assert_allclose(got.scores[name][key], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} {key}")
  for name, p in want.proposals.items():
    for field in ("label", "start", "end"):
      np.testing.assert_array_equal(getattr(got.proposals[name], field), getattr(p, field))
    np.testing.assert_allclose(got.proposals[name].score, p.score, rtol=1e-5, atol=1e-7)


def test_auto_and_bad_choices():
  from wstal_jax import methods
  config = _config("vlpo")
  dims = {"feat": 8, "vlm": 4, "text": 4}
  vlpo = methods.get_method(config, 3, dims)
  assert eval_forward.resolve(config, vlpo) == "chunked"
  assert vlpo.receptive_field == config.vlpo.conv_kernel // 2
  config.eval.num_snippets = 750   # resampled videos: one shape already
  assert eval_forward.resolve(config, vlpo) == "buckets"
  with pytest.raises(WstalError, match="needs whole videos"):
    config.eval.forward = "chunked"
    eval_forward.resolve(config, vlpo)

  class Global:   # a method without receptive_field (global attention, pooling, ...)
    pass
  config.eval.num_snippets = None
  with pytest.raises(WstalError, match="not local"):
    eval_forward.resolve(config, Global())
  config.eval.forward = "auto"
  assert eval_forward.resolve(config, Global()) == "buckets"
  config.eval.forward = "fast"
  with pytest.raises(WstalError, match="must be one of"):
    eval_forward.resolve(config, vlpo)


def test_scoring_lengths_minimise_padding_plus_shapes():
  """Brute force over every subset holding the largest length gives the same cost."""
  import itertools
  rng = np.random.default_rng(0)
  for trial in range(20):
    lengths = [int(x) for x in rng.choice([64, 128, 256, 512, 1024, 1600], size=9)]
    shape_cost = int(rng.choice([0, 500, 5000, 10 ** 6]))
    got = eval_forward.scoring_lengths(lengths, 8, shape_cost)
    assert all(g >= t for g, t in zip(got, lengths)) and max(got) == max(lengths)
    cost = lambda padded: 8 * sum(padded) + shape_cost * len(set(padded))
    values = sorted(set(lengths))
    best = min(cost([min(c for c in subset if c >= t) for t in lengths])
               for r in range(len(values)) for subset in itertools.combinations(values[:-1], r)
               for subset in [subset + (values[-1],)])
    assert cost(got) == best, (trial, lengths, shape_cost)
  assert eval_forward.scoring_lengths([64, 128], 8, 0) == [64, 128]
  assert eval_forward.scoring_lengths([64, 128], 8, 10 ** 9) == [128, 128]


def test_row_length_fits_small_streams():
  assert eval_forward.row_length([[5000] * 4], 1, 1024, 8) == 1024
  assert eval_forward.row_length([[100, 50]], 1, 1024, 8) == 64
  assert eval_forward.row_length([[700, 700], [10]], 1, 1024, 8) == 192   # 1402 / 8 -> 192
  assert eval_forward.row_length([[3]], 100, 1024, 8) == 100   # never below the halo


def test_a_run_saved_before_the_fields_existed(tmp_path):
  """A run's config.json without eval.forward / eval.chunk_snippets / compilation_cache (saved
  by an older version): evaluation gets the defaults and accepts overrides of them; the run's
  own values are untouched; resuming it is not refused for them (workdir.RESUME_SAFE)."""
  import json
  from wstal_jax import config_common
  from wstal_jax import workdir as workdir_lib
  config = _config("vlpo")
  config.eval.batch_size = 4
  saved = workdir_lib.config_to_json(config)
  for block, field in (("eval", "forward"), ("eval", "chunk_snippets"),
                       (None, "compilation_cache")):
    del (saved[block] if block else saved)[field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  got = workdir_lib.saved_config(str(tmp_path), {"eval.forward": "buckets"})
  assert got.eval.forward == "buckets" and got.eval.chunk_snippets == 1024
  assert got.compilation_cache == "" and got.eval.batch_size == 4
  assert got.vlpo.embed_dim == 16
  assert not workdir_lib.config_differences(saved, workdir_lib.config_to_json(config),
                                            ignore=workdir_lib.RESUME_SAFE)
  assert config_common.base_config(name="x", method="vlpo").eval.forward == "auto"
