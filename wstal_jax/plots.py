"""Per-video PNG plots: score curves over time, ground truth and kept proposals.

The qualitative figure of the WS-TAL papers (VLPO Fig. 5, PVLR Fig. 4): on top the class
activation / actionness curves over time with the ground truth shaded behind them, below one
track with the ground-truth segments and one with the highest-scoring proposals (opacity =
score), one row per shown class.

    python -m wstal_jax.plots --results=RESULTS.json --scores=SCORES.npz \
        --ground_truth=GT.json --videos=video_test_0000004,video_test_0000006 --out=DIR

renders DIR/<video>.png for the chosen videos (--videos=all: every video in SCORES.npz). The
.npz layout is in `wstal_jax.results_io` (`save_scores_npz` / `load_scores_npz`).
Rendering uses matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it
works headless and from inside training.
"""
import argparse
import io
import os
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wstal_jax import results_io
from wstal_jax.errors import WstalError, cli_main

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f")


def _color(c: int) -> str:
  return _PALETTE[c % len(_PALETTE)]


def _as_segments(items, class_index):
  """(start, end, class id[, score]) rows from tuples or an object with start/end/label arrays."""
  if items is None:
    return []
  if hasattr(items, "start") and hasattr(items, "label"):
    score = getattr(items, "score", None)
    score = np.ones(len(items.start)) if score is None else score
    items = zip(items.start, items.end, items.label, score)
  rows = []
  for it in items:
    s, e, lab = float(it[0]), float(it[1]), it[2]
    c = class_index[lab] if isinstance(lab, str) else int(lab)
    rows.append((s, e, c, float(it[3]) if len(it) > 3 else 1.0))
  return rows


def plot_video(path: str, *, name: str, seconds_per_snippet: float, class_names,
               cas_TxC=None, curves=None, gt_segments=None, proposals=None, classes=None,
               duration: float | None = None, max_proposals: int = 30,
               max_classes: int = 4, title: str | None = None, dpi: int = 100) -> str:
  """Renders one video's figure to a PNG at `path` (written atomically); returns `path`.

  Args:
    name: video name (title).
    seconds_per_snippet: seconds per element of the curves (snippet i drawn at
      (i + 0.5) * sps).
    class_names: [C] names (legend; str labels of segments are looked up here).
    cas_TxC: [T, C] class sequence; the shown classes' columns are drawn.
    curves: {legend: [T] array} extra curves, e.g. {"actionness": actionness_T}.
    gt_segments: iterable of (start_s, end_s, label) with label a class id or name.
    proposals: postprocess.Proposals, or iterable of (start_s, end_s, label, score).
    classes: class ids to show; default the ground-truth classes, then the classes of the
      best proposals, up to `max_classes` (the highest CAS peak when there are none).
    duration: x-axis length in seconds (default T * sps).
    max_proposals: draw only this many highest-scoring proposals of the shown classes.
  """
  class_names = [str(c) for c in class_names]
  class_index = {c: i for i, c in enumerate(class_names)}
  sps = float(seconds_per_snippet)
  cas = None if cas_TxC is None else np.asarray(cas_TxC, np.float64)
  curves = dict(curves or {})
  lengths = [len(np.asarray(v).reshape(-1)) for v in curves.values()]
  if cas is not None:
    lengths.append(cas.shape[0])
  t_len = max(lengths) if lengths else 0
  if duration is None or duration <= 0:
    duration = t_len * sps
  gt_rows = _as_segments(gt_segments, class_index)
  prop_rows = sorted(_as_segments(proposals, class_index), key=lambda r: -r[3])

  if classes is None:
    shown = []
    for c in [r[2] for r in gt_rows] + [r[2] for r in prop_rows]:
      if c not in shown:
        shown.append(c)
    if not shown and cas is not None:  # nothing annotated or predicted: the highest peak
      shown.append(int(np.argmax(cas.max(axis=0))))
    shown = shown[:max_classes]
  else:
    shown = [int(c) for c in classes]
  prop_rows = [r for r in prop_rows if r[2] in shown][:max_proposals]

  num_rows = max(1, len(shown))
  fig = Figure(figsize=(12, 3.2 + 0.6 * num_rows), dpi=dpi)
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(3, 1, height_ratios=[3.0, 0.45 * num_rows + 0.3,
                                               0.45 * num_rows + 0.3], hspace=0.08)
  ax_curve = fig.add_subplot(grid[0])
  ax_gt = fig.add_subplot(grid[1], sharex=ax_curve)
  ax_prop = fig.add_subplot(grid[2], sharex=ax_curve)

  time_T = (np.arange(t_len) + 0.5) * sps
  for s, e, c, _ in gt_rows:
    ax_curve.axvspan(s, e, color=_color(c), alpha=0.12, lw=0)
  if cas is not None:
    for c in shown:
      ax_curve.plot(time_T[:cas.shape[0]], cas[:, c], color=_color(c), lw=1.2,
                    label=f"CAS {class_names[c]}")
  for i, (label, values) in enumerate(curves.items()):
    values = np.asarray(values, np.float64).reshape(-1)
    ax_curve.plot(time_T[:len(values)], values, color="black", lw=1.0,
                  ls=("--", ":", "-.")[i % 3], label=str(label))
  if ax_curve.lines:
    ax_curve.legend(loc="upper right", fontsize=8, ncol=2)
  ax_curve.set_ylabel("score")
  ax_curve.set_title(title or name, fontsize=10)
  ax_curve.tick_params(labelbottom=False)

  row_of = {c: i for i, c in enumerate(shown)}
  for ax, rows, what in ((ax_gt, gt_rows, "ground truth"), (ax_prop, prop_rows, "proposals")):
    top = max((r[3] for r in rows), default=1.0)
    for s, e, c, score in rows:
      if c not in row_of:
        continue
      alpha = 0.9 if what == "ground truth" else 0.25 + 0.65 * max(score, 0) / max(top, 1e-12)
      ax.broken_barh([(s, max(e - s, 1e-3))], (row_of[c] - 0.4, 0.8), color=_color(c),
                     alpha=min(alpha, 1.0))
    ax.set_yticks(range(num_rows))
    ax.set_yticklabels([class_names[c] for c in shown] or [""], fontsize=8)
    ax.set_ylim(-0.6, num_rows - 0.4)
    ax.invert_yaxis()
    ax.set_ylabel(what, fontsize=8, rotation=0, ha="right", va="center")
  ax_gt.tick_params(labelbottom=False)
  ax_prop.set_xlabel("time (s)")
  ax_curve.set_xlim(0, max(duration, sps))
  fig.subplots_adjust(left=0.14, right=0.98, top=0.94, bottom=0.1)

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  results_io.write_bytes_atomic(path, buf.getvalue())
  return path


def _parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.plots",
      description="Render per-video PNGs: score curves, ground truth and proposals.")
  p.add_argument("--scores", required=True, help="scores .npz (results_io.save_scores_npz)")
  p.add_argument("--results", default=None, help="results JSON (ActivityNet format)")
  p.add_argument("--ground_truth", default=None, help="ground-truth JSON ('database' format)")
  p.add_argument("--videos", required=True, help="comma-separated video names, or 'all'")
  p.add_argument("--out", required=True, help="output directory (created if missing)")
  p.add_argument("--max_proposals", type=int, default=30,
                 help="highest-scoring proposals drawn per video (default 30)")
  return p


@cli_main
def main(argv=None):
  args = _parser().parse_args(argv)
  scores = results_io.load_scores_npz(args.scores)
  class_names = scores["class_names"]
  if args.videos.strip() == "all":
    videos = sorted(scores["videos"])
  else:
    videos = [v.strip() for v in args.videos.split(",") if v.strip()]
  missing = [v for v in videos if v not in scores["videos"]]
  if missing or not videos:
    raise WstalError(f"{args.scores}: no scores for video(s) {missing or videos} "
                     f"(has e.g. {sorted(scores['videos'])[:3]})")
  gt_db = {}
  if args.ground_truth:
    gt = results_io.load_json(args.ground_truth)
    results_io.ground_truth_table(gt, source=args.ground_truth)  # validate
    gt_db = gt["database"]
  preds = {}
  if args.results:
    res = results_io.load_json(args.results)
    results_io.results_table(res, source=args.results)  # validate
    preds = res["results"]
  known = set(class_names)
  os.makedirs(args.out, exist_ok=True)
  for vid in videos:
    entry = scores["videos"][vid]
    gt_rows, duration = [], None
    if vid in gt_db:
      duration = gt_db[vid].get("duration")
      gt_rows = [(float(a["segment"][0]), float(a["segment"][1]), a["label"])
                 for a in gt_db[vid]["annotations"] if a["label"] in known]
    prop_rows = [(float(p["segment"][0]), float(p["segment"][1]), p["label"], float(p["score"]))
                 for p in preds.get(vid, []) if p["label"] in known]
    curves = {}
    if "actionness" in entry:
      curves["actionness"] = entry["actionness"]
    out = plot_video(os.path.join(args.out, f"{vid}.png"), name=vid,
                     seconds_per_snippet=entry["seconds_per_snippet"], class_names=class_names,
                     cas_TxC=entry["cas"], curves=curves, gt_segments=gt_rows,
                     proposals=prop_rows, duration=float(duration) if duration else None,
                     max_proposals=args.max_proposals)
    print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
