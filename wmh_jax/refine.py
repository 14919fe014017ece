"""Native-resolution refinement of the U-Net's mask (``config.refine``).

The U-Net works on ``config.data.grid`` (128x128x16 by default: 1.5-4 mm
in-plane and 3-10 mm through-plane on the challenge's scans), so the probability
it gives, resized back to the scan, cannot follow a lesion's edge finer than a
grid voxel: on the synthetic validation subjects an oracle on the grid scores
native Dice ~0.71 (``evaluate``'s ``dice_grid_oracle``, an estimate, not a
bound). The refiner decides
each native voxel again from the U-Net's probability there and the FLAIR around
it, as intensity-driven lesion growing does (LST's LGA, for one), but learnt:
a small per-voxel MLP fitted on training subjects only (``fit``), applied where
the U-Net gives at least ``refine.candidate`` (elsewhere the U-Net's probability
stays). Its features (``FEATURES``) are z-scored FLAIR values at native
resolution, raw and smoothed at 2 and 6 mm, and relative to the lesions the
U-Net is sure of in the same scan.

To steady it (one MLP's result on a faint-lesion subject moved with its seed),
``refine.num_fits`` MLPs are fitted from different seeds and their probabilities
averaged. With ``refine.bag_subjects`` each MLP is fitted on its own share of
the fitting subjects (every ``num_fits``-th): which 12 subjects an MLP sees
moved its real-scan Dice by up to 0.2, and the average of MLPs fitted on
different subjects no longer hangs on one such pick (docs/results.md). The
refined mask then loses its lesions (26-connected, as the challenge counts
them) smaller than a volume chosen at fit time from ``refine.min_lesion_mm3``
(``refine.min_lesion_rule``: by default the largest the fitting subjects
cannot tell from the best): single-voxel specks are most of the false lesions.
Then, by the same rule from ``refine.min_lesion_mm2``, the smallest
cross-section a lesion must show on one of the scan's slices: on 5-8 mm slices
a volume that keeps a 1 mm scan's small lesions keeps specks of 2-3 voxels,
which raters do not mark (docs/results.md, stop 43).
A fine-tune refits the refiner on the user's few scans, where MLPs fitted on
four scans lose on a fifth what they gained on the four (docs/results.md). With
``refine.prior_weight`` w, its probability is ``(1 - w)`` that of the MLPs
fitted here plus ``w`` that of the refiner of the run fine-tuned from (fitted
on its own subjects), and the threshold and smallest lesion are picked on that
blend (:func:`blend`).

A refiner is a plain pytree ``{params: {fit_k: MLP params}, mean, std,
threshold, candidate, min_lesion_mm3, min_lesion_mm2, unet_step}``, with ``prior: {params,
mean, std, unet_step[, prior, prior_weight]}`` and ``prior_weight`` when blended (all it
decided at fit time and all it needs to apply; the MLP widths are read off
their kernels) saved with orbax in ``WORKDIR/refine/step_N``, N the U-Net
checkpoint it was fitted on.
"""

from collections.abc import Sequence
from pathlib import Path
import shutil
import tempfile

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from scipy import ndimage

from wmh_jax import challenge_metrics
from wmh_jax import nifti_io
from wmh_jax import subjects

FEATURES = ('unet_logit', 'flair', 'flair_over_lesion_reference', 'flair_2mm',
            'flair_minus_6mm', 'flair_2mm_minus_6mm', 'lesion_reference')
SURE = 0.5  # U-Net probability of the voxels that set the lesion reference
NEAR_MM, BACKGROUND_MM = 2.0, 6.0  # sd of the features' two smoothings (mm)
TRUNCATE = 4.0  # the smoothing kernels' half-width in sd (scipy's default)
ROWS = 1 << 16  # feature rows an MLP is applied to at once (voxel_probability)
# refine.threshold_rule and refine.min_lesion_rule (:func:`pick`).
RULES = ('best', 'one_se')
# The candidate level of a refiner saved before it stored its own: 0.02, the only
# value until then (the config's is 2e-4 since stop 20).
UNSTORED_CANDIDATE = 0.02


class NothingToFit(ValueError):
  """The U-Net marks no candidate voxel, or only lesion or only background."""


def features(prob: np.ndarray, image: np.ndarray, spacing, candidate: float
             ) -> tuple[np.ndarray, np.ndarray]:
  """``(candidates, F)``: the voxels to decide and their features (n, FEATURES).

  Args:
    prob: the U-Net's lesion probability on the native grid.
    image: the FLAIR on the same grid, z-scored (``subjects.zscore``, in the
      brain when the U-Net gives one).
    spacing: voxel size in mm along each axis.
    candidate: voxels with ``prob >= candidate`` are decided again.
  """
  cand = prob >= candidate
  if not cand.any():
    return cand, np.zeros((0, len(FEATURES)), np.float32)
  sure = prob >= SURE
  ref = float(np.median(image[sure] if sure.any() else image[cand]))
  spacing = np.asarray(spacing, np.float64)
  # Smoothed only within reach of the candidates (scipy's kernel spans
  # TRUNCATE sd each side): the same values at them, bit for bit, for less work.
  reach = np.floor(TRUNCATE * BACKGROUND_MM / spacing + 0.5).astype(int) + 1
  box = challenge_metrics.bounding_box(cand, reach)
  near = ndimage.gaussian_filter(image[box], NEAR_MM / spacing, truncate=TRUNCATE)
  background = ndimage.gaussian_filter(image[box], BACKGROUND_MM / spacing,
                                       truncate=TRUNCATE)
  # Clipped at 1e-4, or at a positive candidate level below it (a refiner with
  # a lower one tells its candidates' logits apart; at 0, a probability of 0
  # must not give an infinite logit).
  lowest = min(1e-4, candidate) if candidate > 0 else 1e-4
  p = np.clip(prob[cand], lowest, 1 - 1e-4)
  z, zn, zb = image[cand], near[cand[box]], background[cand[box]]
  f = np.stack([np.log(p / (1 - p)), z, z / max(ref, 0.3), zn, z - zb, zn - zb,
                np.full_like(z, ref)], -1)
  return cand, f.astype(np.float32)


def native_flair(path, brain: np.ndarray | None = None) -> np.ndarray:
  """The FLAIR at ``path`` on its own grid (RAS), z-scored in ``brain`` (the
  predicted brain mask; the head when None), as predict and evaluate do."""
  return subjects.zscore(nifti_io.load_image(path)[0], path, brain)


class RefineMLP(nn.Module):
  """Per-voxel classifier: normalised features -> lesion logit."""
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(1)(x)[..., 0]


def _model(params) -> RefineMLP:
  """The MLP whose parameters these are (its widths read off the kernels)."""
  n = len(params)
  return RefineMLP(tuple(params[f'Dense_{i}']['kernel'].shape[1]
                         for i in range(n - 1)))


def voxel_probability(refiner, f: np.ndarray) -> np.ndarray:
  """The refiner's lesion probability for feature rows ``f``: the mean over
  its MLPs, and with a ``prior`` (:func:`blend`) ``(1 - w)`` times that plus
  ``w`` (``prior_weight``) times the prior's. The rows go through in blocks of
  ``ROWS`` (the last one padded), so one compiled function serves every scan
  (each scan's own row count compiled anew, ~0.2 s a scan), and a row's
  probability no longer depends on how many rows it came with (with the row
  count, the matrix products' rounding moved by up to 1 ulp)."""
  if not len(f):
    return np.zeros(0, np.float32)
  x = np.asarray((f - refiner['mean']) / refiner['std'], np.float32)
  padded = np.zeros((-(-len(x) // ROWS) * ROWS, x.shape[1]), np.float32)
  padded[:len(x)] = x
  members = refiner['params']
  own = np.mean([np.concatenate([np.asarray(_probability(members[k], block))
                                 for block in np.split(padded, len(padded) // ROWS)]
                                )[:len(x)]
                 for k in sorted(members)], axis=0).astype(np.float32)
  if 'prior' not in refiner:
    return own
  w = np.float32(refiner['prior_weight'])
  return ((1 - w) * own + w * voxel_probability(refiner['prior'], f)).astype(np.float32)


def prior_weight(rc) -> float:
  """``rc.prior_weight`` (0 for a config written before it): the weight of the
  refiner of the run fine-tuned from (``train.init_from``) in the refined
  probability; raises ValueError (one line) outside [0, 1]."""
  w = float(rc.get('prior_weight', 0.0))
  if not 0.0 <= w <= 1.0:
    raise ValueError(f'refine.prior_weight: {w} is not between 0 and 1')
  return w


def check_prior(prior: dict, rc) -> None:
  """Raises ValueError (one line) if ``prior`` decides other voxels than
  ``rc.candidate`` (its MLPs never saw the others' features)."""
  got, want = candidate_of(prior, rc.candidate), float(rc.candidate)
  if got != want:
    raise ValueError(f'refine.prior_weight={prior_weight(rc)}: the prior refiner '
                     f'decides voxels of U-Net probability >= {got:g}, '
                     f'refine.candidate is {want:g} (set it to {got:g})')


def blend(scaled: dict, prior: dict, weight: float) -> dict:
  """``scaled`` (``{params, mean, std}``: MLPs fitted here) with ``prior``'s
  MLPs, feature scaling and own prior (a fine-tune of a fine-tune), if any,
  taking ``weight`` of the probability (:func:`voxel_probability`)."""
  kept = {k: prior[k] for k in ('params', 'mean', 'std', 'prior', 'prior_weight',
                                'unet_step') if k in prior}
  return {**scaled, 'prior': kept, 'prior_weight': np.float64(weight)}


@jax.jit
def _probability(params, x):
  return jax.nn.sigmoid(_model(params).apply({'params': params}, x))


def refine(refiner, prob: np.ndarray, image: np.ndarray, spacing,
           candidate: float) -> np.ndarray:
  """The refined lesion probability on the native grid (threshold it at
  ``refiner['threshold']``); the U-Net's ``prob`` outside the candidates."""
  cand, f = features(prob, image, spacing, candidate)
  out = prob.astype(np.float32, copy=True)
  out[cand] = voxel_probability(refiner, f)
  return out


def min_lesion_of(refiner) -> float:
  """The smallest lesion (mm^3) ``refiner`` keeps: 0 (all) for None or a
  refiner saved before it chose one."""
  if refiner is None or 'min_lesion_mm3' not in refiner:
    return 0.0
  return float(refiner['min_lesion_mm3'])


def min_area_of(refiner) -> float:
  """The smallest cross-section on a slice (mm^2) a lesion ``refiner`` keeps
  needs: 0 (any) for None or a refiner saved before it chose one."""
  if refiner is None or 'min_lesion_mm2' not in refiner:
    return 0.0
  return float(refiner['min_lesion_mm2'])


def fit(cases, rc, seed: int, unet_step: int, prior: dict | None = None) -> dict:
  """Fits a refiner on training ``cases`` and picks its threshold on them
  from their Dice (``rc.threshold_rule``: :func:`pick`), then its smallest
  lesion kept from ``rc.min_lesion_mm3``, from their mean of Dice and lesion F1
  at that threshold (Dice alone hardly sees a speck; ``rc.min_lesion_rule``).
  With ``rc.prior_weight`` above 0 the MLPs fitted here are blended with
  ``prior``'s (:func:`blend`) before the threshold and smallest
  lesion are picked, on the blended probability.

  Args:
    cases: ``(prob, image, spacing, labels)`` per training subject: the U-Net's
      native probability, the z-scored FLAIR, voxel size, native labels (label 2
      is left out of the fit and of the threshold's Dice).
    rc: ``config.refine``.
    seed: the run's seed (initialisation and sampling of voxels).
    unet_step: the U-Net checkpoint the probabilities came from.
    prior: a refiner fitted elsewhere (the run fine-tuned from), with the
      same candidate level as ``rc.candidate``; needed when
      ``rc.prior_weight`` is above 0, unused at 0.

  Raises:
    NothingToFit: no lesion and non-lesion candidate voxels.
    ValueError: ``rc.prior_weight`` outside [0, 1], above 0 without ``prior``,
      or ``prior`` decides other candidates (one line).
  """
  weight = prior_weight(rc)
  if weight and prior is None:
    raise ValueError(f'refine.prior_weight={weight}: no prior refiner given to blend in')
  if weight:
    check_prior(prior, rc)
  xs, ys, cands, owner = [], [], [], []
  for i, (prob, image, spacing, labels) in enumerate(cases):
    cand, f = features(prob, image, spacing, rc.candidate)
    keep = labels[cand] != 2
    xs.append(f[keep])
    ys.append((labels[cand] == 1)[keep])
    owner.append(np.full(int(keep.sum()), i, np.int32))
    cands.append((cand, f))
  x = np.concatenate(xs)
  y = np.concatenate(ys).astype(np.float32)
  if not len(x) or y.min() == y.max():
    raise NothingToFit('refine: the training subjects give no lesion and '
                     'non-lesion candidate voxels to fit on')
  mean, std = x.mean(0), x.std(0) + 1e-6
  xn = jnp.asarray((x - mean) / std)
  shares = subject_shares(np.concatenate(owner), y, len(cases), rc)
  members, losses = {}, []
  for k, rows in enumerate(shares):
    params, loss = _fit_mlp(xn if len(rows) == len(xn) else xn[rows],
                            jnp.asarray(y[rows]), rc,
                            jax.random.fold_in(jax.random.PRNGKey(seed), k))
    members[f'fit_{k}'] = jax.device_get(params)
    losses.append(float(loss))
  scaled = {'params': members, 'mean': mean, 'std': std}
  if weight:
    scaled = blend(scaled, prior, weight)
  fitted = [voxel_probability(scaled, f) for _, f in cands]
  # Scored where a voxel can be predicted or is labelled: the thresholds on the
  # candidates alone, the smallest lesion on each case cut to the box of its
  # candidates and labels. The same Dice and lesions as on the whole scan,
  # without building a whole-scan mask for every threshold.
  on_cand = [(labels[cand], int((labels == 1).sum()))
             for (cand, _), (_, _, _, labels) in zip(cands, cases)]
  per_case = {float(t): np.array([candidate_dice(lc, q >= t, n_true)
                                  for (lc, n_true), q in zip(on_cand, fitted)])
              for t in rc.thresholds}
  scores = {t: float(np.nanmean(d)) for t, d in per_case.items()}
  threshold = pick(per_case, threshold_rule(rc))
  boxed = []
  for (cand, _), q, (_, _, spacing, labels) in zip(cands, fitted, cases):
    box = challenge_metrics.bounding_box(cand | (labels != 0)) or ()  # (): whole scan
    mask = np.zeros(cand[box].shape, bool)
    mask[cand[box]] = q >= threshold
    boxed.append((mask, spacing, labels[box]))
  min_mm3, min_mm2, by_size, by_area = pick_sizes(boxed, rc)
  refiner = {**scaled, 'threshold': np.float32(threshold),
             'candidate': np.float64(rc.candidate),
             'min_lesion_mm3': np.float64(min_mm3),
             'min_lesion_mm2': np.float64(min_mm2),
             'unet_step': np.int32(unet_step)}
  logging.info('refine: %d MLPs fitted on %d voxels of %d subjects (%.1f%% '
               'lesion%s), final BCE %s%s; Dice on them by threshold %s -> %.2f (%s); '
               'mean of Dice and lesion F1 by smallest lesion (mm^3) %s -> %g (%s), '
               'then by its smallest cross-section on a slice (mm^2) %s -> %g',
               rc.num_fits, len(x), len(cases), 100 * float(y.mean()),
               ', each MLP on its own share of them' if bagged(rc) else '',
               ' '.join(f'{l:.4f}' for l in losses),
               f'; blended with the prior refiner at weight {weight:g}' if weight else '',
               {t: round(s, 3) for t, s in scores.items()},
               float(refiner['threshold']), threshold_rule(rc),
               {v: round(float(np.nanmean(s)), 3) for v, s in by_size.items()},
               float(refiner['min_lesion_mm3']), min_lesion_rule(rc),
               {a: round(float(np.nanmean(s)), 3) for a, s in by_area.items()},
               float(refiner['min_lesion_mm2']))
  return refiner


def pick_sizes(boxed, rc) -> tuple[float, float, dict, dict]:
  """``(min_mm3, min_mm2, by_size, by_area)``: the smallest lesion volume kept,
  from ``rc.min_lesion_mm3``, then at that volume the smallest cross-section on
  a slice, from ``rc.min_lesion_mm2``, each by ``rc.min_lesion_rule`` (:func:`pick`)
  on the cases' mean of Dice and lesion F1 (``by_size`` and ``by_area``: those
  per case, by candidate). ``boxed``: ``(mask, spacing, labels)`` of each
  fitting case, its mask thresholded. On thick slices a speck of 2-3 voxels
  passes the volume a 1 mm scan's small lesions need; its area does not."""
  rule = min_lesion_rule(rc)
  by_size = {float(v): _size_scores(boxed, float(v), 0.0)
             for v in rc.get('min_lesion_mm3', (0.0,))}
  min_mm3 = pick(by_size, rule)
  by_area = {float(a): _size_scores(boxed, min_mm3, float(a)) if a > 0
             else by_size[min_mm3] for a in rc.get('min_lesion_mm2', (0.0,))}
  return min_mm3, pick(by_area, rule), by_size, by_area


def _size_scores(boxed, min_mm3: float, min_mm2: float) -> np.ndarray:
  """Per fitting case, the mean of Dice and lesion F1 of its refined mask
  (``boxed``: ``(mask, spacing, labels)`` each) without the lesions
  ``challenge_metrics.drop_small_lesions`` drops at these sizes."""
  both = []
  for mask, spacing, labels in boxed:
    truth, pred = challenge_metrics.masked_pair(
        labels, challenge_metrics.drop_small_lesions(mask, spacing, min_mm3, min_mm2))
    both.append((challenge_metrics.dice(truth, pred)
                 + challenge_metrics.lesion_detection(truth, pred)[1]) / 2)
  return np.array(both)


def candidate_dice(candidate_labels: np.ndarray, decided: np.ndarray,
                   num_true: int) -> float:
  """Dice of a mask that is ``decided`` on the candidate voxels (whose labels
  are ``candidate_labels``) and empty elsewhere, against a scan's labels with
  ``num_true`` voxels of label 1 (label 2 left out, as
  ``challenge_metrics.masked_pair``): the true lesion voxels off the candidates
  count as missed."""
  missed = int(num_true) - int((candidate_labels == 1).sum())
  truth = np.concatenate([candidate_labels == 1, np.ones(missed, bool)])
  pred = np.concatenate([decided & (candidate_labels != 2), np.zeros(missed, bool)])
  return challenge_metrics.dice(truth, pred)


def threshold_rule(rc) -> str:
  """How ``fit`` keeps a threshold: ``rc.threshold_rule``, or ``'best'`` for a
  config written before it (the only rule then)."""
  return _rule(rc, 'threshold_rule')


def min_lesion_rule(rc) -> str:
  """How ``fit`` keeps its smallest lesion: ``rc.min_lesion_rule``, or
  ``'best'`` for a config written before it (the only rule then)."""
  return _rule(rc, 'min_lesion_rule')


def check_rules(rc) -> None:
  """Raises ValueError (one line) if ``rc`` names a rule that is not one of
  :data:`RULES`: before training or a refit, not after the U-Net."""
  threshold_rule(rc)
  min_lesion_rule(rc)


def _rule(rc, key: str) -> str:
  rule = rc.get(key, 'best')
  if rule not in RULES:
    raise ValueError(f'refine.{key}: {rule!r} is not one of {", ".join(RULES)}')
  return rule


def pick(per_case: dict, rule: str) -> float:
  """The value kept from each candidate value's per-subject scores (NaN where
  a subject has none): a threshold from its Dice, a smallest lesion from its
  mean of Dice and lesion F1.

  ``'best'``: the best mean. ``'one_se'``: the highest value whose mean is
  within one standard error of the best's, the error of their paired
  per-subject differences (the one-standard-error rule; the mean difference
  and its error over the subjects with a score at both): where the fitting
  subjects cannot tell two values apart, the one that marks fewer voxels (the
  higher threshold, the larger smallest lesion). With one subject (no error to
  estimate) both rules keep the best.
  """
  means = {t: float(np.nanmean(d)) for t, d in per_case.items()}
  best = max(means, key=means.get)
  if rule == 'best':
    return best
  near = [best]
  for t, d in per_case.items():
    diff = per_case[best] - d
    diff = diff[np.isfinite(diff)]   # the subjects with a score at both
    if len(diff) > 1 and diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
      near.append(t)
  return max(near)


def bagged(rc) -> bool:
  """Whether each MLP is fitted on its own share of the subjects (False for
  a config written before ``refine.bag_subjects``: all on all, as then)."""
  return bool(rc.get('bag_subjects', False))


def subject_shares(owner: np.ndarray, y: np.ndarray, num_cases: int, rc) -> list:
  """The rows (voxels) each of the ``rc.num_fits`` MLPs is fitted on.

  All rows for every MLP, unless ``rc.bag_subjects``: then MLP k takes the
  subjects ``i`` with ``i % m == k % m`` (``m``: ``num_fits``, or the number
  of subjects when fewer), so each share holds subjects from the whole sorted
  list. A share with only lesion or only background voxels takes all rows.

  Args:
    owner: the subject (index into the cases) of each row.
    y: each row's label (1 lesion, 0 not).
    num_cases: how many subjects there are.
    rc: ``config.refine``.
  """
  every = np.arange(len(owner))
  if not bagged(rc):
    return [every] * rc.num_fits
  m = min(rc.num_fits, num_cases)
  shares = []
  for k in range(rc.num_fits):
    rows = np.flatnonzero(owner % m == k % m)
    if not len(rows) or y[rows].min() == y[rows].max():
      logging.warning('refine: MLP %d\'s share of the subjects holds no %s '
                      'voxel; it is fitted on all of them', k,
                      'candidate' if not len(rows) else
                      'background' if y[rows].min() else 'lesion')
      rows = every
    shares.append(rows)
  return shares


def candidate_of(refiner, default: float) -> float:
  """The candidate level ``refiner`` was fitted with: ``UNSTORED_CANDIDATE`` for
  a refiner saved before it stored one, ``default`` (the config's) for None. A
  Python float, as the config's (a 0-d float64 array would compare a float32
  probability in float64)."""
  if refiner is None:
    return float(default)
  return float(refiner['candidate'] if 'candidate' in refiner else UNSTORED_CANDIDATE)


def _fit_mlp(xn, y, rc, key):
  """One MLP fitted by Adam on minibatches of ``(xn, y)`` drawn with ``key``."""
  model = RefineMLP(tuple(rc.hidden))
  init_key, sample_key = jax.random.split(key)
  params = model.init(init_key, xn[:1])['params']
  tx = optax.adam(rc.learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i):
    idx = jax.random.randint(jax.random.fold_in(sample_key, i), (rc.batch_size,),
                             0, xn.shape[0])
    def loss_fn(p):
      logits = model.apply({'params': p}, xn[idx])
      return optax.sigmoid_binary_cross_entropy(logits, y[idx]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  loss = jnp.nan
  for i in range(rc.num_steps):
    params, opt_state, loss = step(params, opt_state, i)
  return params, loss


def path_for(workdir, unet_step: int) -> Path:
  return Path(workdir).absolute() / 'refine' / f'step_{int(unet_step)}'


def save(workdir, refiner) -> Path:
  """Writes the refiner: orbax saves it inside a private folder made by
  ``tempfile.mkdtemp`` (no pre-placed link can redirect orbax's own temporary
  names), renamed into place when complete."""
  path = path_for(workdir, refiner['unet_step'])
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(staging / path.name, refiner)
      ckpt.wait_until_finished()
    (staging / path.name).rename(path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return path


def load(workdir, unet_step: int) -> dict | None:
  """The refiner fitted on U-Net step ``unet_step``, or None if there is none."""
  path = path_for(workdir, unet_step)
  if not path.is_dir():
    return None
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(path)
  return jax.tree.map(np.asarray, tree)
