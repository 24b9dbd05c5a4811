"""benchmarks/: the run.py CLI in its tiny mode, and agreement of the benchmark's reference
implementations with wstal_jax (the CO2-Net evaluation loop vs postprocess's 'co2net' preset;
the PyTorch baseline vs the Flax baseline)."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load(name):
  spec = importlib.util.spec_from_file_location(f"wstal_bench_{name}",
                                                ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load("run")
ref = _load("co2net_reference_eval")

from wstal_jax import postprocess  # noqa: E402

SPS = postprocess.SECONDS_PER_SNIPPET


def test_cli_tiny_eval_and_input(tmp_path):
  out = tmp_path / "eval.json"
  assert bench.main(["--only=eval", "--tiny", f"--json={out}"]) == 0
  result = json.loads(out.read_text())
  assert set(bench.KEYS) <= set(result)
  for key in ("device", "eval_forward_s", "eval_compile_s", "eval_postprocess_s", "eval_map_s",
              "eval_reference_loop_s", "eval_num_videos", "peak_host_memory_mib",
              "eval_end_to_end_s", "eval_forward_flop_per_s"):
    assert result[key] is not None, key
  assert "eval_forward_torch_s" in result   # null where torch is not installed
  # The Evaluator's forward is the exact chunked one for VLPO: about the real snippets only.
  now = result["eval"]["forward_vlpo_now"]
  assert now["mode"] == "chunked" and now["padded_snippets"] < 2 * result["eval_num_snippets"]
  assert result["train_steps_per_s_jax"] is None   # not run: present, null
  assert result["eval_num_videos"] == 8
  assert result["eval_proposals_per_video"] > 0
  # Same proposals -> the same kind of mAP; the loop's differs only by its documented rules.
  assert abs(result["eval_average_map"] - result["eval_reference_average_map"]) < 0.1

  out = tmp_path / "input.json"
  assert bench.main(["--only=input", "--tiny", f"--json={out}"]) == 0
  result = json.loads(out.read_text())
  assert result["input_videos_per_s"] > 0
  assert result["input_eval_videos_per_s"] > 0
  assert result["input"]["small"]["eval_videos_timed"] == 2


def _agreement_videos():
  """A few test videos: short ones with ambiguous segments first, then short ones without."""
  videos, _, _ = bench.thumos14_test_set()
  short = [v for v in videos if v.num_snippets <= 400]
  with_amb = [v for v in short if len(v.ambiguous)][:3]
  without = [v for v in short if not len(v.ambiguous)][:3]
  assert with_amb and without
  return with_amb + without


def _snap_to_grid(segments_Mx2):
  """Ambiguous segments moved to snippet boundaries, where the loop's rounded snippet ranges
  and our overlap in seconds are the same rule."""
  return np.round(np.asarray(segments_Mx2) / SPS) * SPS


def test_co2net_reference_loop_gives_our_proposals():
  config = postprocess.get_preset("co2net")
  rng = np.random.default_rng(0)
  compared = 0
  for v in _agreement_videos():
    video_C, cas_TxC, act_T = bench.trained_like_scores(v, rng)
    # The loop drops a class's proposals at a threshold where snippet 0 alone is above it
    # (tested below); keep snippet 0 below every threshold so that rule never applies here.
    act_T = act_T.copy()
    act_T[0] = 0.0
    amb = _snap_to_grid(v.ambiguous)
    lines = [[v.name, repr(float(s)), repr(float(e))] for s, e in amb]
    rows = ref.video_proposals(v.name, video_C, cas_TxC, act_T, ambiguous_lines=lines)
    # duration=None: the loop does not clip to the video's end.
    ours = postprocess.video_proposals(video_C, cas_TxC, act_T, seconds_per_snippet=SPS,
                                       duration=None, config=config, ambiguous=amb)
    assert len(ours) == len(rows) > 0, v.name
    np.testing.assert_array_equal(ours.label, rows[:, 3].astype(np.int64))
    np.testing.assert_allclose(ours.start, rows[:, 0] * SPS, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.end, rows[:, 1] * SPS, rtol=1e-12, atol=1e-12)
    # The loop averages the float32 scores in float32 (as it does on torch outputs); ours in
    # float64.
    np.testing.assert_allclose(ours.score, rows[:, 2], rtol=1e-6, atol=1e-7)
    compared += len(rows)
  assert compared > 100


def test_ambiguous_filter_removes_overlapping_proposals():
  v = _agreement_videos()[0]
  video_C, cas_TxC, act_T = bench.trained_like_scores(v, np.random.default_rng(1))
  act_T = act_T.copy()
  act_T[0] = 0.0
  amb = _snap_to_grid(v.ambiguous)
  lines = [[v.name, repr(float(s)), repr(float(e))] for s, e in amb]
  kept = ref.video_proposals(v.name, video_C, cas_TxC, act_T, ambiguous_lines=lines)
  everything = ref.video_proposals(v.name, video_C, cas_TxC, act_T)
  assert 0 < len(kept) < len(everything)
  for t_start, t_end, _, _ in kept:
    for s, e in amb:
      assert not set(range(int(t_start), int(t_end))) & set(range(round(s / SPS), round(e / SPS)))


def test_reference_loop_skips_a_lone_snippet_zero():
  """The loop's `.any()` on index lists: snippet 0 alone above a threshold gives nothing."""
  act_T = np.array([0.95, 0.5, 0.5, 0.05, 0.05, 0.05, 0.5, 0.5, 0.05, 0.05])
  cas_TxC = np.tile(act_T[:, None], (1, 3)) * np.array([1.0, 0.5, 0.2])
  video_C = np.array([0.8, 0.1, 0.1])
  rows = ref.video_proposals("v", video_C, cas_TxC, act_T)
  config = postprocess.get_preset("co2net")
  ours = postprocess.video_proposals(video_C, cas_TxC, act_T, seconds_per_snippet=SPS,
                                     duration=None, config=config)
  # Thresholds 0.54 .. 0.9 (5 of 10) see snippet 0 alone; ours keeps those regions.
  assert len(ours) == len(rows) + 5
  assert not ((rows[:, 0] == 0) & (rows[:, 1] == 1)).any()


def test_loop_map_matches_our_map_on_the_same_proposals():
  """detection_map_loop (snippet units, GT rounded) equals metrics.detection_map fed the same
  proposals and the same rounded ground truth."""
  from wstal_jax import metrics
  videos = _agreement_videos()
  rng = np.random.default_rng(2)
  rows_by_video = {v.name: ref.video_proposals(v.name, *bench.trained_like_scores(v, rng))
                   for v in videos}
  gt = bench.ground_truth_table(videos)
  map_loop, _ = ref.detection_map_loop(gt, rows_by_video, metrics.THUMOS14_TIOU, 20)
  map_vec, _ = metrics.detection_map(ref.ground_truth_in_snippets(gt),
                                     ref.proposals_table(rows_by_video), metrics.THUMOS14_TIOU,
                                     num_classes=20)
  np.testing.assert_allclose(map_loop, map_vec, rtol=0, atol=1e-12)


def test_jax_train_step_runs_at_tiny_shapes():
  info, step, loss = bench.jax_train_stepper("base", bench.SHAPES["tiny"])
  step()
  step()
  assert np.isfinite(loss())
  assert info["flops_per_step"] and info["flops_per_step"] > 0


def test_train_shapes_follow_the_configs():
  """Each method's benchmark shapes are its config preset's (T, batch) and CO2-Net's split of
  the I3D width works."""
  for name in ("thumos14", "small"):
    for method in bench.TRAIN_METHODS:
      shapes = bench.method_shapes(method, name)
      config = bench._load_config(method, shapes.config_arg)  # pylint: disable=protected-access
      assert (config.data.num_snippets, config.train.batch_size) == (
          shapes.num_t, shapes.batch), (method, name)
      assert shapes.feat_dim % 2 == 0
  assert bench.method_shapes("pvlr", "thumos14").vlm_dim == 1024   # CLIP RN50
  assert bench.method_shapes("vlpo", "thumos14").vlm_dim == 768


@pytest.mark.parametrize("method", ["co2net", "pvlr", "ju2023", "delu", "mllm4wtal", "pmil",
                                    "seal"])
def test_co2net_and_pvlr_train_steps_trace_at_tiny_shapes(method):
  """The benchmark's set-up (dims, constants, batch keys) fits the method: the trainer's step
  traces (jax.eval_shape: no compilation, which costs 15-40 s for these two)."""
  import jax
  import jax.numpy as jnp
  from wstal_jax import train

  shapes = bench.method_shapes(method, "tiny")
  config, run = bench._setup(method, shapes)  # pylint: disable=protected-access
  batch = bench.make_train_batch(shapes, with_vlm=bench.uses_vlm(method),
                                 text_lengths=bench.text_lengths(config),
                                 num_proposals=bench.proposal_count(config))
  assert ("proposals_BxMx2" in batch) == (method in ("pmil", "seal"))
  assert ("vlm_BxTxE" in batch) == bench.uses_vlm(method)
  assert ("key_tokens_BxL" in batch) == (method == "mllm4wtal")
  init = run._init_params  # pylint: disable=protected-access
  params = jax.eval_shape(init, jax.random.key(0), batch, run.consts)
  tx = train.make_optimizer(config, run.method.param_labels(params, 0),
                            alternate_steps=getattr(run.method, "alternate_steps", 1))
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  new_state, terms = jax.eval_shape(train.make_train_step(run, tx), state, batch, run.consts,
                                    jax.random.key(1))
  assert terms["loss"].shape == () and len(terms) > 1
  assert jax.tree.structure(new_state["params"]) == jax.tree.structure(params)


def test_torch_baseline_matches_flax_baseline():
  torch = pytest.importorskip("torch")
  torch_reference = _load("torch_reference")
  import jax
  from wstal_jax.methods import vlpo as vlpo_method

  shapes = bench.SHAPES["tiny"]
  _, run = bench._setup("base", shapes)  # pylint: disable=protected-access
  batch = bench.make_train_batch(shapes, seed=3)

  @jax.jit   # one compilation instead of one per op
  def flax_side(batch):
    params = run.method.init(jax.random.key(0), batch, {})["params"]
    outputs = run.method.model.apply({"params": params}, batch, {}, train=False)
    loss, aux = vlpo_method.vlpo_loss(outputs, batch, run.method.settings)
    return params, outputs["cas_BxTxC"], loss, aux

  params, cas_jax, loss_jax, aux_jax = flax_side(batch)

  cfg = run.config.vlpo
  model = torch_reference.BaselineModel(shapes.feat_dim, 20, cfg.embed_dim, cfg.act_hidden_dim,
                                        cfg.conv_kernel, cfg.dropout)
  torch_reference.load_flax_params(model, params)
  model.eval()
  with torch.no_grad():
    cas, s_a = model(torch.from_numpy(batch["feat_BxTxD"]))
    loss_torch, aux_torch = torch_reference.baseline_loss(
        cas, s_a, torch.from_numpy(batch["label_BxC"]), topk_divisor=cfg.topk_divisor, q=cfg.q)
  np.testing.assert_allclose(cas.numpy(), np.asarray(cas_jax), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(aux_torch["l_mil"]), float(aux_jax["l_mil"]), rtol=1e-5)
  np.testing.assert_allclose(float(aux_torch["l_act"]), float(aux_jax["l_act"]), rtol=1e-5)
  np.testing.assert_allclose(float(loss_torch), float(loss_jax), rtol=1e-5)
