"""Before you rent a slice: compile a run's steps for a TPU topology on this machine.

  python -m wstal_jax.main --mode=compile --config=CONFIG --topology=v5e:4x4 --workdir=DIR

With libtpu installed (the `[tpu]` extra), `jax.experimental.topologies` describes the
devices of a TPU slice without one, and the real TPU compiler runs here. For the config's
global batch and shapes this lowers and compiles, with abstract inputs only (nothing is
allocated): the trainer's train step of every training phase (`train.make_train_step`, the
method's optimizer of that phase) and the evaluation forward (the evaluator's jitted predict
at the largest padded batch of the test split). Per step it reports the per-chip argument /
output / temporary bytes against the chip's HBM, FLOPs, an estimated step time at the chip's
bf16 peak (TPU matmuls of float32 run as bf16 passes at jax's default precision; the real
step is slower: memory-bound ops and the host are not counted), and the collectives of the
optimized HLO: a data-parallel step should hold only all-reduces (gradients, the loss and the
metric terms), so any all-gather, reduce-scatter, all-to-all or collective-permute, an
all-reduce carrying more than the parameters (activations), a batch not sharded over the
`data` axis or parameters not replicated is reported as a finding (the evaluation forward
gathers its outputs to every chip for the host: one all-gather there is by design).
DIR/compile.json holds it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np

from wstal_jax.errors import WstalError

# Per chip: HBM bytes and bf16 peak FLOP/s (public TPU specifications).
CHIPS = {
    "v4": (32 << 30, 275e12),
    "v5e": (16 << 30, 197e12),
    "v5litepod": (16 << 30, 197e12),
    "v5p": (95 << 30, 459e12),
    "v6e": (32 << 30, 918e12),
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1,
          "s8": 1, "u8": 1, "f64": 8, "s16": 2, "u16": 2}


def prepare_environment(topology: str):
  """libtpu reads these when it loads: without them it looks for a TPU VM's metadata and
  prints warnings. Call before the topology is described."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # No chip is opened: another process holding libtpu's lock file must not stop the compile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _accelerator_type(topology: str) -> str:
  chip, _, dims = topology.partition(":")
  n = int(np.prod([int(d) for d in dims.split("x")])) if dims else 1
  return f"{'v5litepod' if chip == 'v5e' else chip}-{n if chip == 'v5e' else 2 * n}"


def describe(topology: str):
  """The devices of `topology` ('v5e:4x4', 'v4:2x2x4', ...); WstalError when libtpu is
  missing or the name is not one it knows."""
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except (ImportError, RuntimeError, ValueError) as e:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise WstalError(f"--topology={topology}: cannot describe it ({text[:200]}); "
                     "--mode=compile needs libtpu: pip install -e '.[tpu]'") from None
  return topo


def _chip(topology: str):
  name = topology.split(":")[0]
  if name not in CHIPS:
    raise WstalError(f"--topology={topology}: unknown chip {name!r} (known: "
                     f"{', '.join(sorted(CHIPS))})")
  return name, CHIPS[name]


def collectives(hlo_text: str) -> tuple[list[str], int]:
  """(sorted op names of the collectives, bytes moved by all-reduces) of optimized HLO."""
  names, reduce_bytes = set(), 0
  for line in hlo_text.splitlines():
    for op in _COLLECTIVES:
      m = re.search(rf"=\s*(.*?)\s{op}(?:-start)?\(", line)
      if m:
        names.add(op)
        if op == "all-reduce":
          for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            reduce_bytes += size * _BYTES.get(dtype, 4)
  return sorted(names), reduce_bytes


def _abstract(tree, sharding):
  """ShapeDtypeStructs of arrays (numpy, jax or abstract) placed with `sharding`."""
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)


def _report(name, compiled, hbm, peak, param_bytes, findings, allowed=("all-reduce",)):
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ops, reduce_bytes = collectives(compiled.as_text())
  unexpected = [op for op in ops if op not in allowed]
  if unexpected:
    findings.append(f"{name}: unexpected collectives {unexpected} (expected only "
                    f"{', '.join(allowed)})")
  if param_bytes is not None and reduce_bytes > 1.1 * param_bytes + (1 << 16):
    findings.append(f"{name}: all-reduces move {reduce_bytes} bytes, more than the "
                    f"parameters ({param_bytes}): activations are being reduced")
  flops = float(cost.get("flops", 0.0))
  out = {"argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes),
         "flops": flops, "collectives": ops, "all_reduce_bytes": int(reduce_bytes),
         "estimated_step_s": flops / peak}
  total = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
  out["hbm_fraction"] = total / hbm
  if total > hbm:
    findings.append(f"{name}: needs {total / 2**30:.2f} GiB per chip, the chip has "
                    f"{hbm / 2**30:.0f} GiB: lower the batch or the snippets")
  return out


def compile_for_topology(config, topology: str, workdir: str) -> dict:
  """Compiles every train phase and the eval forward of `config` for `topology`; writes
  WORKDIR/compile.json and returns it."""
  import jax
  import jax.numpy as jnp
  from wstal_jax import eval_forward, evaluate, input_pipeline, results_io, run_setup, train
  chip, (hbm_chip, peak_chip) = _chip(topology)
  prepare_environment(topology)
  topo = describe(topology)
  # v4 / v5p describe one device per TensorCore (2 a chip): memory and peak per device.
  dims = topology.split(":")[1] if ":" in topology else ""
  chips = int(np.prod([int(d) for d in dims.split("x")])) if dims else len(topo.devices)
  per_chip = max(1, len(topo.devices) // max(chips, 1))
  hbm, peak = hbm_chip // per_chip, peak_chip / per_chip
  run_setup.validate_config(config)
  run = run_setup.setup(config)   # the dataset, the method and its constants (on the host)
  devices = np.array(topo.devices).reshape(-1)
  mesh = jax.sharding.Mesh(devices, (run_setup.DATA_AXIS,))
  tpu = dataclasses.replace(run, mesh=mesh)
  run_setup.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
  run_setup.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  repl, data = tpu.replicated, tpu.data_sharding
  consts = _abstract(jax.device_get(run.consts), repl)
  batch = next(input_pipeline.train_batches(
      run.data_dir, split="train", batch_size=config.train.batch_size,
      num_snippets=config.data.num_snippets, seed=config.seed, start_step=0,
      sampling=config.data.sampling, vlm_feature=config.data.vlm_feature,
      video_indices=run_setup.training_indices(config, run.manifest),
      token_fields=run_setup.token_fields(config),
      max_proposals=run_setup.max_proposals(config)))
  batch_abs = _abstract(batch, data)
  params = jax.eval_shape(run._init_params, jax.random.key(0), batch_abs, consts)
  params = _abstract(params, repl)
  param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  findings, steps, programs = [], {}, {}
  starts = train.phase_starts(run.method)
  for index, start in enumerate(starts):
    _, _, tx = train.phase_optimizer(run.method, config, params, start)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), "params": params,
             "opt_state": _abstract(jax.eval_shape(tx.init, params), repl)}
    step_fn = train.make_train_step(tpu, tx, index)
    lowered = step_fn.lower(state, batch_abs, consts, key)
    name = f"train_phase{index}"
    # Phases that lower to the same program (Ju et al.'s B steps among themselves, its F
    # steps among themselves) are compiled once: 3 compilations for its 7 or 9 phases.
    digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()
    if digest in programs:
      steps[name] = dict(steps[programs[digest]], same_program_as=programs[digest])
      continue
    programs[digest] = name
    compiled = lowered.compile()
    steps[name] = _report(name, compiled, hbm, peak, param_bytes, findings)
    shardings = compiled.input_shardings[0]
    if any(not s.is_fully_replicated for s in jax.tree.leaves(shardings[0]["params"])):
      findings.append(f"{name}: parameters are not replicated")
    batch_specs = [s.spec for s in jax.tree.leaves(shardings[1])]
    if any(not spec or spec[0] != run_setup.DATA_AXIS for spec in batch_specs):
      findings.append(f"{name}: a batch input is not sharded over the data axis")
  evaluator = evaluate.Evaluator(tpu, split=config.eval.split)
  largest = max(evaluator.batches(), key=lambda b: max(np.size(v) for v in b.values()))
  compiled = evaluator._forward._predict.lower(params, _abstract(largest, data),
                                               consts).compile()
  # The forward's outputs are gathered to every chip for the host (out_shardings replicated):
  # one all-gather of the per-video outputs is by design.
  steps["eval_forward"] = _report("eval_forward", compiled, hbm, peak, None, findings,
                                  allowed=("all-reduce", "all-gather"))
  if evaluator.forward_mode == "chunked":   # what runs instead: the network on fixed rows
    width = int(config.eval.get("chunk_snippets", 1024)) + 2 * run.method.receptive_field
    rows = eval_forward.empty_rows(largest, evaluator.batch_size, width)
    compiled = evaluator._forward._network.lower(params, _abstract(rows, data),
                                                 consts).compile()
    steps["eval_network_rows"] = _report("eval_network_rows", compiled, hbm, peak, None,
                                         findings)
  out = {"topology": topology, "num_devices": int(devices.size), "num_chips": chips,
         "device_kind": devices[0].device_kind, "chip": chip, "hbm_bytes_per_device": hbm,
         "peak_bf16_flops_per_device": peak, "global_batch": int(config.train.batch_size),
         "eval_batch": int(config.eval.batch_size), "num_snippets": config.data.num_snippets,
         "config": config.name, "steps": steps, "findings": findings}
  results_io.write_json_atomic(os.path.join(workdir, "compile.json"), out, indent=2)
  return out


def format_report(out: dict) -> str:
  lines = [f"{out['config']} on {out['topology']} ({out['num_chips']} chips, "
           f"{out['num_devices']} x {out['device_kind']} devices, "
           f"{out['hbm_bytes_per_device'] / 2**30:.0f} GiB HBM and "
           f"{out['peak_bf16_flops_per_device'] / 1e12:.1f} TFLOP/s bf16 peak per device); "
           f"global batch {out['global_batch']}, eval batch {out['eval_batch']}, "
           f"T = {out['num_snippets']}",
           f"{'per device':<14s} {'args MiB':>9s} {'out MiB':>8s} {'temp MiB':>9s} {'% HBM':>6s} "
           f"{'GFLOP':>9s} {'est. ms':>8s}  collectives"]
  for name, s in out["steps"].items():
    lines.append(f"{name:<14s} {s['argument_bytes'] / 2**20:9.1f} "
                 f"{s['output_bytes'] / 2**20:8.1f} {s['temp_bytes'] / 2**20:9.1f} "
                 f"{100 * s['hbm_fraction']:6.2f} "
                 f"{s['flops'] / 1e9:9.2f} {1e3 * s['estimated_step_s']:8.3f}  "
                 f"{', '.join(s['collectives']) or '-'}"
                 + (f" (the program of {s['same_program_as']})" if s.get("same_program_as")
                    else ""))
  lines += [f"finding: {f}" for f in out["findings"]] or ["findings: none"]
  return "\n".join(lines)

