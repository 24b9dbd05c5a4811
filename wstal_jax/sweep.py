r"""One config over several seeds: mean ± std of what each run reports.

  python -m wstal_jax.sweep --config=configs/vlpo.py --seeds=0,1,2,3,4 --workdir=DIR \
      [--jobs=N] [--same_data] [--config.x=y ...]

Seed S runs `python -m wstal_jax.main --config=CONFIG --workdir=DIR/seedS --config.seed=S
--config.data.builtin_seed=S [--config.x=y ...]` (on the built-in benchmark each seed is a new
draw of the data as well as a new initialisation, unless --same_data; with a real dataset
`builtin_seed` is unused). Its output goes to DIR/seedS/log.txt. Re-running the command
resumes: a finished seed (DIR/seedS/metrics.json) is not run again, an interrupted one resumes
from its checkpoint. A finished run written before metrics.json had a `last` entry gets it
from an evaluation of its latest checkpoint (DIR/seedS/last/).

Writes DIR/summary.json: for each reported quantity, {"mean", "std" (sample, ddof=1; 0 for
one seed), "values" (per seed), "seeds"}; the selected checkpoint's at the top level
(`average_mAP`, `mAP@0.50`, ..., `acc`), the last checkpoint's under "last", the best on the
test split under "best_on_test" and, with held-out selection, `heldout_average_mAP`. And
DIR/summary.md, the markdown table it also prints: best on test (the field's practice: what
the papers report), last and (when used) held-out-selected side by side.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from wstal_jax import results_io
from wstal_jax.errors import WstalError, cli_main

# The quantities summarised (when the runs report them).
QUANTITIES = ("average_mAP", "mAP@0.10", "mAP@0.30", "mAP@0.50", "mAP@0.70", "acc", "cls_mAP")


def run_command(config: str, seed: int, workdir: str, overrides=(), same_data=False) -> list:
  """The `python -m wstal_jax.main` command of one seed."""
  cmd = [sys.executable, "-m", "wstal_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.seed={seed}"]
  if not same_data:
    cmd.append(f"--config.data.builtin_seed={seed}")
  return cmd + list(overrides)


def _run(cmd, log_path, cpu=None) -> int:
  if cpu is not None and shutil.which("taskset"):   # one core per job: no thread fights
    cmd = ["taskset", "-c", str(cpu)] + cmd
  with open(log_path, "a") as log:
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def _last_error(log: str) -> str:
  """' (error: ...)' with the log's last `error:` line, or ''."""
  try:
    with open(log) as f:
      errors = [line.strip() for line in f if line.startswith("error:")]
  except OSError:
    return ""
  return f" ({errors[-1]})" if errors else ""


def finish_run(workdir: str, cmd: list, cpu=None, eval_overrides=(), upgrade=True) -> dict:
  """Runs `cmd` unless WORKDIR/metrics.json exists, then (`upgrade`: a training run) makes
  sure it has `last` (older runs: --mode=eval --checkpoint=latest into WORKDIR/last).
  Returns metrics.json's content; WstalError naming the log when a command fails."""
  os.makedirs(workdir, exist_ok=True)
  log = os.path.join(workdir, "log.txt")
  metrics_path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(metrics_path):
    if _run(cmd, log, cpu) != 0 or not os.path.exists(metrics_path):
      raise WstalError(f"{workdir}: the run failed{_last_error(log)}; see {log}")
  metrics = results_io.load_json(metrics_path)
  if upgrade and "last" not in metrics:
    metrics["last"] = latest_metrics(workdir, workdir, cpu, eval_overrides)
  return metrics


def latest_metrics(run_dir: str, out_dir: str, cpu=None, eval_overrides=()) -> dict:
  """The test metrics of RUN_DIR's latest checkpoint, evaluated once into OUT_DIR/last."""
  last_dir = os.path.join(out_dir, "last")
  path = os.path.join(last_dir, "metrics.json")
  if not os.path.exists(path):
    os.makedirs(last_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "wstal_jax.main", "--mode=eval", f"--workdir={run_dir}",
           "--checkpoint=latest", f"--eval_dir={last_dir}", "--config.eval.num_plots=0",
           *eval_overrides]
    log = os.path.join(last_dir, "log.txt")
    if _run(cmd, log, cpu) != 0 or not os.path.exists(path):
      raise WstalError(f"{run_dir}: evaluating the latest checkpoint failed{_last_error(log)}; "
                       f"see {log}")
  out = results_io.load_json(path)
  return {k: v for k, v in out.items() if k not in ("selected_on", "checkpoint")}


def _stats(values: list, seeds: list) -> dict:
  return {"mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "values": values, "seeds": seeds}


def summarize(metrics_by_seed: dict) -> dict:
  """{seed: metrics.json content} -> the summary.json quantities (see the module docstring)."""
  seeds = sorted(metrics_by_seed)
  out = {}

  def block(get):
    res = {}
    for q in QUANTITIES + ("heldout_average_mAP",):
      vals = [get(metrics_by_seed[s]).get(q) for s in seeds]
      if vals and all(isinstance(v, (int, float)) for v in vals):
        res[q] = _stats([float(v) for v in vals], seeds)
    return res

  out.update(block(lambda m: m))
  for name in ("last", "best_on_test"):
    sub = block(lambda m: m.get(name) or {})
    if sub:
      out[name] = sub
  return out


def markdown(summary: dict, heldout: bool) -> str:
  """The summary as a markdown table: best on test, last, held-out-selected side by side."""
  def cell(d, q):
    return f"{d[q]['mean']:.1f} ± {d[q]['std']:.1f}" if q in d else "-"

  best = summary.get("best_on_test", summary)
  cols = [("best on test", best), ("last", summary.get("last", {}))]
  if heldout:
    cols.append(("held-out-selected", summary))
  lines = ["| quantity | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for q, label in (("average_mAP", "avg mAP"), ("mAP@0.50", "mAP@0.5"), ("acc", "ACC")):
    lines.append(f"| {label} | " + " | ".join(cell(d, q) for _, d in cols) + " |")
  return "\n".join(lines)


def sweep(config: str, seeds, workdir: str, overrides=(), *, jobs: int = 1,
          same_data: bool = False) -> dict:
  """Runs (or resumes) every seed, writes DIR/summary.json and DIR/summary.md; returns the
  summary."""
  os.makedirs(workdir, exist_ok=True)
  ncpu = os.cpu_count() or 1
  done, failed = {}, []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
    futures = {}
    for i, seed in enumerate(seeds):
      run_dir = os.path.join(workdir, f"seed{seed}")
      cmd = run_command(config, seed, run_dir, overrides, same_data)
      cpu = (i % ncpu) if jobs > 1 else None
      futures[pool.submit(finish_run, run_dir, cmd, cpu)] = seed
    for fut in concurrent.futures.as_completed(futures):
      seed = futures[fut]
      try:
        done[seed] = fut.result()
        print(f"seed {seed}: average mAP {done[seed].get('average_mAP')}", flush=True)
      except WstalError as e:
        failed.append(f"seed {seed}: {e}")
  if failed:
    raise WstalError("; ".join(failed))
  summary = summarize(done)
  heldout = any(m.get("selected_on") == "heldout" for m in done.values())
  summary["sweep"] = {"config": config, "overrides": list(overrides), "seeds": sorted(done),
                      "same_data": same_data, "selected_on": "heldout" if heldout else "test",
                      "protocol": next(iter(done.values())).get("protocol", "official"),
                      "workdirs": {str(s): os.path.join(workdir, f"seed{s}")
                                   for s in sorted(done)}}
  table = markdown(summary, heldout)
  results_io.write_json_atomic(os.path.join(workdir, "summary.json"), summary, indent=2)
  results_io.write_bytes_atomic(os.path.join(workdir, "summary.md"), (table + "\n").encode())
  return summary


def _parse(argv):
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.sweep",
      description="Runs one config over several seeds (resumable) and reports mean ± std.")
  p.add_argument("--config", required=True, help="config file (and :argument), as for main")
  p.add_argument("--seeds", required=True, help="comma list of seeds, e.g. 0,1,2,3,4")
  p.add_argument("--workdir", required=True, help="one sub-folder per seed, and the summary")
  p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel")
  p.add_argument("--same_data", action="store_true",
                 help="keep the built-in benchmark's draw fixed (config.data.builtin_seed)")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unexpected arguments {bad}: only --config.x=y overrides are passed on")
  if any(a.startswith(("--config.seed=", "--config.data.builtin_seed=")) for a in rest):
    p.error("the seed comes from --seeds, not from --config.seed / --config.data.builtin_seed")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r}: expected a comma list of integers")
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    p.error(f"--seeds={args.seeds!r}: expected distinct integers >= 0")
  if args.jobs < 1:
    p.error("--jobs must be >= 1")
  return args, seeds, rest


@cli_main
def main(argv=None):
  args, seeds, overrides = _parse(argv if argv is not None else sys.argv[1:])
  start = time.time()
  summary = sweep(args.config, seeds, args.workdir, overrides, jobs=args.jobs,
                  same_data=args.same_data)
  print(markdown(summary, summary["sweep"]["selected_on"] == "heldout"))
  print(f"{len(seeds)} seeds in {time.time() - start:.0f} s; "
        f"summary: {os.path.join(args.workdir, 'summary.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
