"""The CO2-Net / PVLR family's evaluation loop, re-implemented for timing and agreement tests.

This is the cost users of those codebases pay today: per video, per action threshold, per kept
class a Python loop over the runs of snippets above the threshold (grouped with np.split),
the outer-inner contrast of every run from Python index lists, one Gaussian soft-NMS per class
in Python (argmax, row swap, decay, repeat), and the ambiguous-segment filter that compares
index sets of every proposal with every line of `Ambiguous_test.txt`. It follows the released
CO2-Net inference (`multiple_threshold_hamnet`, `get_proposal_oic_2`, `soft_nms`,
`filter_segments`; PVLR evaluates with the same code), written anew from that algorithm:

  classes     video score >= 0.2, else the argmax class
  thresholds  linspace(0.1, 0.9, 10) on the class-agnostic attention, `>`; every kept class
              gets the same runs
  score       mean(cas inside) - mean(cas outside) + 0.2 * video score, outside = int(0.25 L)
              snippets each side (clipped; an empty outside counts 0)
  units       snippets: a run [s, e] becomes (t_start = s, t_end = e + 1)
  soft-NMS    Gaussian, sigma 0.3, "+1" on lengths, every proposal kept, per class in the order
              classes first produced a proposal
  ambiguous   a proposal is dropped when its snippet range shares an index with
              range(round(start * 25 / 16), round(end * 25 / 16)) of an ambiguous segment

Quirks kept on purpose (they are what the reference computes): a class whose only snippet
above a threshold is snippet 0 gets no proposal at that threshold (`np.array(...).any()` on
the index list), and the ambiguous file is re-read for every video.

`wstal_jax.postprocess.video_proposals` with the 'co2net' preset computes the same proposals
(tests/test_benchmarks.py checks it); its docstring lists where it deliberately differs
(snippet-0 quirk, ambiguous overlap in seconds, clipping to the video duration).

Detection mAP of the family is the official ActivityNet loop on ground truth converted to
snippets (round(seconds * 25 / 16)); `benchmarks/eval_speed.naive_detection_ap` is that loop,
and `detection_map_loop` applies it in snippet units.
"""
import numpy as np

CLASS_THRESHOLD = 0.2
ACT_THRESHOLDS = np.linspace(0.1, 0.9, 10)
OIC_LAMBDA = 0.25
OIC_GAMMA = 0.2
SOFT_NMS_SIGMA = 0.3
SNIPPETS_PER_SECOND = 25.0 / 16.0


def group_runs(positions):
  """Sorted snippet indices -> list of arrays of consecutive indices."""
  return np.split(positions, np.where(np.diff(positions) != 1)[0] + 1)


def oic_proposals(positions_per_class, cas_TxKx1, video_scores_C, kept_K,
                  lambda_=OIC_LAMBDA, gamma=OIC_GAMMA):
  """For each kept class with runs: [[class, score, t_start, t_end], ...] (snippet units)."""
  out = []
  num_t = cas_TxKx1.shape[0]
  for i, where in enumerate(positions_per_class):
    positions = np.array(where)[0]
    if not positions.any():   # the reference's test: skips [] and also [0]
      continue
    found = []
    for run in group_runs(positions):
      inner = np.mean(cas_TxKx1[run, i, 0])
      length = len(run)
      outer_s = max(0, int(run[0] - lambda_ * length))
      outer_e = min(int(num_t - 1), int(run[-1] + lambda_ * length))
      outside = list(range(outer_s, int(run[0]))) + list(range(int(run[-1] + 1), outer_e + 1))
      outer = 0 if len(outside) == 0 else np.mean(cas_TxKx1[outside, i, 0])
      score = inner - outer + gamma * video_scores_C[kept_K[i]]
      found.append([kept_K[i], score, run[0], run[-1] + 1])
    out.append(found)
  return out


def soft_nms(dets, sigma=SOFT_NMS_SIGMA):
  """Gaussian soft-NMS of [[class, score, t_start, t_end], ...] -> list in output order."""
  dets = np.array(dets, dtype=np.float64)
  areas = dets[:, 3] - dets[:, 2] + 1
  dets = np.concatenate([dets, areas[:, None]], axis=1)
  kept = []
  while dets.size > 0:
    best = np.argmax(dets[:, 1], axis=0)
    dets[[0, best], :] = dets[[best, 0], :]
    kept.append(dets[0, :-1].tolist())
    inter = np.maximum(np.minimum(dets[0, 3], dets[1:, 3])
                       - np.maximum(dets[0, 2], dets[1:, 2]) + 1, 0.0)
    iou = inter / (dets[0, -1] + dets[1:, -1] - inter)
    dets[1:, 1] *= np.exp(-(iou * iou) / sigma)
    dets = dets[1:, :]
  return kept


def read_ambiguous_lines(path):
  """[video, start, end] string triples of an Ambiguous_test.txt (split on whitespace; the
  reference splits on one space and reads fields 2 and 3, which is the same on the
  double-spaced THUMOS14 file)."""
  if path is None:
    return []
  try:
    with open(path) as fh:
      return [line.split() for line in fh if line.strip()]
  except OSError:
    return []


def filter_ambiguous(segments_Nx4, video_name, ambiguous_lines):
  """Drops [t_start, t_end, score, class] rows sharing a snippet index with an ambiguous one."""
  drop = np.zeros(len(segments_Nx4))
  for i in range(len(segments_Nx4)):
    for a in ambiguous_lines:
      if a[0] == video_name:
        gt = range(int(round(float(a[1]) * SNIPPETS_PER_SECOND)),
                   int(round(float(a[2]) * SNIPPETS_PER_SECOND)))
        pd = range(int(segments_Nx4[i][0]), int(segments_Nx4[i][1]))
        union = set(gt).union(set(pd))
        iou = float(len(set(gt).intersection(set(pd)))) / float(len(union)) if union else 0.0
        if iou > 0:
          drop[i] = 1
  return np.array([segments_Nx4[i, :] for i in range(len(segments_Nx4)) if drop[i] == 0]
                  ).reshape(-1, 4)


def video_proposals(video_name, video_scores_C, cas_TxC, actionness_T, ambiguous_path=None,
                    ambiguous_lines=None):
  """One video -> float64 [N, 4] rows (t_start, t_end, score, class), snippet units.

  ambiguous_path: re-read for this video, as the reference does; or pass the already-read
  `ambiguous_lines`; neither: no filtering.
  """
  video_scores_C = np.asarray(video_scores_C)
  kept = np.where(video_scores_C >= CLASS_THRESHOLD)[0]
  if len(kept) == 0:
    kept = np.array([np.argmax(video_scores_C)])
  cas_kept = np.asarray(cas_TxC)[:, kept]
  num_t = cas_kept.shape[0]
  cas_kept = np.reshape(cas_kept, (num_t, -1, 1))
  attention = np.reshape(np.asarray(actionness_T)[:, None], (num_t, -1, 1))

  by_class = {}
  for thr in ACT_THRESHOLDS:
    cas_now = cas_kept.copy()
    attention_now = attention.copy()
    positions = []
    for _ in range(len(kept)):
      positions.append(np.where(attention_now[:, 0, 0] > thr))
    for found in oic_proposals(positions, cas_now, video_scores_C, kept):
      class_id = found[0][0]
      if class_id not in by_class:
        by_class[class_id] = []
      by_class[class_id] += found

  final = [soft_nms(dets) for dets in by_class.values()]
  rows = []
  for dets in final:
    for c, score, t_start, t_end in dets:
      rows.append([t_start, t_end, score, c])
  rows = np.array(rows, dtype=np.float64).reshape(-1, 4)
  if ambiguous_lines is None and ambiguous_path is not None:
    ambiguous_lines = read_ambiguous_lines(ambiguous_path)
  if ambiguous_lines:
    rows = filter_ambiguous(rows, video_name, ambiguous_lines)
  return rows


def proposals_table(rows_by_video):
  """{video: [N, 4] rows} -> prediction table (video, label, score, start, end), snippets."""
  cols = {"video": [], "label": [], "score": [], "start": [], "end": []}
  for name, rows in rows_by_video.items():
    for t_start, t_end, score, c in rows.tolist():
      cols["video"].append(name)
      cols["start"].append(t_start)
      cols["end"].append(t_end)
      cols["score"].append(score)
      cols["label"].append(int(c))
  return {"video": np.array(cols["video"], dtype=object),
          "label": np.array(cols["label"], np.int64), "score": np.array(cols["score"]),
          "start": np.array(cols["start"]), "end": np.array(cols["end"])}


def ground_truth_in_snippets(gt):
  """Ground-truth table in seconds -> the same in snippets, rounded as the reference does."""
  out = dict(gt)
  out["start"] = np.array([round(float(s) * SNIPPETS_PER_SECOND) for s in gt["start"]], float)
  out["end"] = np.array([round(float(e) * SNIPPETS_PER_SECOND) for e in gt["end"]], float)
  return out


def detection_map_loop(gt_seconds, rows_by_video, tiou_thresholds, num_classes):
  """The family's mAP: the official loop on snippet units -> (map_K, ap_KxC)."""
  from eval_speed import naive_detection_ap  # pylint: disable=import-outside-toplevel
  ap_KxC = naive_detection_ap(ground_truth_in_snippets(gt_seconds), proposals_table(rows_by_video),
                              tiou_thresholds, num_classes)
  with np.errstate(invalid="ignore"):
    return np.nanmean(ap_KxC, axis=1), ap_KxC
