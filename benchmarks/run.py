"""wstal_jax speed on this machine: training steps, THUMOS14-sized evaluation, input pipeline.

  python benchmarks/run.py --only=all --json=bench.json [--markdown=bench.md] [--quick]

--only=train  Train-step throughput (videos/s, steps/s; compilation timed apart) of the
              baseline ('base') and VLPO ('vlpo') at THUMOS14 shapes (T=750, batch 16, I3D
              2048-d, VLM 768-d, the configs' `dataset=thumos14` widths), of CO2-Net
              ('co2net') and PVLR ('pvlr') at their protocol's THUMOS14 shapes (T=320, batch
              10, I3D 2048-d, CLIP 1024-d), and of all four at the built-in `small` shapes
              (T=128, 128-d / 64-d; batch 16, CO2-Net / PVLR 10), each as the trainer runs
              it: the method's loss + the config's optax Adam in one jax.jit step with the
              state donated (`wstal_jax.train.make_train_step`). Next to it the same baseline
              in eager PyTorch (benchmarks/torch_reference.py, torch.optim.Adam) on the same
              batch, steps interleaved with the JAX ones, with torch's default threads and
              with 1 thread (the faster is the baseline). FLOPs per step from XLA's cost
              analysis, and the achieved FLOP/s.
--only=eval   A THUMOS14-sized test set: the 212 test videos with their real lengths
              (T = round(duration x 25 / 16)) and ground truth from the shared W-TALC
              annotations, else the built-in `full` test split. Forward pass: VLPO's jitted
              predict over batches of 8 whole videos padded to length buckets
              (input_pipeline.eval_plan; random features and parameters: values do not
              change the cost), in manifest order (the Evaluator's batching before it
              read in plan order) and longest first (order='length', what eval_batches and
              the Evaluator use now). Post-processing (`postprocess.proposals_for_videos`,
              all videos at once, as the Evaluator calls it; also `video_proposals` per
              video, as it did before)
              and detection mAP (`metrics.detection_map`, tIoU 0.1:0.7) run on
              trained-model-like scores generated from the ground truth, once with the
              'co2net' preset (the work the reference does) and once with VLPO's own
              preset. The reference is
              benchmarks/co2net_reference_eval.py (the CO2-Net/PVLR loop) + the official mAP
              loop (benchmarks/eval_speed.naive_detection_ap).
--only=input  videos/s from TFRecord shards written with data.format.write_dataset at full
              dims (2048 + 768; THUMOS14 test lengths) through input_pipeline.train_batches
              (T=750, batch 16) and eval_batches (whole videos, batch 8), and the same at the
              built-in `small` dims and lengths (T=128, batch 16).

Prints a markdown table; --json writes every number (flat keys listed in README.md) plus
details. --quick (about 2 minutes on 2 CPU cores) times fewer steps (train: the baseline
against torch at THUMOS14 shapes, one timed step each) and a subset of the test set for the forward
pass (extrapolated by padded snippets, flagged in the JSON); --tiny is for tests. Timings
are wall-clock medians; the load average is recorded, because the CPU may be shared.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import wstal_jax  # noqa: E402

wstal_jax.quiet_native_logs()   # before tensorflow is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wstal_jax import eval_forward as eval_forward_lib  # noqa: E402
from wstal_jax import input_pipeline  # noqa: E402
from wstal_jax import methods  # noqa: E402
from wstal_jax import metrics  # noqa: E402
from wstal_jax import postprocess  # noqa: E402
from wstal_jax import run_setup  # noqa: E402
from wstal_jax import train  # noqa: E402
from wstal_jax.data import format as data_format  # noqa: E402

import co2net_reference_eval  # noqa: E402

_TORCH = []


def torch_reference():
  """benchmarks/torch_reference.py, or None when torch is not installed (a benchmark extra,
  imported only when a torch measurement runs)."""
  if not _TORCH:
    try:
      import torch_reference as module  # pylint: disable=import-outside-toplevel
    except ImportError:
      module = None
    _TORCH.append(module)
  return _TORCH[0]

SECTIONS = ("train", "eval", "input")
NUM_CLASSES = 20
SPS = postprocess.SECONDS_PER_SNIPPET
# Flat keys every JSON has (null when not measured); README.md explains each.
KEYS = (
    "device", "train_steps_per_s_jax", "train_videos_per_s_jax", "train_compile_s_jax",
    "train_flops_per_step_jax", "train_flop_per_s_jax", "train_steps_per_s_torch",
    "train_videos_per_s_torch", "train_speedup_vs_torch", "train_steps_per_s_vlpo",
    "train_compile_s_vlpo", "train_flops_per_step_vlpo", "train_flop_per_s_vlpo",
    "train_steps_per_s_jax_small", "train_steps_per_s_torch_small",
    "train_speedup_vs_torch_small", "train_steps_per_s_vlpo_small", "train_steps_per_s_pvlr",
    "train_videos_per_s_vlpo", "train_videos_per_s_pvlr", "train_compile_s_pvlr",
    "train_flops_per_step_pvlr", "train_flop_per_s_pvlr", "train_steps_per_s_pvlr_small",
    "train_steps_per_s_co2net", "train_videos_per_s_co2net", "train_compile_s_co2net",
    "train_flops_per_step_co2net", "train_flop_per_s_co2net",
    "train_steps_per_s_co2net_small", "gemm_flop_per_s",
    "eval_num_videos", "eval_num_snippets", "eval_forward_s", "eval_compile_s",
    "eval_forward_flop_per_s", "eval_forward_manifest_s", "eval_forward_compile_s",
    "eval_forward_base_s", "eval_forward_sorted_s", "eval_forward_sorted_compile_s",
    "eval_forward_base_sorted_s", "eval_forward_torch_s", "eval_postprocess_s", "eval_map_s",
    "eval_postprocess_map_s", "eval_postprocess_per_video_s", "eval_end_to_end_s",
    "eval_end_to_end_vlpo_s", "eval_family_pipeline_s", "eval_speedup_end_to_end",
    "eval_speedup_end_to_end_vlpo", "eval_forward_speedup_vs_torch", "eval_end_to_end_base_s",
    "eval_speedup_end_to_end_base", "eval_forward_base_speedup_vs_torch",
    "eval_end_to_end_fast_s", "eval_postprocess_vlpo_s", "eval_map_vlpo_s",
    "eval_reference_postprocess_s", "eval_reference_map_s", "eval_reference_loop_s",
    "eval_speedup_vs_reference", "eval_speedup_vs_reference_per_video",
    "eval_proposals_per_video",
    "eval_average_map", "eval_reference_average_map", "input_videos_per_s",
    "input_eval_videos_per_s", "input_videos_per_s_small", "peak_host_memory_mib")


# ------------------------------------------------------------------------------------ helpers


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _load_config(name, arg):
  """configs/<name>.py get_config(arg) (config files are loaded by path)."""
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"bench_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.mesh.num_devices = 1
  return config


def _cpu_name():
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def device_description():
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu ({_cpu_name()}, {os.cpu_count()} cores)"
  return f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}"


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Train-step shapes; `config_arg` picks the matching config preset (model widths, T, B)."""
  name: str
  batch: int
  num_t: int
  feat_dim: int
  vlm_dim: int
  config_arg: str


SHAPES = {
    "thumos14": Shapes("thumos14", 16, 750, 2048, 768, "dataset=thumos14"),
    "small": Shapes("small", 16, 128, 128, 64, "dataset=builtin"),
    "tiny": Shapes("tiny", 4, 32, 32, 16, "dataset=builtin"),
}
# CO2-Net and PVLR train with their family's protocol (config_common.co2net_protocol:
# T=320, batch 10 on THUMOS14; T=128, batch 10 on the built-in benchmark) and PVLR reads CLIP
# image features (RN50: 1024-d; the built-in `small` clip stream: 64-d) with class text
# embeddings in the same space. vlm_dim is that CLIP width here.
SHAPES_CO2NET = {
    "thumos14": Shapes("thumos14", 10, 320, 2048, 1024, "dataset=thumos14"),
    "small": Shapes("small", 10, 128, 128, 64, "dataset=builtin"),
    "tiny": Shapes("tiny", 4, 32, 32, 16, "dataset=builtin"),
}
# Ju et al. 2023 (configs/ju2023.py): T consecutive snippets, T = 1000 on THUMOS14 (Sec. 4.1),
# batch 16, CLIP ViT-B/16 image features (512-d) for the VLP branch; built-in: T = 256.
SHAPES_JU = {
    "thumos14": Shapes("thumos14", 16, 1000, 2048, 512, "dataset=thumos14"),
    "small": Shapes("small", 16, 256, 128, 64, "dataset=builtin"),
    "tiny": Shapes("tiny", 4, 32, 32, 16, "dataset=builtin"),
}
# P-MIL (configs/pmil.py): whole videos padded to T ('pad' sampling: the config's T, the
# longest training video: THUMOS14 2304, built-in 400) with config.data.max_proposals
# candidates each (THUMOS14: 1000, the built-in preset 512), all valid.
SHAPES_PMIL = {
    "thumos14": Shapes("thumos14", 10, 2304, 2048, 1024, "dataset=thumos14"),
    "small": Shapes("small", 10, 400, 128, 64, "dataset=builtin"),
    "tiny": Shapes("tiny", 4, 32, 32, 16, "dataset=builtin"),
}
# One row per method (a new method adds its row): its train-step shapes, and whether its
# batches carry the second feature stream (VLM / CLIP) with class text embeddings in its space.
BENCH_METHODS = {
    "base": (SHAPES, True),      # reads neither, but is timed on VLPO's batches
    "vlpo": (SHAPES, True),
    "co2net": (SHAPES_CO2NET, False),
    "pvlr": (SHAPES_CO2NET, True),
    "ju2023": (SHAPES_JU, True),
    "delu": (SHAPES_CO2NET, False),   # CO2-Net's protocol and shapes
    "mllm4wtal": (SHAPES_CO2NET, False),   # on DELU; its batches also carry descriptions
    "pmil": (SHAPES_PMIL, False),   # its batches carry candidate proposals
    "seal": (SHAPES_PMIL, False),   # P-MIL's protocol and proposals, fused network
}
# Methods whose batches carry description tokens (config.data.descriptions): vocabulary and
# word-vector width per shape family (THUMOS14: GloVe 300-d, a vocabulary of the order of
# the descriptions' distinct words; built-in: its synthetic 50-d vectors, ~200 words).
TEXT_SHAPES = {"thumos14": (2000, 300), "small": (200, 50), "tiny": (50, 8)}
TRAIN_METHODS = tuple(BENCH_METHODS)
TIMED_METHODS = tuple(m for m in TRAIN_METHODS if m != "base")   # base: the torch comparison


def method_shapes(method_name, shape_name) -> Shapes:
  """The train-step shapes of `method_name` at the `shape_name` family."""
  return BENCH_METHODS[method_name][0][shape_name]


def uses_vlm(method_name) -> bool:
  return BENCH_METHODS[method_name][1]


def make_train_batch(shapes: Shapes, seed=0, with_vlm=True, text_lengths=None,
                     num_proposals=None):
  """A fixed-T training batch (numpy, the input pipeline's keys); I3D-like features >= 0.
  vlm_BxTxE (the VLM / CLIP stream) is left out when `with_vlm` is False, as the input
  pipeline does for a config without config.data.vlm_feature. text_lengths (L_key,
  L_complete): description tokens as well (ids of the TEXT_SHAPES vocabulary).
  num_proposals M: candidate proposals as well (random segments of 1 to T / 4 snippets,
  all valid)."""
  rng = np.random.default_rng(seed)
  b, t = shapes.batch, shapes.num_t
  label = np.zeros((b, NUM_CLASSES), np.float32)
  label[np.arange(b), rng.integers(0, NUM_CLASSES, b)] = 1.0
  batch = {
      "feat_BxTxD": np.abs(rng.standard_normal((b, t, shapes.feat_dim), np.float32)),
      "vlm_BxTxE": rng.standard_normal((b, t, shapes.vlm_dim), np.float32),
      "mask_BxT": np.ones((b, t), np.float32), "label_BxC": label,
      "index_B": np.arange(b, dtype=np.int32), "valid_B": np.ones(b, np.float32),
      "scale_B": np.ones(b, np.float32)}
  if not with_vlm:
    del batch["vlm_BxTxE"]
  if num_proposals:
    length = rng.uniform(1.0, max(t / 4, 1.0), (b, num_proposals))
    start = rng.uniform(0.0, 1.0, (b, num_proposals)) * (t - length)
    batch["proposals_BxMx2"] = np.stack([start, start + length], -1).astype(np.float32)
    batch["proposal_mask_BxM"] = np.ones((b, num_proposals), np.float32)
  if text_lengths:
    vocab = TEXT_SHAPES[shapes.name][0]
    for field, length in zip(("key_tokens_BxL", "complete_tokens_BxL"), text_lengths):
      batch[field] = rng.integers(2, vocab, (b, length)).astype(np.int32)
  return batch


def _description_consts(config, shapes: Shapes):
  """dims and constants as run_setup.description_consts gives them (random vectors)."""
  vocab, width = TEXT_SHAPES[shapes.name]
  rng = np.random.default_rng(2)
  lk, lc = int(config.data.max_key_tokens), int(config.data.max_complete_tokens)
  toks = lambda n: rng.integers(2, vocab, (NUM_CLASSES, n)).astype(np.int32)
  return {"words": width, "vocab": vocab}, {
      "word_vectors_VxD": rng.standard_normal((vocab, width)).astype(np.float32),
      "class_name_tokens_CxL": toks(lk), "class_key_tokens_CxL": toks(lk),
      "template_tokens_CxL": toks(lc)}


def proposal_count(config):
  """M of the method's training batches (None without candidate proposals)."""
  return int(config.data.max_proposals) if config.data.get("proposals") else None


def text_lengths(config):
  if not config.data.get("descriptions"):
    return None
  return int(config.data.max_key_tokens), int(config.data.max_complete_tokens)


def _text(dim, seed=1):
  x = np.random.default_rng(seed).standard_normal((NUM_CLASSES, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _setup(method_name, shapes: Shapes, config_overrides=None):
  """(config, run_setup.Setup) for a method at `shapes`, without a dataset.

  configs/<method>.py with `shapes.config_arg`; dims and constants as run_setup.setup builds
  them from a dataset: base / vlpo get the VLM stream and its text embeddings (base ignores
  them), co2net neither, pvlr the CLIP stream with class text embeddings in the CLIP space
  (its default 'precomputed' text mode, no CLIP checkpoint)."""
  config = _load_config(method_name, shapes.config_arg)
  for key, value in (config_overrides or {}).items():
    config.vlpo[key] = value
  if not uses_vlm(method_name):
    dims, consts = {"feat": shapes.feat_dim, "vlm": None, "text": None}, {}
  else:
    dims = {"feat": shapes.feat_dim, "vlm": shapes.vlm_dim, "text": shapes.vlm_dim}
    consts = {"text_CxE": _text(shapes.vlm_dim)}
  if config.data.get("descriptions"):
    more_dims, more = _description_consts(config, shapes)
    dims.update(more_dims)
    consts.update(more)
  method = methods.get_method(config, NUM_CLASSES, dims,
                              class_names=[f"class {i}" for i in range(NUM_CLASSES)])
  consts.update(method.extra_consts())
  if hasattr(method, "dataset_consts"):     # from the training split: random stand-ins
    consts.update(method.stand_in_consts())
  mesh = run_setup.make_mesh(config)
  consts = jax.device_put(consts, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  run = run_setup.Setup(config=config, data_dir="<benchmark: in-memory batches>", manifest={},
                        method=method, consts=consts, mesh=mesh)
  return config, run


def _cost_flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


# -------------------------------------------------------------------------------------- train


def jax_train_stepper(method_name, shapes: Shapes):
  """The trainer's jitted, donated step on one fixed batch.

  -> (info {'compile_s', 'flops_per_step'}, step() that runs one step and waits for it,
      last_loss() -> float).
  """
  config, run = _setup(method_name, shapes)
  batch = run.put_batch(make_train_batch(shapes, with_vlm=uses_vlm(method_name),
                                         text_lengths=text_lengths(config),
                                         num_proposals=proposal_count(config)))
  params = run.init_params(jax.random.key(0), batch)
  tx = train.make_optimizer(config, run.method.param_labels(params, 0),
                            alternate_steps=getattr(run.method, "alternate_steps", 1))
  step_fn = train.make_train_step(run, tx, 0)   # the phase of step 0
  holder = {"state": {"step": jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
                      "params": params,
                      "opt_state": jax.jit(tx.init, out_shardings=run.replicated)(params)},
            "terms": None}
  key = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(holder["state"], batch, run.consts, key).compile()
  info = {"compile_s": time.perf_counter() - t0, "flops_per_step": _cost_flops(compiled)}

  def step():
    holder["state"], holder["terms"] = compiled(holder["state"], batch, run.consts, key)
    jax.block_until_ready((holder["state"], holder["terms"]))

  def last_loss():
    return float(jax.device_get(holder["terms"]["loss"]))
  return info, step, last_loss


def torch_train_stepper(shapes: Shapes, threads: int):
  """The eager PyTorch baseline at the same shapes and hyper-parameters (same batch), run with
  `threads` intra-op threads (set before each step, as steps of different settings are
  interleaved)."""
  torch = torch_reference().torch
  config = _load_config("base", shapes.config_arg)
  v = config.vlpo
  holder = {"loss": None}
  run_step = torch_reference().make_train_step(
      make_train_batch(shapes), embed_dim=v.embed_dim, act_hidden_dim=v.act_hidden_dim,
      kernel=v.conv_kernel, dropout=v.dropout, lr=config.optim.lr,
      weight_decay=config.optim.weight_decay, topk_divisor=v.topk_divisor, q=v.q)

  def step():
    if torch.get_num_threads() != threads:
      torch.set_num_threads(threads)
    holder["loss"] = run_step()
  return {"compile_s": None, "flops_per_step": None, "threads": threads}, step, \
      lambda: holder["loss"]


def time_interleaved(steppers, *, warmup, steps):
  """Warm-up, then `steps` rounds running each stepper once in turn (so both see the same
  background load when the CPU is shared). -> {name: [seconds per step]}."""
  for _, step in steppers:
    for _ in range(warmup):
      step()
  times = {name: [] for name, _ in steppers}
  for _ in range(steps):
    for name, step in steppers:
      t0 = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t0)
  return times


def _train_row(impl, method, shapes, info, times, loss, flops=None):
  flops = info.get("flops_per_step") or flops
  step_s = _median(times)
  if not np.isfinite(loss):
    raise RuntimeError(f"{impl} {method} at {shapes.name} shapes: non-finite loss {loss}")
  row = {"impl": impl, "method": method, "shapes": shapes.name, "batch": shapes.batch,
         "num_t": shapes.num_t, "dims": [shapes.feat_dim, shapes.vlm_dim],
         "compile_s": info.get("compile_s"), "step_s": times, "steps_per_s": 1.0 / step_s,
         "videos_per_s": shapes.batch / step_s, "flops_per_step": flops,
         "flop_per_s": flops / step_s if flops else None, "loss": loss}
  if "threads" in info:
    row["threads"] = info["threads"]
  return row


def gemm_flop_per_s(rows, repeats=3):
  """FLOP/s of one jitted f32 matmul shaped like the training convolution's im2col
  ([rows, 3 * 2048] @ [3 * 2048, 512]): what this CPU sustains right now (median)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((rows, 6144), np.float32))
  b = jnp.asarray(rng.standard_normal((6144, 512), np.float32))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * rows * 6144 * 512 / _median(times)


def run_train(args, result):
  # Plan rows: (shapes, warm-up steps, timed steps, JAX-only methods, torch thread counts).
  # torch runs with its default (one thread per core) and with 1 thread: on a shared,
  # oversubscribed CPU its OpenMP barriers can make the default many times slower; the faster
  # one is the baseline. Each method runs at its own protocol's shapes (`method_shapes`).
  tr = torch_reference()
  all_threads = ((tr.torch.get_num_threads(), 1) if tr else ())
  all_threads = tuple(dict.fromkeys(all_threads))
  if args.tiny:
    plan = [("tiny", 1, 3, TIMED_METHODS, (1,))]
  elif args.quick:
    # Compilation dominates --quick (per shape on 2 loaded cores: base 5-7 s, VLPO 10-20 s,
    # CO2-Net 11-16 s, PVLR 16-30 s, plus 4-9 s for the jitted init) and a THUMOS14-shape
    # step takes 5-8 s per implementation: only the required comparison, the baseline against
    # torch (default threads) at THUMOS14 shapes, one warm-up and one timed step each; the
    # other methods and the small shapes are left to the full run.
    plan = [("thumos14", 1, 1, (), all_threads[:1])]
  else:
    plan = [("thumos14", 1, 5, TIMED_METHODS, all_threads),
            ("small", 3, 30, TIMED_METHODS, all_threads)]
  rows = []
  if args.quick:
    rows += [{"impl": "jax", "method": m, "shapes": "small",
              "status": "skipped in --quick (run without --quick)"} for m in TRAIN_METHODS]
  default_threads = tr.torch.get_num_threads() if tr else None
  for shape_name, warmup, steps, others, torch_threads in plan:
    shapes = SHAPES[shape_name]
    log(f"train: base, jax and torch (threads {torch_threads}) interleaved, at {shape_name} "
        "shapes")
    jax_info, jax_step, jax_loss = jax_train_stepper("base", shapes)
    steppers = [("jax", jax_step)]
    torch_parts = {}
    if tr is not None:
      for threads in torch_threads:
        torch_parts[threads] = torch_train_stepper(shapes, threads)
        steppers.append((f"torch{threads}", torch_parts[threads][1]))
    times = time_interleaved(steppers, warmup=warmup, steps=steps)
    rows.append(_train_row("jax", "base", shapes, jax_info, times["jax"], jax_loss()))
    for threads, (info, _, loss) in torch_parts.items():
      rows.append(_train_row("torch", "base", shapes, info, times[f"torch{threads}"], loss(),
                             flops=jax_info["flops_per_step"]))
    if tr is None:
      rows.append({"impl": "torch", "method": "base", "shapes": shape_name,
                   "status": "torch not installed (pip install torch): not measured"})
    else:
      tr.torch.set_num_threads(default_threads)
    del steppers, jax_step, torch_parts
    for method_name in TRAIN_METHODS[1:]:
      if method_name not in others:
        rows.append({"impl": "jax", "method": method_name, "shapes": shape_name,
                     "status": "skipped in --quick (run without --quick)"})
        continue
      m_shapes = method_shapes(method_name, shape_name)
      log(f"train: {method_name} (jax) at {shape_name} shapes (T={m_shapes.num_t}, batch "
          f"{m_shapes.batch})")
      info, step, loss = jax_train_stepper(method_name, m_shapes)
      times = time_interleaved([(method_name, step)], warmup=warmup, steps=steps)
      rows.append(_train_row("jax", method_name, m_shapes, info, times[method_name], loss()))
      del step
  result["train"] = rows
  if not args.tiny:
    log("train: reference matmul FLOP/s")
    result["gemm_rows"] = 4000 if args.quick else 12000
    result["gemm_flop_per_s"] = gemm_flop_per_s(result["gemm_rows"])

  def get(method, impl, shapes, field):
    found = [r for r in rows if (r["method"], r["impl"], r["shapes"]) == (method, impl, shapes)
             and "steps_per_s" in r]
    if not found:
      return None
    best = max(found, key=lambda r: r["steps_per_s"])   # torch: its faster thread setting
    return best.get(field)

  big = "tiny" if args.tiny else "thumos14"
  result["train_shapes"] = big
  result["train_steps_per_s_jax"] = get("base", "jax", big, "steps_per_s")
  result["train_videos_per_s_jax"] = get("base", "jax", big, "videos_per_s")
  result["train_compile_s_jax"] = get("base", "jax", big, "compile_s")
  result["train_flops_per_step_jax"] = get("base", "jax", big, "flops_per_step")
  result["train_flop_per_s_jax"] = get("base", "jax", big, "flop_per_s")
  result["train_steps_per_s_torch"] = get("base", "torch", big, "steps_per_s")
  result["train_videos_per_s_torch"] = get("base", "torch", big, "videos_per_s")
  result["train_torch_threads"] = get("base", "torch", big, "threads")
  for method_name in TRAIN_METHODS[1:]:
    result[f"train_steps_per_s_{method_name}"] = get(method_name, "jax", big, "steps_per_s")
    result[f"train_videos_per_s_{method_name}"] = get(method_name, "jax", big, "videos_per_s")
    result[f"train_compile_s_{method_name}"] = get(method_name, "jax", big, "compile_s")
    result[f"train_flops_per_step_{method_name}"] = get(method_name, "jax", big,
                                                        "flops_per_step")
    result[f"train_flop_per_s_{method_name}"] = get(method_name, "jax", big, "flop_per_s")
  if result["train_steps_per_s_torch"]:
    result["train_speedup_vs_torch"] = (result["train_steps_per_s_jax"]
                                        / result["train_steps_per_s_torch"])
  if not args.tiny:
    result["train_steps_per_s_jax_small"] = get("base", "jax", "small", "steps_per_s")
    result["train_steps_per_s_torch_small"] = get("base", "torch", "small", "steps_per_s")
    for method_name in TRAIN_METHODS[1:]:
      result[f"train_steps_per_s_{method_name}_small"] = get(method_name, "jax", "small",
                                                             "steps_per_s")
      result[f"train_videos_per_s_{method_name}_small"] = get(method_name, "jax", "small",
                                                              "videos_per_s")
      result[f"train_compile_s_{method_name}_small"] = get(method_name, "jax", "small",
                                                           "compile_s")
    if result["train_steps_per_s_torch_small"]:
      result["train_speedup_vs_torch_small"] = (result["train_steps_per_s_jax_small"]
                                                / result["train_steps_per_s_torch_small"])
  if tr is None:
    result["notes"].append("torch is not installed: torch fields are null "
                           "(pip install torch to measure them)")
  result["notes"].append(
      "train_*_{vlpo,co2net,pvlr,ju2023,delu,mllm4wtal,pmil,seal}: THUMOS14 shapes (vlpo T=750, batch "
      "16, 2048 + 768-d; co2net / pvlr / delu / mllm4wtal T=320, batch 10, 2048-d (+ 1024-d CLIP "
      "for pvlr); ju2023 T=1000, batch 16, 2048-d + 512-d CLIP, its warm-up phase's step; pmil / seal "
      "T=2304, batch 10, 1000 proposals a video); *_small: built-in small shapes (vlpo T=128, "
      "batch 16; co2net / pvlr / delu / mllm4wtal T=128, batch 10; ju2023 T=256, batch 16; pmil / seal "
      "T=400, batch 10, 512 proposals; 128-d + 64-d)")


# --------------------------------------------------------------------------------------- eval


@dataclasses.dataclass
class EvalVideo:
  name: str
  duration: float
  num_snippets: int
  segments: np.ndarray        # [N, 2] seconds
  labels: np.ndarray          # [N] class ids
  ambiguous: np.ndarray       # [M, 2] seconds


def _shared_annotations(arg):
  for cand in (arg, ROOT.parent / "shared" / "data", os.environ.get("WSTAL_SHARED_DATA"),
               "/work/shared/data"):
    if cand:
      ann = pathlib.Path(cand) / "thumos14" / "Thumos14reduced-Annotations"
      if (ann / "duration.npy").is_file():
        return ann
  return None


def thumos14_test_set(data_arg=None):
  """(videos, ambiguous file or None, description): the THUMOS14 test split's 212 videos."""
  ann = _shared_annotations(data_arg)
  if ann is not None:
    from wstal_jax.data import convert  # pylint: disable=import-outside-toplevel
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)   # the known GT defects are logged there
    try:
      classes, raw, _ = convert.load_wtalc_annotations(str(ann))
      amb_path = ann / "Ambiguous_test.txt"
      if amb_path.is_file():
        convert.load_ambiguous(str(amb_path), raw)
      convert.fix_segments(raw, clip_gt=True)
    finally:
      absl_logging.set_verbosity(verbosity)
    index = {c: i for i, c in enumerate(classes)}
    videos = [EvalVideo(v.name, v.duration, max(1, int(round(v.duration / SPS))),
                        np.asarray(v.segments, np.float64).reshape(-1, 2),
                        np.array([index[n] for n in v.segment_names], np.int64),
                        np.asarray(v.ambiguous, np.float64).reshape(-1, 2))
              for v in raw if v.split == "test"]
    return videos, (amb_path if amb_path.is_file() else None), \
        f"THUMOS14 test ({ann}): real durations and ground truth"
  from wstal_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  videos = [EvalVideo(f"video_test_{i:07d}", float(l.duration), l.num_snippets,
                      np.asarray(l.segments, np.float64).reshape(-1, 2),
                      np.asarray(l.segment_labels, np.int64),
                      np.asarray(l.ambiguous, np.float64).reshape(-1, 2))
            for i, l in enumerate(synthetic.sample_layouts("full", 0, "test"))]
  return videos, None, "built-in `full` test split (shared annotations not found)"


def tiny_test_set(videos, num=8, max_snippets=200):
  """The first `num` videos cut to at most `max_snippets` snippets (for tests)."""
  out = []
  for v in videos[:num]:
    t = min(v.num_snippets, max_snippets)
    dur = min(v.duration, t * SPS)
    keep = v.segments[:, 0] < dur
    amb = v.ambiguous[v.ambiguous[:, 0] < dur] if len(v.ambiguous) else v.ambiguous
    out.append(EvalVideo(v.name, dur, t, np.minimum(v.segments[keep], dur), v.labels[keep],
                         np.minimum(amb, dur)))
  return out


def _smooth_noise(rng, shape, rho):
  """Unit-variance AR(1) noise along axis 0 (temporally correlated, like real scores)."""
  from scipy import signal  # pylint: disable=import-outside-toplevel
  e = rng.standard_normal(shape)
  return signal.lfilter([np.sqrt(1 - rho * rho)], [1.0, -rho], e, axis=0)


def trained_like_scores(video: EvalVideo, rng, num_classes=NUM_CLASSES):
  """Scores shaped like a trained WS-TAL model's on this video -> (video_C, cas_TxC, act_T).

  Each ground-truth instance raises its class's CAS and the actionness with a peaked profile
  (strong in the middle, weak at the edges: incomplete, as trained MIL models are); on top,
  temporally correlated noise, and sometimes a wrong class above the class threshold. The
  post-processing cost depends on how many runs cross each threshold, so the noise is set so
  the 'co2net' preset gives about as many proposals per video as CO2-Net's released THUMOS14
  proposals (shared/data/thumos14/proposals_co2net: mean 149, median 108, max 1005 per test
  video; here mean ~166, median ~109, max ~1550: a slightly heavier tail). It also gives about
  as many classes per video (1.15).
  """
  t = video.num_snippets
  centre_T = (np.arange(t) + 0.5) * SPS
  gt_TxC = np.zeros((t, num_classes))
  for (s, e), c in zip(video.segments, video.labels):
    length = max(e - s, SPS)
    inside = (centre_T >= s) & (centre_T < max(e, s + SPS))
    rel = (centre_T[inside] - (s + e) / 2) / (length / 2)
    gt_TxC[inside, c] = np.maximum(gt_TxC[inside, c], 1.0 - 0.6 * rel * rel)
  present_C = np.zeros(num_classes, bool)
  present_C[np.unique(video.labels)] = True
  logits_C = 3.0 * present_C + rng.normal(0.0, 0.6, num_classes)
  if rng.random() < 0.1:   # a confusable class above the class threshold
    logits_C[rng.integers(num_classes)] += 2.5
  video_C = np.exp(logits_C - logits_C.max())
  video_C /= video_C.sum()
  noise_TxC = _smooth_noise(rng, (t, num_classes + 1), 0.7)
  act_T = np.clip(0.1 + 0.55 * gt_TxC.max(axis=1) + 0.1 * noise_TxC[:, -1], 0.0, 1.0)
  cas_TxC = np.clip(0.05 + 0.7 * gt_TxC + 0.08 * noise_TxC[:, :-1], 0.0, 1.0)
  return (video_C.astype(np.float32), cas_TxC.astype(np.float32), act_T.astype(np.float32))


def ground_truth_table(videos):
  return {
      "video": np.array([v.name for v in videos for _ in v.labels], dtype=object),
      "label": np.concatenate([v.labels for v in videos] + [np.zeros(0, np.int64)]),
      "start": np.concatenate([v.segments[:, 0] for v in videos] + [np.zeros(0)]),
      "end": np.concatenate([v.segments[:, 1] for v in videos] + [np.zeros(0)])}


def our_postprocess(videos, scores, preset):
  """postprocess.proposals_for_videos, all videos in one call -> {name: Proposals}."""
  config = postprocess.get_preset(preset)
  video_c, cas_tc, act_t = zip(*(scores[v.name] for v in videos))
  out = postprocess.proposals_for_videos(
      video_c, cas_tc, act_t, seconds_per_snippet=SPS, durations=[v.duration for v in videos],
      config=config, ambiguous=[v.ambiguous for v in videos])
  return {v.name: p for v, p in zip(videos, out)}


def our_postprocess_per_video(videos, scores, preset):
  """postprocess.video_proposals per video (as the Evaluator called it before it batched the
  post-processing) -> {name: Proposals}."""
  config = postprocess.get_preset(preset)
  return {v.name: postprocess.video_proposals(
      *scores[v.name], seconds_per_snippet=SPS, duration=v.duration, config=config,
      ambiguous=v.ambiguous) for v in videos}


def _same_proposals(a, b):
  return a.keys() == b.keys() and all(
      np.array_equal(getattr(a[k], f), getattr(b[k], f))
      for k in a for f in ("label", "score", "start", "end"))


def our_map(gt, videos, proposals):
  """The Evaluator's table assembly + metrics.detection_map -> map_K."""
  rows = [(np.full(len(proposals[v.name]), i), proposals[v.name]) for i, v in enumerate(videos)]
  index = {v.name: i for i, v in enumerate(videos)}
  pred = {"video": np.concatenate([r[0] for r in rows] + [np.zeros(0, np.int64)]),
          "label": np.concatenate([r[1].label for r in rows] + [np.zeros(0, np.int64)]),
          "score": np.concatenate([r[1].score for r in rows] + [np.zeros(0)]),
          "start": np.concatenate([r[1].start for r in rows] + [np.zeros(0)]),
          "end": np.concatenate([r[1].end for r in rows] + [np.zeros(0)])}
  gt = dict(gt, video=np.array([index[n] for n in gt["video"]], np.int64))
  map_K, _ = metrics.detection_map(gt, pred, metrics.THUMOS14_TIOU, num_classes=NUM_CLASSES)
  return map_K


def reference_postprocess(videos, scores, ambiguous_path):
  """The CO2-Net loop over the test set (re-reading the ambiguous file per video, as it does)."""
  return {v.name: co2net_reference_eval.video_proposals(
      v.name, *scores[v.name], ambiguous_path=ambiguous_path,
      ambiguous_lines=None if ambiguous_path else _ambiguous_lines(v)) for v in videos}


def _ambiguous_lines(video):
  return [[video.name, repr(float(s)), repr(float(e))] for s, e in video.ambiguous]


def _time(fn, repeats=1):
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return _median(times), out


def eval_host_batches(shapes: Shapes, lengths, batch_size, order):
  """(plan, length_J, batch) for eval batches of videos of `lengths` as
  input_pipeline.eval_plan makes them; batch(j) builds batch j (random features >= 0,
  masked padding, dummy rows with index -1)."""
  manifest = {"splits": {"test": {"num_videos": len(lengths), "shards": [{"file": "-"}],
                                  "video_num_snippets": [int(x) for x in lengths]}}}
  videos_P, length_J = input_pipeline.eval_plan(manifest, "<in-memory>", "test",
                                                batch_size=batch_size, order=order)
  plan = videos_P[0]
  rng = np.random.default_rng(0)
  max_t = max(length_J)
  feat_pool = np.abs(rng.standard_normal((batch_size, max_t, shapes.feat_dim), np.float32))
  vlm_pool = rng.standard_normal((batch_size, max_t, shapes.vlm_dim), np.float32)

  def batch(j):
    idx = plan[j * batch_size:(j + 1) * batch_size]
    t = length_J[j]
    mask = np.zeros((batch_size, t), np.float32)
    for b, i in enumerate(idx):
      mask[b, :lengths[i]] = 1.0
    index = np.full(batch_size, -1, np.int32)
    index[:len(idx)] = idx
    return {"feat_BxTxD": feat_pool[:, :t] * mask[:, :, None],
            "vlm_BxTxE": vlm_pool[:, :t] * mask[:, :, None], "mask_BxT": mask,
            "label_BxC": np.zeros((batch_size, NUM_CLASSES), np.float32), "index_B": index,
            "valid_B": (index >= 0).astype(np.float32),
            "scale_B": np.ones(batch_size, np.float32)}
  return plan, length_J, batch


def eval_forward(method_name, shapes: Shapes, lengths, batch_size, *, max_batches=None,
                 order="manifest"):
  """The Evaluator's device loop: put batch, jitted predict, fetch -> timing dict.

  Batches follow input_pipeline.eval_plan (length buckets; `order` 'length', what
  eval_batches yields and the Evaluator uses, sorts each process's videos longest first;
  'manifest' keeps them by index, the Evaluator's batching before). Features are
  random. With `max_batches`, only up to that many batches of the most common bucket length
  are timed (one compilation) and the total is extrapolated by padded snippets.
  """
  _, run = _setup(method_name, shapes)
  _, length_J, batch = eval_host_batches(shapes, lengths, batch_size, order)
  method = run.method
  predict = jax.jit(method.predict, in_shardings=(run.replicated, run.data_sharding,
                                                  run.replicated),
                    out_shardings=run.replicated)
  all_batches = list(range(len(length_J)))
  timed = all_batches
  if max_batches is not None:
    common = max(set(length_J), key=length_J.count)
    timed = [j for j in all_batches if length_J[j] == common][:max_batches]
  params = run.init_params(jax.random.key(0), run.put_batch(batch(timed[0])))
  compile_s = 0.0
  for t in sorted({length_J[j] for j in timed}):   # one compilation per bucket length
    j = next(j for j in timed if length_J[j] == t)
    host = batch(j)
    t0 = time.perf_counter()
    jax.block_until_ready(predict(params, run.put_batch(host), run.consts))
    compile_s += time.perf_counter() - t0
  seconds = 0.0
  for j in timed:
    host = batch(j)   # built outside the clock (the input pipeline is timed on its own)
    t0 = time.perf_counter()
    jax.device_get(predict(params, run.put_batch(host), run.consts))
    seconds += time.perf_counter() - t0
    del host
  padded_all = batch_size * sum(length_J)
  padded_timed = batch_size * sum(length_J[j] for j in timed)
  return {"method": method_name, "order": order, "seconds_timed": seconds,
          "batches_timed": len(timed),
          "batches": len(length_J), "padded_snippets": padded_all,
          "extrapolated": len(timed) < len(length_J),
          "seconds": seconds * padded_all / padded_timed,
          "compile_and_first_run_s": compile_s, "buckets": sorted(set(length_J)),
          "buckets_timed": sorted({length_J[j] for j in timed})}


def eval_forward_now(method_name, shapes: Shapes, lengths, batch_size, *, row_len=1024):
  """The Evaluator's forward as it runs now (eval_forward.Forward: exact chunks for local
  networks such as VLPO's, length buckets otherwise) over every batch, twice: the first
  pass compiles (network rows and every bucket shape of the per-video scoring), the second
  is the timed one. Features are random; batches follow eval_plan(order='length')."""
  config, run = _setup(method_name, shapes)
  config.eval.num_snippets = None   # whole videos (the THUMOS14 preset of VLPO resamples)
  mode = eval_forward_lib.resolve(config, run.method)
  plan, length_J, batch = eval_host_batches(shapes, lengths, batch_size, "length")
  host = [batch(j) for j in range(len(length_J))]
  halo = getattr(run.method, "receptive_field", None)
  forward = eval_forward_lib.Forward(run, mode, row_len=row_len, rows_per_batch=batch_size,
                                     stream_lengths_fn=lambda: [[lengths[i] for i in plan]])
  params = run.init_params(jax.random.key(0), run.put_batch(host[0]))
  passes = []
  for _ in range(2):
    t0 = time.perf_counter()
    for _out in forward(params, iter(host)):
      pass
    passes.append(time.perf_counter() - t0)
  row_len, row_batches = forward.plan if mode == "chunked" else (None, None)
  padded = (row_batches * batch_size * (row_len + 2 * halo) if mode == "chunked"
            else batch_size * sum(length_J))
  flops = None
  if mode == "chunked":   # the network's FLOPs per row batch (per-video scoring: O(T C))
    rows = eval_forward_lib.empty_rows(host[0], batch_size, row_len + 2 * halo)
    flops = _cost_flops(forward._network.lower(params, run.put_batch(rows),
                                               run.consts).compile())
    flops = flops * row_batches if flops else None
  return {"method": method_name, "mode": mode, "seconds": passes[1],
          "compile_s": max(passes[0] - passes[1], 0.0), "first_pass_s": passes[0],
          "padded_snippets": int(padded), "row_len": row_len, "row_batches": row_batches,
          "bucket_shapes": sorted(set(length_J)), "flops": flops,
          "flop_per_s": flops / passes[1] if flops else None}


def run_eval(args, result):
  videos, amb_path, source = thumos14_test_set(args.data)
  shapes = SHAPES["thumos14"]
  if args.tiny:
    videos = tiny_test_set(videos)
    amb_path = None   # the cut videos' ambiguous segments are passed as lines instead
    shapes = SHAPES["tiny"]
  lengths = [v.num_snippets for v in videos]
  result["eval_num_videos"] = len(videos)
  result["eval_num_snippets"] = int(sum(lengths))
  detail = {"test_set": source, "num_videos": len(videos), "num_snippets": int(sum(lengths)),
            "num_instances": int(sum(len(v.labels) for v in videos)),
            "forward_shapes": dataclasses.asdict(shapes)}
  batch_size = int(_load_config("vlpo", shapes.config_arg).eval.batch_size)

  max_batches = 1 if args.quick else None
  log(f"eval: forward pass as the Evaluator runs it (vlpo) over {len(videos)} videos")
  now = eval_forward_now("vlpo", shapes, lengths, batch_size)
  detail["forward_vlpo_now"] = now
  result["eval_forward_s"] = now["seconds"]
  result["eval_compile_s"] = now["compile_s"]
  result["eval_forward_compile_s"] = now["compile_s"]
  result["eval_forward_flop_per_s"] = now["flop_per_s"]
  log("eval: forward pass (vlpo predict, manifest-order length buckets: the Evaluator "
      "before stop 24)")
  fwd = eval_forward("vlpo", shapes, lengths, batch_size, max_batches=max_batches)
  detail["forward_vlpo"] = fwd
  result["eval_forward_manifest_s"] = fwd["seconds"]
  if fwd["extrapolated"]:
    result["notes"].append(f"eval_forward_manifest_s extrapolated from {fwd['batches_timed']} "
                           f"of {fwd['batches']} batches by padded snippets (--quick)")
  log("eval: forward pass (vlpo predict, length-sorted buckets: the Evaluator before "
      "chunking)")
  fwd_sorted = eval_forward("vlpo", shapes, lengths, batch_size, max_batches=max_batches,
                            order="length")
  detail["forward_vlpo_sorted"] = fwd_sorted
  result["eval_forward_sorted_s"] = fwd_sorted["seconds"]
  result["eval_forward_sorted_compile_s"] = fwd_sorted["compile_and_first_run_s"]
  if not (args.quick or args.tiny):
    log("eval: forward pass as the Evaluator runs it (base)")
    base_now = eval_forward_now("base", shapes, lengths, batch_size)
    detail["forward_base_now"] = base_now
    result["eval_forward_base_s"] = base_now["seconds"]
    log("eval: forward pass (base predict, length-sorted buckets)")
    fwd_base_sorted = eval_forward("base", shapes, lengths, batch_size, order="length")
    detail["forward_base_sorted"] = fwd_base_sorted
    result["eval_forward_base_sorted_s"] = fwd_base_sorted["seconds"]
  tr = torch_reference()
  if tr is None:
    result["notes"].append("torch is not installed: eval_forward_torch_s is null")
  else:
    v = _load_config("base", shapes.config_arg).vlpo
    # --quick: every 4th video of the length order (all lengths represented), scaled up by
    # snippets; the full run times every video.
    sub = (sorted(range(len(lengths)), key=lambda i: -lengths[i])[::4]
           if args.quick else list(range(len(lengths))))
    sub_lengths = [lengths[i] for i in sub]
    torch_s = {}
    for threads in dict.fromkeys((tr.torch.get_num_threads(), 1)):
      log(f"eval: forward pass (torch baseline, one video at a time, {threads} threads, "
          f"{len(sub)} videos)")
      torch_s[threads] = tr.time_eval_forward(
          sub_lengths, shapes.feat_dim, NUM_CLASSES, embed_dim=v.embed_dim,
          act_hidden_dim=v.act_hidden_dim, kernel=v.conv_kernel,
          topk_divisor=v.topk_divisor, threads=threads) * sum(lengths) / sum(sub_lengths)
    detail["forward_torch_s_by_threads"] = torch_s
    detail["forward_torch_videos_timed"] = len(sub)
    result["eval_forward_torch_s"] = min(torch_s.values())
    if len(sub) < len(lengths):
      result["notes"].append(f"eval_forward_torch_s extrapolated from {len(sub)} of "
                             f"{len(lengths)} videos by snippets (--quick)")

  log("eval: post-processing and mAP (ours, reference loop)")
  rng = np.random.default_rng(0)
  scores = {v.name: trained_like_scores(v, rng) for v in videos}
  gt = ground_truth_table(videos)
  # Rounds alternate ours and the loop, so both see the same background load.
  repeats = 1 if (args.quick or args.tiny) else 3
  clock = {k: [] for k in ("pp", "map", "pp_per_video", "pp_vlpo", "map_vlpo", "ref_pp",
                           "ref_map")}
  for _ in range(repeats):
    sec, props = _time(lambda: our_postprocess(videos, scores, "co2net"))
    clock["pp"].append(sec)
    sec, map_K = _time(lambda props=props: our_map(gt, videos, props))
    clock["map"].append(sec)
    sec, props_one = _time(lambda: our_postprocess_per_video(videos, scores, "co2net"))
    clock["pp_per_video"].append(sec)
    if not _same_proposals(props, props_one):
      raise RuntimeError("proposals_for_videos and video_proposals per video differ")
    sec, props_vlpo = _time(lambda: our_postprocess(videos, scores, "vlpo"))
    clock["pp_vlpo"].append(sec)
    sec, map_vlpo_K = _time(lambda props=props_vlpo: our_map(gt, videos, props))
    clock["map_vlpo"].append(sec)
    sec, ref_rows = _time(lambda: reference_postprocess(videos, scores, amb_path))
    clock["ref_pp"].append(sec)
    sec, (ref_map_K, _) = _time(lambda rows=ref_rows: co2net_reference_eval.detection_map_loop(
        gt, rows, metrics.THUMOS14_TIOU, NUM_CLASSES))
    clock["ref_map"].append(sec)
  pp_s, map_s, pp_one_s, pp_vlpo_s, map_vlpo_s, ref_pp_s, ref_map_s = (
      _median(clock[k]) for k in ("pp", "map", "pp_per_video", "pp_vlpo", "map_vlpo", "ref_pp",
                                  "ref_map"))
  detail["seconds_by_round"] = clock

  result["eval_postprocess_s"] = pp_s
  result["eval_map_s"] = map_s
  result["eval_postprocess_map_s"] = pp_s + map_s
  result["eval_postprocess_per_video_s"] = pp_one_s
  # As the Evaluator ran before (manifest-order batches, video_proposals per video), and as it
  # runs now (length-sorted batches, proposals_for_videos once).
  # End to end as the Evaluator runs now: forward + its compilation + post-processing + mAP
  # (co2net and vlpo presets); "fast" is the length-bucket forward of stop 24 (no compile),
  # against the family's pipeline: the torch per-video forward + the CO2-Net loop.
  compile_s = result["eval_compile_s"]
  result["eval_end_to_end_s"] = result["eval_forward_s"] + compile_s + pp_s + map_s
  result["eval_end_to_end_vlpo_s"] = (result["eval_forward_s"] + compile_s + pp_vlpo_s
                                      + map_vlpo_s)
  result["eval_end_to_end_fast_s"] = result["eval_forward_sorted_s"] + pp_s + map_s
  torch_fwd = result.get("eval_forward_torch_s")
  if torch_fwd is not None:
    family = torch_fwd + ref_pp_s + ref_map_s
    result["eval_family_pipeline_s"] = family
    result["eval_speedup_end_to_end"] = family / result["eval_end_to_end_s"]
    result["eval_speedup_end_to_end_vlpo"] = family / result["eval_end_to_end_vlpo_s"]
    result["eval_forward_speedup_vs_torch"] = torch_fwd / result["eval_forward_s"]
    base_now = detail.get("forward_base_now")
    if base_now:   # the same network as the torch baseline (full runs)
      result["eval_end_to_end_base_s"] = (base_now["seconds"] + base_now["compile_s"] + pp_s
                                          + map_s)
      result["eval_speedup_end_to_end_base"] = family / result["eval_end_to_end_base_s"]
      result["eval_forward_base_speedup_vs_torch"] = torch_fwd / base_now["seconds"]
  result["eval_postprocess_vlpo_s"] = pp_vlpo_s
  result["eval_map_vlpo_s"] = map_vlpo_s
  result["eval_reference_postprocess_s"] = ref_pp_s
  result["eval_reference_map_s"] = ref_map_s
  result["eval_reference_loop_s"] = ref_pp_s + ref_map_s
  result["eval_speedup_vs_reference"] = (ref_pp_s + ref_map_s) / (pp_s + map_s)
  result["eval_speedup_vs_reference_per_video"] = (ref_pp_s + ref_map_s) / (pp_one_s + map_s)
  result["eval_proposals_per_video"] = float(np.mean([len(p) for p in props.values()]))
  result["eval_average_map"] = float(np.mean(map_K))
  result["eval_reference_average_map"] = float(np.mean(ref_map_K))
  detail.update({
      "scores": "trained_like_scores (synthetic, from the ground truth; seed 0)",
      "repeats": repeats,
      "proposals_per_video_co2net": result["eval_proposals_per_video"],
      "proposals_per_video_vlpo": float(np.mean([len(p) for p in props_vlpo.values()])),
      "proposals_per_video_reference": float(np.mean([len(r) for r in ref_rows.values()])),
      "map_K_co2net": map_K.tolist(), "map_K_vlpo": map_vlpo_K.tolist(),
      "map_K_reference": ref_map_K.tolist()})
  result["eval"] = detail


# -------------------------------------------------------------------------------------- input


def _write_dataset(out_dir, videos, feat_dim, vlm_dim, num_shards, seed=0):
  rng = np.random.default_rng(seed)
  classes = [f"class_{i:02d}" for i in range(NUM_CLASSES)]

  def records(split):
    for i, v in enumerate(videos):
      label = np.zeros(NUM_CLASSES, np.float32)
      label[np.unique(v.labels)] = 1.0
      t = v.num_snippets
      yield data_format.VideoRecord(
          name=f"{split}_{i:04d}", duration=v.duration,
          features={"i3d": np.abs(rng.standard_normal((t, feat_dim), np.float32)),
                    "videoclip": rng.standard_normal((t, vlm_dim), np.float32)},
          label=label, segments=v.segments.astype(np.float32),
          segment_labels=v.labels.astype(np.int32), source=f"benchmark video {i}")

  data_format.write_dataset(
      out_dir, dataset="benchmark", classes=classes,
      feature_dims={"i3d": feat_dim, "videoclip": vlm_dim},
      splits={"train": records("train"), "test": records("test")}, num_shards=num_shards,
      text_embeddings=_text(vlm_dim), source={"generator": "benchmarks/run.py"})


def input_throughput(videos, shapes: Shapes, *, train_batches, eval_batch):
  """Writes `videos` (both splits) at `shapes`' dims to a temp dir and reads them back through
  train_batches (T = shapes.num_t, batch shapes.batch) and eval_batches -> dict."""
  with tempfile.TemporaryDirectory(prefix="wstal_bench_") as tmp:
    data_dir = os.path.join(tmp, "data")
    log(f"input: writing {len(videos)} videos x 2 splits at {shapes.feat_dim}+{shapes.vlm_dim} "
        "dims")
    t0 = time.perf_counter()
    _write_dataset(data_dir, videos, shapes.feat_dim, shapes.vlm_dim, num_shards=4)
    write_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in pathlib.Path(data_dir).iterdir())
    it = input_pipeline.train_batches(
        data_dir, split="train", batch_size=shapes.batch, num_snippets=shapes.num_t, seed=0,
        vlm_feature="videoclip", process_index=0, process_count=1)
    t0 = time.perf_counter()
    next(it)   # pipeline start-up (graph tracing, first reads) is not throughput
    train_startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(train_batches):
      next(it)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    it = input_pipeline.eval_batches(data_dir, split="test", batch_size=eval_batch,
                                     vlm_feature="videoclip", process_index=0,
                                     process_count=1)
    next(it)
    eval_startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = 0
    for b in it:
      count += int((b["index_B"] >= 0).sum())
    eval_s = time.perf_counter() - t0
  return {"shapes": shapes.name, "videos_per_split": len(videos), "dataset_bytes": size,
          "write_s": write_s, "train_batch": shapes.batch, "train_num_snippets": shapes.num_t,
          "eval_batch": eval_batch, "dims": [shapes.feat_dim, shapes.vlm_dim],
          "train_batches_timed": train_batches, "train_s": train_s,
          "train_startup_s": train_startup_s,
          "train_videos_per_s": train_batches * shapes.batch / train_s,
          "eval_startup_s": eval_startup_s, "eval_videos_timed": count, "eval_s": eval_s,
          "eval_videos_per_s": count / eval_s if count else None}


def _small_videos(num):
  """Videos with the built-in `small` train split's lengths (annotations are not read)."""
  from wstal_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  return [EvalVideo(f"small_{i:04d}", float(l.duration), l.num_snippets,
                    np.asarray(l.segments, np.float64).reshape(-1, 2),
                    np.asarray(l.segment_labels, np.int64), np.zeros((0, 2)))
          for i, l in enumerate(synthetic.sample_layouts("small", 0, "train")[:num])]


def run_input(args, result):
  """Full dims (THUMOS14 test lengths, T=750, batch 16) and the built-in `small` dims."""
  if args.tiny:
    videos, _, _ = thumos14_test_set(args.data)
    tiny = dataclasses.replace(SHAPES["small"], batch=4)
    runs = {"small": input_throughput(tiny_test_set(videos, num=4), tiny, train_batches=3,
                                      eval_batch=2)}
  else:
    videos, _, _ = thumos14_test_set(args.data)
    num = 24 if args.quick else 64
    runs = {
        "thumos14": input_throughput(videos[:num], SHAPES["thumos14"],
                                     train_batches=4 if args.quick else 12, eval_batch=8),
        "small": input_throughput(_small_videos(num), SHAPES["small"],
                                  train_batches=8 if args.quick else 30, eval_batch=16)}
  main_run = runs.get("thumos14", runs["small"])
  result["input_videos_per_s"] = main_run["train_videos_per_s"]
  result["input_eval_videos_per_s"] = main_run["eval_videos_per_s"]
  if "thumos14" in runs:
    result["input_videos_per_s_small"] = runs["small"]["train_videos_per_s"]
  result["input"] = runs


# ---------------------------------------------------------------------------------- reporting


def _fmt(x, unit="", digits=3):
  if x is None:
    return "n/a"
  if isinstance(x, float):
    if x and abs(x) >= 1e9:
      return f"{x / 1e9:.1f} G{unit}"
    return f"{x:.{digits}g}{unit}"
  return f"{x}{unit}"


def markdown(result):
  """The README's table of the flat keys."""
  r = result
  rows = [("device", r["device"]),
          ("load average (1 min) at start / end",
           f"{r['load_avg_start'][0]:.2f} / {r['load_avg_end'][0]:.2f}"),
          ("mode", "tiny" if r["tiny"] else ("quick" if r["quick"] else "full"))]
  if r.get("train"):
    for row in r["train"]:
      impl = row["impl"] + (f", {row['threads']} thread{'s' * (row['threads'] > 1)}"
                            if "threads" in row else "")
      what = f"train {row['method']} ({impl}, {row['shapes']} shapes"
      what += f": T={row['num_t']}, batch {row['batch']})" if "num_t" in row else ")"
      if "status" in row:
        rows.append((what, row["status"]))
        continue
      comp = f", compile {row['compile_s']:.1f} s" if row.get("compile_s") else ""
      flop = (f", {row['flops_per_step'] / 1e9:.1f} GFLOP/step, "
              f"{row['flop_per_s'] / 1e9:.1f} GFLOP/s" if row.get("flop_per_s") else "")
      rows.append((what, f"{row['steps_per_s']:.3g} steps/s = {row['videos_per_s']:.3g} "
                         f"videos/s (median of {len(row['step_s'])}){comp}{flop}"))
    if r.get("gemm_flop_per_s"):
      rows.append((f"f32 matmul [{r['gemm_rows']} x 6144] @ [6144 x 512] (jit), for scale",
                   f"{r['gemm_flop_per_s'] / 1e9:.1f} GFLOP/s"))
    rows.append((f"train speedup jax / torch (baseline, {r['train_shapes']} shapes)",
                 _fmt(r["train_speedup_vs_torch"], "x")))
    if not r["tiny"]:
      rows.append(("train speedup jax / torch (baseline, small shapes)",
                   _fmt(r["train_speedup_vs_torch_small"], "x")))
  if r.get("eval"):
    e = r["eval"]
    rows += [
        ("eval test set", f"{e['num_videos']} videos, {e['num_snippets']} snippets, "
                          f"{e['num_instances']} instances ({e['test_set']})"),
        ("eval forward, vlpo, as the Evaluator runs it now "
         f"({e['forward_vlpo_now']['mode']})",
         f"{_fmt(r['eval_forward_s'], ' s')} (+ {_fmt(r['eval_compile_s'], ' s')} compile; "
         f"{e['forward_vlpo_now']['padded_snippets']} snippets computed"
         + (f", {_fmt(r['eval_forward_flop_per_s'] / 1e9, ' GFLOP/s')}"
            if r.get("eval_forward_flop_per_s") else "") + ")"),
        ("eval forward, vlpo predict, length-sorted buckets (the Evaluator before chunking)",
         f"{_fmt(r['eval_forward_sorted_s'], ' s')} (+ "
         f"{_fmt(r['eval_forward_sorted_compile_s'], ' s')} compile + first run of "
         f"{len(e['forward_vlpo_sorted']['buckets_timed'])} bucket shapes; "
         f"{e['forward_vlpo_sorted']['padded_snippets']} padded snippets)"
         + (" [extrapolated]" if e["forward_vlpo_sorted"]["extrapolated"] else "")),
        ("eval forward, vlpo predict, manifest-order buckets (the Evaluator before stop 24)",
         f"{_fmt(r['eval_forward_manifest_s'], ' s')} "
         f"({e['forward_vlpo']['padded_snippets']} padded snippets)"
         + (" [extrapolated]" if e["forward_vlpo"]["extrapolated"] else "")),
        ("eval forward, base, as the Evaluator runs it now / length-sorted buckets",
         f"{_fmt(r['eval_forward_base_s'], ' s')} / "
         f"{_fmt(r['eval_forward_base_sorted_s'], ' s')}"),
        ("eval forward, torch baseline (base model, one video at a time)",
         _fmt(r["eval_forward_torch_s"], " s")
         + (" [extrapolated]" if e.get("forward_torch_videos_timed", 0) < e["num_videos"]
            else "")),
        ("eval forward speedup over the torch baseline: base (the same network) / vlpo "
         "(1.29x its FLOPs)",
         f"{_fmt(r.get('eval_forward_base_speedup_vs_torch'), 'x')} / "
         f"{_fmt(r.get('eval_forward_speedup_vs_torch'), 'x')}"),
        ("post-processing, co2net preset (proposals_for_videos, all videos at once: the "
         "Evaluator now)",
         _fmt(r["eval_postprocess_s"], " s")),
        ("post-processing, co2net preset (video_proposals per video: the Evaluator before)",
         _fmt(r["eval_postprocess_per_video_s"], " s")),
        ("detection mAP (7 tIoU)", _fmt(r["eval_map_s"], " s")),
        ("post-processing + mAP", _fmt(r["eval_postprocess_map_s"], " s")),
        ("post-processing + mAP, vlpo preset",
         f"{_fmt(r['eval_postprocess_vlpo_s'], ' s')} + {_fmt(r['eval_map_vlpo_s'], ' s')}"),
        ("eval end to end now, co2net / vlpo preset (forward + compile + post-processing + "
         "mAP)",
         f"{_fmt(r['eval_end_to_end_s'], ' s')} / {_fmt(r.get('eval_end_to_end_vlpo_s'), ' s')}"),
        ("family pipeline (torch per-video forward + CO2-Net post-processing loop + mAP loop)",
         _fmt(r.get("eval_family_pipeline_s"), " s")),
        ("end-to-end speedup over the family pipeline, vlpo network: co2net / vlpo preset",
         f"{_fmt(r.get('eval_speedup_end_to_end'), 'x')} / "
         f"{_fmt(r.get('eval_speedup_end_to_end_vlpo'), 'x')}"),
        ("eval end to end, base network (the torch baseline's), co2net preset; speedup",
         f"{_fmt(r.get('eval_end_to_end_base_s'), ' s')}; "
         f"{_fmt(r.get('eval_speedup_end_to_end_base'), 'x')}"),
        ("CO2-Net loop: post-processing + mAP",
         f"{_fmt(r['eval_reference_postprocess_s'], ' s')} + "
         f"{_fmt(r['eval_reference_map_s'], ' s')} = {_fmt(r['eval_reference_loop_s'], ' s')}"),
        ("speedup over the CO2-Net loop (post-processing + mAP)",
         _fmt(r["eval_speedup_vs_reference"], "x")),
        ("speedup over the CO2-Net loop, per-video post-processing",
         _fmt(r["eval_speedup_vs_reference_per_video"], "x")),
        ("proposals per video (co2net preset / vlpo preset / loop)",
         f"{e['proposals_per_video_co2net']:.0f} / {e['proposals_per_video_vlpo']:.0f} / "
         f"{e['proposals_per_video_reference']:.0f}"),
        ("average mAP@0.1:0.7 ours / loop (synthetic scores)",
         f"{100 * r['eval_average_map']:.2f} / {100 * r['eval_reference_average_map']:.2f}")]
  if r.get("input"):
    for i in r["input"].values():
      rows += [(f"input: train_batches, {i['shapes']} dims {i['dims'][0]}+{i['dims'][1]} "
                f"(T={i['train_num_snippets']}, batch {i['train_batch']})",
                f"{i['train_videos_per_s']:.3g} videos/s"),
               (f"input: eval_batches, {i['shapes']} dims (whole videos, batch "
                f"{i['eval_batch']})", _fmt(i["eval_videos_per_s"], " videos/s"))]
  rows.append(("peak host memory (maxrss)", _fmt(r["peak_host_memory_mib"], " MiB", 4)))
  lines = ["| measurement | value |", "|---|---|"]
  lines += [f"| {a} | {b} |" for a, b in rows]
  return "\n".join(lines)


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 2)[2],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="all", choices=SECTIONS + ("all",),
                 help="which part to run (default: all)")
  p.add_argument("--quick", action="store_true",
                 help="fewer steps, a subset for the forward pass: < 2 minutes on 2 CPU cores")
  p.add_argument("--tiny", action="store_true",
                 help="tiny shapes and 8 short videos (tests; numbers are not meaningful)")
  p.add_argument("--json", default=None, help="write the results here (JSON)")
  p.add_argument("--markdown", default=None, help="also write the table here")
  p.add_argument("--data", default=None,
                 help="shared data folder holding thumos14/ (default: ../shared/data, "
                      "$WSTAL_SHARED_DATA, /work/shared/data)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  sections = SECTIONS if args.only == "all" else (args.only,)
  result = {k: None for k in KEYS}
  result.update({"device": device_description(), "platform": jax.devices()[0].platform,
                 "jax_version": jax.__version__,
                 "torch_version": None,
                 "cpu_count": os.cpu_count(), "quick": args.quick, "tiny": args.tiny,
                 "sections": list(sections), "load_avg_start": list(os.getloadavg()),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "notes": []})
  t0 = time.perf_counter()
  runners = {"train": run_train, "eval": run_eval, "input": run_input}
  for name in sections:
    runners[name](args, result)
    if _TORCH and _TORCH[0] is not None:
      result["torch_version"] = _TORCH[0].torch.__version__
    result[f"peak_host_memory_mib_after_{name}"] = _peak_rss_mib()
  result["peak_host_memory_mib"] = _peak_rss_mib()
  result["load_avg_end"] = list(os.getloadavg())
  result["wall_s"] = time.perf_counter() - t0
  table = markdown(result)
  print(table)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
  if args.markdown:
    pathlib.Path(args.markdown).write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
