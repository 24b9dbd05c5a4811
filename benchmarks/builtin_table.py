r"""Runs methods and ablation rows on the built-in benchmark over seeds; prints a results table.

  python benchmarks/builtin_table.py --rows=base,vlpo --seeds=0,1,2 --jobs=2

The benchmark's rows, each a sweep (`python -m wstal_jax.sweep`, what users run for one
config): a `python -m wstal_jax.main` command (listed in ROWS) run once per seed with
`--config.seed=S --config.data.builtin_seed=S` (so each seed is a new draw of the benchmark
as well as a new initialisation) into `--root/<row>-seed<S>`, by the sweep's own
`finish_run`. A finished run is not re-run (re-running the command only re-reads its
metrics.json; a run from before metrics.json had `last` gets it from its latest checkpoint). Rows in EVAL_ROWS train nothing:
they evaluate another row's reported checkpoint with different inference settings (`--mode=eval
--config.<x>=...`, e.g. Ju et al.'s average fusion or VLP branch alone), after that row's runs
finish. The table (markdown) gives mean ± std
over seeds of average mAP@0.1:0.7 of the checkpoint selected on test (the field's practice)
and of the last checkpoint (no selection), mAP@0.5 and video ACC of the selected one; it is
also written as JSON with every quantity of `wstal_jax.sweep.summarize`.
`--shares` adds a second table: each weighted loss term's share of the total in the first and
the last log window of training, and its share of the summed per-term gradient norms averaged
over the log windows (mean over seeds, read from each run's log), so a term that never acts
is visible.
"""
import argparse
import concurrent.futures
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wstal_jax import sweep  # noqa: E402
from wstal_jax.errors import WstalError  # noqa: E402

VLPO = "configs/vlpo.py"
JU = "configs/ju2023.py"
MLLM = "configs/mllm4wtal.py"
NO_PASS1 = "--config.vlpo.dsp_pass1_term=False"
# row name -> (config argument, extra overrides, description)
SEAL = "configs/seal.py"
OFF_SME, OFF_PC, OFF_SC = (["--config.seal.sme=false"], ["--config.seal.pc=false"],
                           ["--config.seal.sc=false"])
ROWS = {
    "base": ("configs/base.py", [], "baseline (L_base: MIL top-k + actionness, Sec. 3.1)"),
    "zero_shot": (VLPO, ["--config.vlpo.finetune=zero_shot"],
                  "zero-shot VLM localizer (Table 4)"),
    "exp2": (VLPO + ":exp=2", [], "Table 3 exp 2: + L_vl + L_snip"),
    "exp3": (VLPO + ":exp=3", [], "Table 3 exp 3: + L_vl + L_kl + L_snip"),
    "exp4": (VLPO + ":exp=4", [], "Table 3 exp 4: + L_vl + L_kl + APR"),
    "exp5": (VLPO + ":exp=5", [], "Table 3 exp 5: full without PPG (L_snip)"),
    "exp6": (VLPO + ":exp=6", [], "Table 3 exp 6: full without APR"),
    "exp7": (VLPO + ":exp=7", [], "Table 3 exp 7: full without L_kl"),
    "exp8": (VLPO + ":exp=8", [], "Table 3 exp 8: full without DSP"),
    "training_free": (VLPO, ["--config.vlpo.finetune=training_free"],
                      "Table 4: training-free VLFT"),
    "clip_adapter": (VLPO, ["--config.vlpo.finetune=clip_adapter"],
                     "Table 4: CLIP-Adapter VLFT"),
    "vlpo": (VLPO, [], "VLPO full (Table 3 exp 9, CM-AFA)"),
    "vlpo_first_reading": (VLPO, ["--config.vlpo.proj_init=identity",
                                  "--config.vlpo.dsp_pools_cas=False",
                                  "--config.vlpo.dsp_weights=halved",
                                  "--config.vlpo.dsp_pass1_term=False"],
                           "VLPO with the readings before review (issue 20)"),
    # The readings table's variants each change one reading of Eq. 6 literally (no pass-1
    # term), the state the review measured them in.
    "vlpo_labelled_cas": (VLPO, [NO_PASS1, "--config.vlpo.act_target=labelled_cas"],
                          "VLPO, Eq. 6 literally + actionness targets from the labelled CAS"),
    "vlpo_infer_mil": (VLPO, [NO_PASS1, "--config.vlpo.infer_labels=mil"],
                       "VLPO, Eq. 6 literally + DSP pass-1 labels from the MIL score"),
    # The released code's readings (configs/vlpo.py:reading=code), Table 3 rows 1, 6-9.
    "code_exp1": (VLPO + ":exp=1,reading=code", [], "code reading: baseline (exp 1)"),
    "code_exp6": (VLPO + ":exp=6,reading=code", [], "code reading: without APR (exp 6)"),
    "code_exp7": (VLPO + ":exp=7,reading=code", [], "code reading: without L_kl (exp 7)"),
    "code_exp8": (VLPO + ":exp=8,reading=code", [], "code reading: without DSP (exp 8)"),
    "vlpo_code": (VLPO + ":reading=code", [], "code reading: VLPO full (exp 9)"),
    "vlpo_no_pass1": (VLPO, [NO_PASS1],
                      "VLPO, Eq. 6 literally (no L_vl at inference pass 1's selection)"),
    "vlpo_oic_mil": (VLPO, [NO_PASS1, "--config.vlpo.oic_score=mil"],
                     "VLPO, Eq. 6 literally + OIC gamma term from the MIL score (ASL)"),
    "vlpo_class025": (VLPO, [NO_PASS1, "--config.eval.postprocess.class_threshold=0.25"],
                      "VLPO, Eq. 6 literally + ASL's class threshold 0.25"),
    # PVLR (pvlr.txt) on its CO2-Net base.
    "co2net": ("configs/co2net.py", [], "CO2-Net, PVLR's base (its own recipe)"),
    "pvlr_exp1": ("configs/pvlr.py:exp=1", [],
                  "PVLR Table 3 row 1: the CO2-Net base with PVLR's L_vid"),
    "pvlr_exp2": ("configs/pvlr.py:exp=2", [], "PVLR Table 3: + P-CAS + L_kd"),
    "pvlr_exp3": ("configs/pvlr.py:exp=3", [], "PVLR Table 3: + L_intra"),
    "pvlr_exp4": ("configs/pvlr.py:exp=4", [], "PVLR Table 3: + L_inter"),
    "pvlr": ("configs/pvlr.py", [], "PVLR full (Table 3 row 5, + L_ortho)"),
    "delu": ("configs/delu.py", [], "DELU (CO2-Net + dual evidential learning), MLLM4WTAL's base"),
    "delu_released": ("configs/delu.py", ["--config.delu.curve_gather=released"],
                      "DELU with the released code's curve gather (PEERS.md defect)"),
    "delu_no_edl": ("configs/delu.py", ["--config.delu.w_edl=0"],
                    "DELU without the video evidential loss"),
    "delu_no_uct": ("configs/delu.py", ["--config.delu.w_uct=0"],
                    "DELU without the uncertainty-guided loss"),
    "delu_relu": ("configs/delu.py", ["--config.delu.edl_evidence=relu"],
                  "DELU with relu evidence (the release's ActivityNet choice)"),
    # MLLM4WTAL (mllm4wtal.txt) on DELU: Tables 3-5.
    "mllm4wtal": (MLLM, [], "MLLM4WTAL full (KSM + CSR, DPID, localization head) on DELU"),
    "mllm_ksm": (MLLM, ["--config.mllm4wtal.use_csr=false"],
                 "MLLM4WTAL Table 3: DELU + KSM (+ localization head)"),
    "mllm_csr": (MLLM, ["--config.mllm4wtal.use_ksm=false"],
                 "MLLM4WTAL Table 3: DELU + CSR (+ localization head)"),
    "mllm_csr_no_transfer": (MLLM, ["--config.mllm4wtal.use_ksm=false",
                                     "--config.mllm4wtal.lambda1=0"],
                             "MLLM4WTAL: DELU + CSR trained, A_CSR not distilled into DELU"),
    "mllm_co2net": (MLLM + ":base=co2net", [], "MLLM4WTAL Table 4: CO2-Net + KSM + CSR"),
    "mllm_class_name": (MLLM, ["--config.mllm4wtal.ksm_text=class_name"],
                        "MLLM4WTAL Table 5: class name instead of the key description"),
    "mllm_template": (MLLM, ["--config.mllm4wtal.csr_text=template"],
                      "MLLM4WTAL Table 5: 'a video of the [CLS]' instead of the complete one"),
    "mllm_alternate": (MLLM, ["--config.mllm4wtal.dpid_steps=1"],
                       "MLLM4WTAL, DPID phases taking turns of one step"),
    "mllm_gate_logits": (MLLM, ["--config.mllm4wtal.csr_gate=logits"],
                         "MLLM4WTAL, A_CSR multiplying the attention logits (Eq. 14-15 as printed)"),
    "mllm_psi_binary": (MLLM, ["--config.mllm4wtal.psi=binary"],
                        "MLLM4WTAL, psi = binarised attention (pseudo-label targets)"),
    "mllm_csr_free": (MLLM, ["--config.mllm4wtal.lambda2=0"],
                      "MLLM4WTAL, A_CSR not distilled towards A_KSM (what L_CSR alone teaches)"),
    "pvlr_det": ("configs/pvlr.py", ["--config.pvlr.num_samples=0"],
                 "PVLR Table 4: deterministic CAS (K = 0)"),
    "pvlr_maha": ("configs/pvlr.py", ["--config.pvlr.metric=mahalanobis"],
                  "PVLR Table 4: Mahalanobis distance"),
    "pvlr_bhatt": ("configs/pvlr.py", ["--config.pvlr.metric=bhattacharyya"],
                   "PVLR Table 4: Bhattacharyya distance"),
    "pvlr_k5": ("configs/pvlr.py", ["--config.pvlr.num_samples=5"], "PVLR Table 5: K = 5"),
    "pvlr_k10": ("configs/pvlr.py", ["--config.pvlr.num_samples=10"], "PVLR Table 5: K = 10"),
    # (Row 1, the CO2-Net base, is the same under both readings: pvlr_exp1.)
    "pvlr_code_exp2": ("configs/pvlr.py:exp=2,reading=code", [], "PVLR code reading: row 2"),
    "pvlr_code_exp3": ("configs/pvlr.py:exp=3,reading=code", [], "PVLR code reading: row 3"),
    "pvlr_code_exp4": ("configs/pvlr.py:exp=4,reading=code", [], "PVLR code reading: row 4"),
    "pvlr_code": ("configs/pvlr.py:reading=code", [], "PVLR code reading: row 5 (full)"),
    "pvlr_first_reading": ("configs/pvlr.py", ["--config.pvlr.logit_scale=fixed",
                                               "--config.pvlr.var_param=relu",
                                               "--config.pvlr.divergence_scale=sum",
                                               "--config.pvlr.w_intra=0.005",
                                               "--config.pvlr.w_inter=0.005"],
                           "PVLR with the readings before review (issue 20)"),
    # Ju et al. 2023 (ju2023_distill_vlp.txt); the CBP-alone run also gives the untrained
    # (zero-shot) VLP branch's frame mIoU, only_b the VLP branch after B steps.
    "ju_cbp": (JU + ":exp=cbp", [], "Ju: CBP branch alone (warm-up only, all steps)"),
    "ju_only_f_w": (JU + ":exp=only_f,fusion=weighted", [],
                    "Ju Table 4: only F step, weighted fusion"),
    "ju_only_b_w": (JU + ":exp=only_b,fusion=weighted", [],
                    "Ju Table 4: only B step, weighted fusion"),
    "ju_kd": (JU + ":losses=kd", [], "Ju Table 5: L_kd only"),
    "ju_fb": (JU + ":losses=fb", [], "Ju Table 5: L_fb only"),
    "ju_co2net": (JU + ":cbp=co2net", [], "Ju Table 6: CO2-Net as the CBP branch"),
    "ju": (JU, [], "Ju full (alternating B / F, both losses)"),
    "ju_distill_all": (JU, ["--config.ju2023.distill=all"],
                       "Ju, every confident entry distilled both ways"),
    # P-MIL and SEAL (seal.txt) on the built-in weak-localizer proposals.
    "pmil": ("configs/pmil.py", [], "P-MIL (separate RGB / flow branches, IRC, completeness)"),
    "seal_base": (SEAL, OFF_SME + OFF_PC + OFF_SC, "SEAL Table 3 base: fused P-MIL, L_cls only"),
    "seal_sme": (SEAL, OFF_PC + OFF_SC, "SEAL Table 3: + L_SME"),
    "seal_pc": (SEAL, OFF_SME + OFF_SC, "SEAL Table 3: + L_pc"),
    "seal_sc": (SEAL, OFF_SME + OFF_PC, "SEAL Table 3: + L_sc"),
    "seal_sme_pc": (SEAL, OFF_SC, "SEAL Table 3: + L_SME + L_pc"),
    "seal_pc_sc": (SEAL, OFF_SME, "SEAL Table 3: + L_pc + L_sc"),
    "seal": (SEAL, [], "SEAL full (L_SME + L_pc + L_sc)"),
    "seal_segment": (SEAL, ["--config.seal.aggregation=segment"] + OFF_PC + OFF_SC,
                     "SEAL Table 4: + L_SME, segment-level descriptors"),
    "seal_high": (SEAL, ["--config.seal.moderate=false"] + OFF_PC + OFF_SC,
                  "SEAL Table 5: + L_SME, high-confidence pseudo-labels only"),
    "seal_mse_mean": (SEAL, ["--config.seal.mse_reduce=mean"],
                      "SEAL, phi averaged over the classes too (the release's L_SME / L_c)"),
    "seal_pc_overlapping": (SEAL, ["--config.seal.pc_match=overlapping"],
                            "SEAL, L_pc over the overlapping proposals only (the release)"),
}
# Rows that only evaluate another row's trained run differently (no training): row ->
# (source row, overrides for `--mode=eval`, description). The evaluated checkpoint is the one
# the source run reported (its metrics.json step); the outputs go to --root/<row>-seed<S>.
EVAL_ROWS = {
    "co2net_topk10": ("co2net", ["--config.co2net.eval_topk_divisor=10"],
                      "CO2-Net, video score over the top n // 10 (DELU's inference setting)"),
    "ju_vlp_zero_shot": ("ju_cbp", ["--config.ju2023.fusion=vlp"],
                         "Ju: VLP branch zero-shot (never trained), localizing alone"),
    "ju_only_f_avg": ("ju_only_f_w", ["--config.ju2023.fusion=average"],
                      "Ju Table 4: only F step, average fusion"),
    "ju_only_b_avg": ("ju_only_b_w", ["--config.ju2023.fusion=average"],
                      "Ju Table 4: only B step, average fusion"),
    "ju_vlp_after_b": ("ju_only_b_w", ["--config.ju2023.fusion=vlp"],
                       "Ju: VLP branch after B steps (only B), localizing alone"),
    "ju_vlp_full": ("ju", ["--config.ju2023.fusion=vlp"],
                    "Ju full: its VLP branch localizing alone"),
    "mllm_base_inference": ("mllm4wtal", ["--config.mllm4wtal.inference=base"],
                            "MLLM4WTAL full, the base's own inference (no localization head)"),
    "mllm_loc_cas": ("mllm4wtal", ["--config.mllm4wtal.loc_cas=loc"],
                     "MLLM4WTAL full, proposals scored on the head's class probabilities"),
}


def describe(row):
  return (ROWS.get(row) or EVAL_ROWS[row])[2]


def command(row, seed, root, extra):
  if row in EVAL_ROWS:
    source, overrides, _ = EVAL_ROWS[row]
    src = os.path.join(root, f"{source}-seed{seed}")
    with open(os.path.join(src, "metrics.json")) as f:
      step = json.load(f)["step"]
    workdir = os.path.join(root, f"{row}-seed{seed}")
    return workdir, [sys.executable, "-m", "wstal_jax.main", "--mode=eval", f"--workdir={src}",
                     f"--eval_dir={workdir}", f"--checkpoint={step}", *overrides, *extra]
  config, overrides, _ = ROWS[row]
  workdir = os.path.join(root, f"{row}-seed{seed}")
  return workdir, [sys.executable, "-m", "wstal_jax.main", f"--config={config}",
                   f"--workdir={workdir}", f"--config.seed={seed}",
                   f"--config.data.builtin_seed={seed}", *overrides, *extra]


def run_one(row, seed, root, extra, cpu):
  if row in EVAL_ROWS:
    src = os.path.join(root, f"{EVAL_ROWS[row][0]}-seed{seed}", "metrics.json")
    if not os.path.exists(src):
      return row, seed, None, f"its source run {src} did not finish"
  workdir, cmd = command(row, seed, root, extra)
  start = time.time()
  existed = os.path.exists(os.path.join(workdir, "metrics.json"))
  try:
    if row in EVAL_ROWS:   # "last": the source run's last checkpoint, same eval overrides
      src_dir = os.path.join(root, f"{EVAL_ROWS[row][0]}-seed{seed}")
      metrics = sweep.finish_run(workdir, cmd, cpu, upgrade=False)
      metrics["last"] = sweep.latest_metrics(src_dir, workdir, cpu,
                                             [*EVAL_ROWS[row][1], *extra])
    else:
      metrics = sweep.finish_run(workdir, cmd, cpu)
  except WstalError as e:
    return row, seed, None, str(e)
  if not existed:
    print(f"{row} seed {seed}: {time.time() - start:.0f}s", flush=True)
  return row, seed, metrics, None


_SHARES = re.compile(r"step (\d+)/\d+ .*\(share of the loss: ([^)]*)\)"
                     r"(?:\s+\(share of the gradient norm: ([^)]*)\))?")


def _percentages(text):
  return {k: float(v.rstrip("%")) for k, v in (item.rsplit(" ", 1) for item in text.split(", "))}


def log_shares(workdir):
  """From a run's log.txt (None if not found): {'first': {term: loss share %}, 'last': {...},
  'grad_mean': {term: gradient-norm share % averaged over the log windows}, 'grad_min':
  {term: its smallest window}} (the 'grad_*' entries only when the run logged them)."""
  loss_windows, grad_windows = [], []
  path = os.path.join(workdir, "log.txt")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    for line in f:
      m = _SHARES.search(line)
      if m:
        loss_windows.append(_percentages(m.group(2)))
        if m.group(3):
          grad_windows.append(_percentages(m.group(3)))
  if not loss_windows:
    return None
  out = {"first": loss_windows[0], "last": loss_windows[-1]}
  if grad_windows:
    out["grad_mean"] = {t: float(np.mean([w[t] for w in grad_windows])) for t in grad_windows[0]}
    out["grad_min"] = {t: float(np.min([w[t] for w in grad_windows])) for t in grad_windows[0]}
  return out


def shares_table(rows, seeds, root):
  """Loss shares (first / last log window) and gradient-norm shares (mean over the windows,
  and the term with the smallest mean): the criterion for "every term acts" is a gradient
  share (README, "Every term acts")."""
  lines = ["| row | loss share %, first log window | last log window | gradient-norm share %, "
           "mean over windows | smallest gradient share |", "|---|---|---|---|---|"]
  out = {}
  for r in rows:
    got = [log_shares(os.path.join(root, f"{r}-seed{s}")) for s in seeds]
    got = [g for g in got if g]
    if not got:
      continue
    keys = [w for w in ("first", "last", "grad_mean", "grad_min") if all(w in g for g in got)]
    mean = {w: {t: float(np.mean([g[w][t] for g in got])) for t in got[0][w]} for w in keys}
    out[r] = mean
    fmt = lambda d: ", ".join(f"{t} {v:.1f}" for t, v in d.items())
    if "grad_mean" in mean:
      low = min(mean["grad_mean"], key=mean["grad_mean"].get)
      grad, lowest = fmt(mean["grad_mean"]), f"{low} {mean['grad_mean'][low]:.1f}"
    else:
      grad, lowest = "(not logged)", ""
    lines.append(f"| {r} | {fmt(mean['first'])} | {fmt(mean['last'])} | {grad} | {lowest} |")
  return "\n".join(lines), out


def miou_table(rows, seeds, results):
  """Frame-level fg / bg mIoU of each branch (methods whose metrics.json has them: Ju et
  al.'s Table 3 metric), mean over seeds; '' when no row has them."""
  names = sorted({k[len("fg_mIoU_"):] for m in results.values() for k in m
                  if k.startswith("fg_mIoU_")})
  if not names:
    return ""
  lines = ["| row | " + " | ".join(f"{n} fg / bg mIoU" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  for r in rows:
    got = [results[(r, s)] for s in seeds if (r, s) in results]
    if not got or not any(f"fg_mIoU_{n}" in got[0] for n in names):
      continue
    cells = []
    for n in names:
      fg = np.array([m.get(f"fg_mIoU_{n}", np.nan) for m in got])
      bg = np.array([m.get(f"bg_mIoU_{n}", np.nan) for m in got])
      cells.append(f"{fg.mean():.1f} / {bg.mean():.1f}")
    lines.append(f"| {describe(r)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="base,vlpo", help=f"comma list of {', '.join(ROWS)}")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default="workdirs/builtin_table")
  p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one CPU core each)")
  p.add_argument("--json", default=None, help="write the aggregated table here")
  p.add_argument("--shares", action="store_true",
                 help="also print each loss term's loss and gradient shares")
  p.add_argument("extra", nargs="*", help="extra overrides passed to every run (after --)")
  args = p.parse_args()
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS and r not in EVAL_ROWS]
  if unknown:
    p.error(f"unknown rows {unknown}; known: {', '.join([*ROWS, *EVAL_ROWS])}")
  seeds = [int(s) for s in args.seeds.split(",")]
  # Training rows first (with the sources the evaluation rows need), then the evaluations.
  train_rows = [r for r in rows if r in ROWS]
  train_rows += [EVAL_ROWS[r][0] for r in rows
                 if r in EVAL_ROWS and EVAL_ROWS[r][0] not in train_rows]
  ncpu = os.cpu_count() or 1
  results = {}
  for stage in (train_rows, [r for r in rows if r in EVAL_ROWS]):
    jobs = [(r, s) for r in stage for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
      futures = {}
      for i, (r, s) in enumerate(jobs):
        cpu = (i % ncpu) if args.jobs > 1 else None
        futures[pool.submit(run_one, r, s, args.root, args.extra, cpu)] = (r, s)
      for fut in concurrent.futures.as_completed(futures):
        r, s, metrics, err = fut.result()
        if err:
          print(f"FAILED {r} seed {s}: {err}", file=sys.stderr)
        else:
          results[(r, s)] = metrics

  table = {}
  lines = ["| row | avg mAP@0.1:0.7, best on test | last | mAP@0.5 | ACC | seeds |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    got = {s: results[(r, s)] for s in seeds if (r, s) in results}
    if not got:
      continue
    summary = sweep.summarize(got)
    fmt = lambda d, q: f"{d[q]['mean']:.1f} ± {d[q]['std']:.1f}" if q in d else "-"
    table[r] = dict(summary, n=len(got), description=describe(r))
    lines.append(f"| {describe(r)} | {fmt(summary, 'average_mAP')} | "
                 f"{fmt(summary.get('last', {}), 'average_mAP')} | {fmt(summary, 'mAP@0.50')} "
                 f"| {fmt(summary, 'acc')} | {len(got)} |")
  print("\n".join(lines))
  miou = miou_table(rows, seeds, results)
  if miou:
    print(miou)
  if args.shares:
    text, shares = shares_table(rows, seeds, args.root)
    print(text)
    for r, v in shares.items():
      table.setdefault(r, {})["shares"] = v
  if args.json:
    with open(args.json, "w") as f:
      json.dump(table, f, indent=2)


if __name__ == "__main__":
  main()
