"""The native-resolution refiner: features, fit, save and load."""

import jax
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from wmh_jax import challenge_metrics
from wmh_jax import refine
from wmh_jax import subjects


def _rc(**kw):
  rc = ml_collections.ConfigDict(dict(
      candidate=0.02, hidden=(8,), num_fits=2, num_steps=150, batch_size=512,
      learning_rate=1e-2, thresholds=(0.3, 0.4, 0.5, 0.6)))
  rc.update(kw)
  return rc


def _case(seed, shape=(48, 48, 12), grid=(12, 12, 6)):
  """A scan whose lesions are bright voxels, and the probability a grid model
  would give: the true lesion fraction on a coarse grid, resized back (blurred
  and blocky, so thresholding it misses the lesions' shapes)."""
  rng = np.random.default_rng(seed)
  labels = np.zeros(shape, np.uint8)
  for _ in range(6):
    c = rng.integers(4, np.array(shape) - 4)
    r = rng.integers(1, 4, 3)
    labels[tuple(slice(ci - ri, ci + ri) for ci, ri in zip(c, r))] = 1
  labels[rng.integers(0, shape[0], 20), rng.integers(0, shape[1], 20),
         rng.integers(0, shape[2], 20)] = 2
  image = rng.normal(0.0, 0.3, shape) + np.where(labels == 1, 2.5, 0.0)
  frac = subjects.lesion_fraction(labels, grid)
  prob = np.clip(subjects.resize_back(ndimage.gaussian_filter(frac, 0.7), shape), 0, 1)
  prob = np.clip(prob * 2.0, 0, 1)   # a grid model unsure of the edges
  return prob.astype(np.float32), image.astype(np.float32), (1.0, 1.0, 2.0), labels


def _dice(labels, mask):
  return challenge_metrics.dice(*challenge_metrics.masked_pair(labels, mask))


def test_features_decide_the_candidates_and_set_the_lesion_reference():
  prob, image, spacing, _ = _case(0)
  cand, f = refine.features(prob, image, spacing, candidate=0.05)
  assert f.shape == (int((prob >= 0.05).sum()), len(refine.FEATURES))
  np.testing.assert_array_equal(cand, prob >= 0.05)
  np.testing.assert_allclose(f[:, refine.FEATURES.index('flair')], image[cand])
  ref = np.median(image[prob >= refine.SURE])
  np.testing.assert_allclose(f[:, refine.FEATURES.index('lesion_reference')], ref,
                             rtol=1e-6)
  cand, f = refine.features(np.zeros_like(prob), image, spacing, candidate=0.05)
  assert not cand.any() and f.shape == (0, len(refine.FEATURES))


def test_the_logit_feature_tells_apart_candidates_below_1e_4():
  """The U-Net's logit is clipped at 1e-4, or at a positive candidate level
  below it: a refiner that decides voxels of 1e-6 sees 1e-6 and 1e-5 apart;
  at candidate 0 a probability of 0 still gives a finite logit."""
  _, image, spacing, _ = _case(0)
  prob = np.full(image.shape, 1e-7, np.float32)
  prob[:8] = 1e-6
  prob[8:16] = 1e-5
  prob[16:24] = 3e-4
  prob[24:26] = 0.9   # sure voxels: the lesion reference
  logit = refine.FEATURES.index('unet_logit')
  cand, f = refine.features(prob, image, spacing, candidate=1e-6)
  assert cand.sum() == int((prob >= 1e-6).sum())
  got = dict(zip(np.round(prob[cand], 8), f[:, logit]))
  for p in (1e-6, 1e-5, 3e-4):
    np.testing.assert_allclose(got[np.float32(round(p, 8))], np.log(p / (1 - p)),
                               rtol=1e-4)
  # candidate 0 (every voxel decided): probability 0 is clipped at 1e-4 as
  # before, never an infinite logit.
  prob[26:28] = 0.0
  cand, f = refine.features(prob, image, spacing, candidate=0.0)
  assert cand.all() and np.isfinite(f).all()
  np.testing.assert_allclose(f[:, logit].min(), np.log(1e-4 / (1 - 1e-4)), rtol=1e-4)


def test_fit_learns_the_lesions_finer_than_the_grid_and_is_reproducible():
  cases = [_case(s) for s in range(3)]
  rc = _rc()
  refiner = refine.fit(cases, rc, seed=0, unet_step=7)
  assert np.isclose(rc.thresholds, refiner['threshold']).sum() == 1
  assert int(refiner['unet_step']) == 7
  prob, image, spacing, labels = _case(10)   # not fitted on
  refined = refine.refine(refiner, prob, image, spacing, rc.candidate)
  before = max(_dice(labels, prob >= t) for t in rc.thresholds)
  after = _dice(labels, refined >= refiner['threshold'])
  assert after > before + 0.1, (before, after)
  # Outside the candidates the grid model's probability is kept.
  outside = prob < rc.candidate
  np.testing.assert_array_equal(refined[outside], prob[outside])
  # Its probability is the mean of its MLPs', which differ (seeds).
  _, f = refine.features(prob, image, spacing, rc.candidate)
  singles = [refine.voxel_probability({**refiner, 'params': {k: p}}, f)
             for k, p in refiner['params'].items()]
  assert sorted(refiner['params']) == ['fit_0', 'fit_1']
  assert np.abs(singles[0] - singles[1]).max() > 1e-3
  np.testing.assert_allclose(refine.voxel_probability(refiner, f),
                             np.mean(singles, 0), rtol=1e-6, atol=1e-7)
  again = refine.fit(cases, rc, seed=0, unet_step=7)
  for a, b in zip(jax.tree.leaves(refiner), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def _specks(case, seed, n=40):
  """``case`` with ``n`` false one-voxel 'lesions' away from the true ones:
  as bright in the FLAIR and as sure in the U-Net's probability."""
  prob, image, spacing, labels = (np.array(a) if isinstance(a, np.ndarray) else a
                                  for a in case)
  rng = np.random.default_rng(seed)
  far = ~ndimage.binary_dilation(labels > 0, iterations=3)
  idx = rng.choice(np.flatnonzero(far), n, replace=False)
  image.flat[idx] = 2.5 + rng.normal(0.0, 0.3, n)
  prob.flat[idx] = 0.9
  return prob, image, spacing, labels


def test_fit_drops_specks_when_the_fitting_subjects_ask_for_it():
  clean = [_case(s) for s in range(3)]
  speckled = [_specks(c, s) for s, c in enumerate(clean)]
  rc = _rc(min_lesion_mm3=(0.0, 10.0))
  refiner = refine.fit(speckled, rc, seed=0, unet_step=1)
  assert float(refiner['min_lesion_mm3']) == 10.0   # a speck is 2 mm^3, a lesion >= 16
  # On the subjects it was fitted on, the refined masks keep specks, and
  # dropping them lifts the lesion F1 (Dice hardly moves).
  gains = []
  for prob, image, spacing, labels in speckled:
    refined = refine.refine(refiner, prob, image, spacing, rc.candidate) >= refiner['threshold']
    truth, _ = challenge_metrics.masked_pair(labels, refined)
    kept = challenge_metrics.drop_small_lesions(refined, spacing, 10.0)
    f1 = [challenge_metrics.lesion_detection(truth, m)[1] for m in (refined, kept)]
    dice = [challenge_metrics.dice(truth, m) for m in (refined, kept)]
    assert f1[1] >= f1[0] and abs(dice[1] - dice[0]) < 0.01, (f1, dice)
    gains.append(f1[1] - f1[0])
  assert sum(gains) > 0.05, gains
  # An impossible size drops every lesion: never chosen. Without the key
  # (a config before it), nothing is dropped.
  refiner = refine.fit(speckled, _rc(min_lesion_mm3=(0.0, 1e12)), seed=0, unet_step=1)
  assert float(refiner['min_lesion_mm3']) == 0.0
  assert float(refine.fit(speckled, _rc(), seed=0, unet_step=1)['min_lesion_mm3']) == 0.0
  assert refine.min_lesion_of({k: v for k, v in refiner.items()
                               if k != 'min_lesion_mm3'}) == 0.0
  assert refine.min_lesion_of(None) == 0.0


def test_fit_drops_specks_by_their_area_on_a_slice_at_the_volume_it_picked():
  # The cases' pixels are 1 mm^2 on 2 mm slices: a speck shows 1 mm^2, every
  # true lesion at least 2 x 2 voxels (4 mm^2) on its largest slice.
  speckled = [_specks(_case(s), s) for s in range(3)]
  refiner = refine.fit(speckled, _rc(min_lesion_mm2=(0.0, 2.0)), seed=0, unet_step=1)
  assert float(refiner['min_lesion_mm3']) == 0.0 and refine.min_area_of(refiner) == 2.0
  prob, image, spacing, labels = speckled[0]
  seg = refine.refine(refiner, prob, image, spacing, 0.02) >= refiner['threshold']
  kept = challenge_metrics.drop_small_lesions(seg, spacing, 0.0, 2.0)
  truth, _ = challenge_metrics.masked_pair(labels, seg)
  f1 = [challenge_metrics.lesion_detection(truth, m)[1] for m in (seg, kept)]
  assert f1[1] > f1[0], f1
  # An area no lesion has is never chosen; without the key (a config or a
  # refiner before it) no lesion is dropped by area.
  assert refine.min_area_of(refine.fit(speckled, _rc(min_lesion_mm2=(0.0, 1e12)),
                                       seed=0, unet_step=1)) == 0.0
  assert refine.min_area_of(refine.fit(speckled, _rc(), seed=0, unet_step=1)) == 0.0
  assert refine.min_area_of({k: v for k, v in refiner.items()
                             if k != 'min_lesion_mm2'}) == 0.0
  assert refine.min_area_of(None) == 0.0


def test_pick_takes_the_highest_within_one_standard_error_of_the_best():
  # Per-subject Dice by threshold: 0.3 best on average; 0.4 below it by less
  # than the spread of the paired differences; 0.5 below it on every subject.
  per = {0.3: np.array([0.70, 0.60, 0.50, 0.80]),
         0.4: np.array([0.72, 0.55, 0.49, 0.80]),    # mean -0.01, differences +-0.03
         0.5: np.array([0.60, 0.50, 0.40, 0.70])}    # -0.10 on each: no error at all
  assert refine.pick(per, 'best') == 0.3
  assert refine.pick(per, 'one_se') == 0.4
  # The same means with identical differences on every subject: no error, the best.
  steady = {0.3: per[0.3], 0.4: per[0.3] - 0.01}
  assert refine.pick(steady, 'one_se') == 0.3
  # One subject: no error to estimate, the best. A subject without truth or
  # prediction (NaN) is left out of the pairs.
  assert refine.pick({t: d[:1] for t, d in per.items()}, 'one_se') == 0.4
  assert refine.pick({t: d[1:2] for t, d in per.items()}, 'one_se') == 0.3
  with_nan = {t: np.append(d, np.nan) for t, d in per.items()}
  assert refine.pick(with_nan, 'one_se') == 0.4
  # A subject with a Dice at 0.3 only: out of the paired difference (0.01, within
  # its error), though it lifts 0.3's own mean 0.06 above 0.4's.
  uneven = {0.3: np.append(per[0.3], 0.9), 0.4: np.append(per[0.4], np.nan)}
  assert refine.pick(uneven, 'best') == 0.3
  assert refine.pick(uneven, 'one_se') == 0.4
  # The rule a config asks for; one written before the key keeps the best.
  assert refine.threshold_rule(_rc()) == 'best'
  assert refine.threshold_rule(_rc(threshold_rule='one_se')) == 'one_se'
  with pytest.raises(ValueError, match="refine.threshold_rule: 'nope' is not one of"):
    refine.threshold_rule(_rc(threshold_rule='nope'))
  assert refine.min_lesion_rule(_rc(threshold_rule='one_se')) == 'best'
  assert refine.min_lesion_rule(_rc(min_lesion_rule='one_se')) == 'one_se'
  with pytest.raises(ValueError, match="refine.min_lesion_rule: 'x' is not one of"):
    refine.min_lesion_rule(_rc(min_lesion_rule='x'))


def test_fit_keeps_the_threshold_its_rule_picks_with_the_same_mlps():
  cases = [_case(s) for s in range(3)]
  grid = tuple(round(0.2 + 0.05 * i, 2) for i in range(11))
  best = refine.fit(cases, _rc(thresholds=grid), seed=0, unet_step=1)
  one_se = refine.fit(cases, _rc(thresholds=grid, threshold_rule='one_se'),
                      seed=0, unet_step=1)
  for a, b in zip(jax.tree_util.tree_leaves(best['params']),
                  jax.tree_util.tree_leaves(one_se['params'])):
    np.testing.assert_array_equal(a, b)
  # What each rule gives on the fitted probabilities of the fitting subjects.
  per = {}
  for t in grid:
    per[t] = np.array([_dice(labels, refine.refine(best, prob, image, spacing, 0.02) >= t)
                       for prob, image, spacing, labels in cases])
  assert float(best['threshold']) == pytest.approx(refine.pick(per, 'best'))
  assert float(one_se['threshold']) == pytest.approx(refine.pick(per, 'one_se'))
  # On these subjects the two rules differ: fit applies the one asked for.
  assert float(one_se['threshold']) > float(best['threshold'])


def test_fit_keeps_the_smallest_lesion_its_rule_picks():
  # Specks (2 mm^3) and true lesions from 16 mm^3: 10 and 12 mm^3 drop the same
  # specks, 40 also some true lesions.
  cases = [_specks(_case(s), s) for s in range(3)]
  sizes = (0.0, 10.0, 12.0, 40.0)
  fits = {rule: refine.fit(cases, _rc(min_lesion_mm3=sizes, min_lesion_rule=rule),
                           seed=0, unet_step=1) for rule in ('best', 'one_se')}
  # The mean of Dice and lesion F1 of each size on the fitting subjects, at the
  # threshold both kept (the MLPs and the threshold do not depend on the rule).
  assert float(fits['best']['threshold']) == float(fits['one_se']['threshold'])
  per = {v: [] for v in sizes}
  for prob, image, spacing, labels in cases:
    mask = (refine.refine(fits['best'], prob, image, spacing, 0.02)
            >= fits['best']['threshold'])
    for v in sizes:
      truth, pred = challenge_metrics.masked_pair(
          labels, challenge_metrics.drop_small_lesions(mask, spacing, v))
      per[v].append((challenge_metrics.dice(truth, pred)
                     + challenge_metrics.lesion_detection(truth, pred)[1]) / 2)
  per = {v: np.array(d) for v, d in per.items()}
  np.testing.assert_array_equal(per[10.0], per[12.0])
  assert per[0.0].mean() < per[10.0].mean() > per[40.0].mean()
  for rule, fitted in fits.items():
    assert float(fitted['min_lesion_mm3']) == refine.pick(per, rule), rule
  # 'best' keeps the first of the tied best, 10; 'one_se' the largest size it
  # cannot tell from the best: 12 (tied) or 40, never 10.
  assert float(fits['best']['min_lesion_mm3']) == 10.0
  assert float(fits['one_se']['min_lesion_mm3']) in (12.0, 40.0)


def test_subject_shares_deal_the_subjects_round_robin_to_the_mlps():
  owner = np.repeat(np.arange(5), 4)          # 5 subjects, 4 voxels each
  y = np.tile(np.array([0, 1, 0, 0], np.float32), 5)
  rows = refine.subject_shares(owner, y, 5, _rc(num_fits=3, bag_subjects=True))
  assert [sorted(set(owner[r])) for r in rows] == [[0, 3], [1, 4], [2]]
  # Fewer subjects than MLPs: they wrap; without the key (an old config), or
  # off, every MLP takes every voxel.
  rows = refine.subject_shares(owner[:8], y[:8], 2, _rc(num_fits=3, bag_subjects=True))
  assert [sorted(set(owner[r])) for r in rows] == [[0], [1], [0]]
  for rc in (_rc(num_fits=3), _rc(num_fits=3, bag_subjects=False)):
    assert all(len(r) == 20 for r in refine.subject_shares(owner, y, 5, rc))
  # A share without a lesion voxel would teach its MLP nothing: it takes all.
  y[np.isin(owner, (1, 4))] = 0
  rows = refine.subject_shares(owner, y, 5, _rc(num_fits=3, bag_subjects=True))
  assert [len(r) for r in rows] == [8, 20, 4]


def test_bagged_mlps_each_learn_their_own_subjects():
  """Bright lesions in subjects 0 and 2, dark ones in 1 and 3: bagged, MLP 0
  learns bright and MLP 1 dark; not bagged, both learn the mix (they agree on
  the bright lesions; on the dark ones their seeds tell)."""
  cases = []
  for s in range(4):
    prob, image, spacing, labels = _case(s)
    if s % 2:
      image = np.where(labels == 1, image - 5.0, image)   # 2.5 above -> 2.5 below
    cases.append((prob, image.astype(np.float32), spacing, labels))

  def member_gap(bag):
    refiner = refine.fit(cases, _rc(num_steps=300, bag_subjects=bag), 0, 1)
    gaps = []
    for prob, image, spacing, labels in cases[:2]:   # one bright, one dark
      cand, f = refine.features(prob, image, spacing, 0.02)
      lesion = labels[cand] == 1
      p = [refine.voxel_probability({**refiner, 'params': {k: refiner['params'][k]}},
                                    f)[lesion].mean() for k in ('fit_0', 'fit_1')]
      gaps.append(p[0] - p[1])
    return gaps

  bright, dark = member_gap(True)
  assert bright > 0.3 and dark < -0.3, (bright, dark)   # each knows its own
  bright, _ = member_gap(False)          # both fitted on the mix
  assert abs(bright) < 0.1, bright


def test_fit_refuses_subjects_without_candidates():
  prob, image, spacing, labels = _case(0)
  with pytest.raises(refine.NothingToFit, match='no lesion and non-lesion'):
    refine.fit([(np.zeros_like(prob), image, spacing, labels)], _rc(), 0, 1)


def test_save_and_load_give_the_same_refiner(tmp_path):
  cases = [_case(s) for s in range(2)]
  refiner = refine.fit(cases, _rc(num_steps=20), seed=1, unet_step=12)
  path = refine.save(tmp_path, refiner)
  assert path == tmp_path.absolute() / 'refine' / 'step_12' and path.is_dir()
  assert refine.load(tmp_path, 11) is None
  loaded = refine.load(tmp_path, 12)
  prob, image, spacing, _ = cases[0]
  np.testing.assert_array_equal(refine.refine(refiner, prob, image, spacing, 0.05),
                                refine.refine(loaded, prob, image, spacing, 0.05))
  assert float(loaded['threshold']) == float(refiner['threshold'])


def test_the_refiner_keeps_its_candidate_level_and_an_old_one_its_times(tmp_path):
  cases = [_case(s) for s in range(2)]
  refiner = refine.fit(cases, _rc(candidate=0.07, num_steps=20), seed=1, unet_step=3)
  loaded = refine.load(tmp_path, refine.save(tmp_path, refiner).name.split('_')[1])
  assert refine.candidate_of(loaded, default=0.02) == 0.07
  # A Python float: a 0-d float64 array would compare the float32 probability
  # in float64 and move voxels at the edge.
  assert type(refine.candidate_of(loaded, default=0.02)) is float
  # Saved before refiners stored it: fitted at 0.02 whatever the config says now.
  old = {k: v for k, v in loaded.items() if k != 'candidate'}
  assert refine.candidate_of(old, default=0.02) == 0.02
  assert refine.candidate_of(old, default=2e-4) == 0.02
  assert refine.candidate_of(None, default=0.02) == 0.02
  assert refine.candidate_of(None, default=2e-4) == 2e-4


@pytest.mark.parametrize('spacing', [(1.0, 1.0, 2.0), (0.45, 0.45, 3.0),
                                     (0.3, 0.7, 0.45)])
def test_features_smooth_only_near_the_candidates_with_the_same_values(spacing):
  """The 2 and 6 mm means are computed on the candidates' box grown by the
  kernels' reach: bit for bit what smoothing the whole scan gives, for
  candidates inside, at the scan's edge, and with kernels wider than an axis
  (0.45 mm: a 6 mm sd is 13 voxels)."""
  _, image, _, _ = _case(3, shape=(64, 56, 20))
  s = np.asarray(spacing)

  def smoothed(mm, cand):
    return ndimage.gaussian_filter(image, mm / s)[cand]

  for region in [(slice(30, 34), slice(20, 25), slice(8, 11)),   # inside
                 (slice(0, 2), slice(50, 56), slice(18, 20)),    # at the edge
                 (slice(40, 41), slice(5, 6), slice(2, 3))]:     # one voxel
    prob = np.zeros(image.shape, np.float32)
    prob[region] = 0.3
    cand, f = refine.features(prob, image, spacing, candidate=0.05)
    near, background = smoothed(refine.NEAR_MM, cand), smoothed(refine.BACKGROUND_MM, cand)
    np.testing.assert_array_equal(f[:, refine.FEATURES.index('flair_2mm')], near)
    np.testing.assert_array_equal(f[:, refine.FEATURES.index('flair_minus_6mm')],
                                  (image[cand] - background).astype(np.float32))
    np.testing.assert_array_equal(
        f[:, refine.FEATURES.index('flair_2mm_minus_6mm')],
        (near - background).astype(np.float32))


@pytest.mark.parametrize('extra', [7, 0])
def test_voxel_probability_in_padded_blocks_is_the_mlps_mean(extra):
  """Rows go through the MLPs in blocks of refine.ROWS, the last one padded
  (or none, at a multiple of ROWS): every row gets the mean of its MLPs'
  sigmoids, applied to that row's normalised features alone."""
  refiner = refine.fit([_case(s) for s in range(2)], _rc(num_steps=20), seed=0,
                       unet_step=1)
  rng = np.random.default_rng(0)
  f = rng.normal(size=(refine.ROWS + extra, len(refine.FEATURES))).astype(np.float32)
  got = refine.voxel_probability(refiner, f)
  assert got.shape == (len(f),) and got.dtype == np.float32
  x = (f - refiner['mean']) / refiner['std']
  want = np.mean([1 / (1 + np.exp(-_numpy_mlp(p, x.astype(np.float64))))
                  for p in refiner['params'].values()], axis=0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert refine.voxel_probability(refiner, f[:0]).shape == (0,)


def _numpy_mlp(params, x):
  """RefineMLP's logit in numpy (float64): Dense and relu, then Dense."""
  layers = [params[f'Dense_{i}'] for i in range(len(params))]
  for layer in layers[:-1]:
    x = np.maximum(x @ np.asarray(layer['kernel'], np.float64) + layer['bias'], 0.0)
  return (x @ np.asarray(layers[-1]['kernel'], np.float64) + layers[-1]['bias'])[:, 0]


def test_candidate_dice_is_the_dice_of_the_whole_mask():
  """The threshold's Dice from the candidates alone equals the Dice of the
  whole-scan mask: true lesion off the candidates is missed, label 2 is left
  out on and off them."""
  prob, _, _, labels = _case(4)
  cand = prob >= 0.3
  labels.flat[np.flatnonzero(cand & (labels == 0))[::7]] = 2  # other pathology on them
  assert (labels[~cand] == 1).any() and (labels[cand] == 2).any()
  for t in (0.3, 0.5, 0.7):
    mask = cand & (prob >= t)
    want = challenge_metrics.dice(*challenge_metrics.masked_pair(labels, mask))
    assert refine.candidate_dice(labels[cand], prob[cand] >= t,
                                 int((labels == 1).sum())) == want
  nothing = np.zeros_like(labels)
  assert np.isnan(refine.candidate_dice(nothing[cand], prob[cand] >= 2, 0))


def test_a_blended_refiner_weighs_its_own_mlps_against_the_prior():
  """refine.prior_weight w: (1 - w) of the MLPs fitted here plus w of the
  prior's, with the prior's own scaling; the MLPs fitted are those without a
  prior; a fine-tune of a fine-tune keeps the chain; orbax keeps all of it."""
  cases = [_case(0), _case(1)]
  prior = refine.fit([_case(5)], _rc(num_steps=20, hidden=(4,)), seed=3, unet_step=1)
  alone = refine.fit(cases, _rc(num_steps=20), seed=0, unet_step=7)
  blended = refine.fit(cases, _rc(num_steps=20, prior_weight=0.25), seed=0,
                       unet_step=7, prior=prior)
  for a, b in zip(jax.tree.leaves(alone['params']), jax.tree.leaves(blended['params'])):
    np.testing.assert_array_equal(a, b)
  prob, image, spacing, _ = _case(2)
  _, f = refine.features(prob, image, spacing, 0.02)
  want = 0.75 * refine.voxel_probability(alone, f) + 0.25 * refine.voxel_probability(prior, f)
  np.testing.assert_allclose(refine.voxel_probability(blended, f), want, rtol=1e-6,
                             atol=1e-7)
  assert not np.allclose(refine.voxel_probability(blended, f),
                         refine.voxel_probability(alone, f), atol=1e-3)
  # Weight 0 (the default) fits the MLPs alone, prior or not.
  zero = refine.fit(cases, _rc(num_steps=20), seed=0, unet_step=7, prior=prior)
  assert 'prior' not in zero
  np.testing.assert_array_equal(refine.voxel_probability(zero, f),
                                refine.voxel_probability(alone, f))
  # A fine-tune of the fine-tune: its prior is the blend, chain and all.
  again = refine.fit(cases[:1], _rc(num_steps=20, prior_weight=0.5), seed=1,
                     unet_step=9, prior=blended)
  again_alone = refine.fit(cases[:1], _rc(num_steps=20), seed=1, unet_step=9)
  np.testing.assert_allclose(
      refine.voxel_probability(again, f),
      0.5 * refine.voxel_probability(again_alone, f)
      + 0.5 * refine.voxel_probability(blended, f), rtol=1e-6, atol=1e-7)


def test_a_blended_refiner_survives_save_and_load(tmp_path):
  prior = refine.fit([_case(5)], _rc(num_steps=20, hidden=(4,)), seed=3, unet_step=1)
  blended = refine.fit([_case(0)], _rc(num_steps=20, prior_weight=0.5), seed=0,
                       unet_step=4, prior=prior)
  refine.save(tmp_path, blended)
  loaded = refine.load(tmp_path, 4)
  assert float(loaded['prior_weight']) == 0.5
  prob, image, spacing, _ = _case(2)
  np.testing.assert_array_equal(refine.refine(loaded, prob, image, spacing, 0.02),
                                refine.refine(blended, prob, image, spacing, 0.02))


def test_the_threshold_is_picked_on_the_blended_probability():
  """At weight 1 the refined probability is the prior's, and the threshold kept
  is the one that scores best on the fitting cases with it, not with the MLPs
  fitted here."""
  cases = [_case(s) for s in range(3)]
  grid = (0.1, 0.3, 0.5, 0.7, 0.9)
  prior = refine.fit([_case(6)], _rc(num_steps=20, thresholds=grid), seed=3,
                     unet_step=1)
  only = refine.fit(cases, _rc(num_steps=20, thresholds=grid, prior_weight=1.0),
                    seed=0, unet_step=2, prior=prior)
  refined = [refine.refine(prior, p, i, s, 0.02) for p, i, s, _ in cases]
  for q, (p, i, s, _) in zip(refined, cases):
    np.testing.assert_allclose(refine.refine(only, p, i, s, 0.02), q, atol=1e-7)
  per_case = {t: np.array([_dice(l, q >= t) for q, (_, _, _, l) in zip(refined, cases)])
              for t in grid}
  assert float(only['threshold']) == pytest.approx(refine.pick(per_case, 'best'))


def test_a_prior_weight_outside_0_1_or_another_candidate_is_refused():
  prior = refine.fit([_case(5)], _rc(num_steps=20), seed=3, unet_step=1)
  with pytest.raises(ValueError, match=r'refine.prior_weight: 1.5 is not between 0 and 1'):
    refine.fit([_case(0)], _rc(num_steps=20, prior_weight=1.5), 0, 1, prior=prior)
  with pytest.raises(ValueError, match=r'prior_weight=0.5: no prior refiner given'):
    refine.fit([_case(0)], _rc(num_steps=20, prior_weight=0.5), 0, 1)
  with pytest.raises(ValueError, match=r'probability >= 0.02, refine.candidate is 0.05'):
    refine.fit([_case(0)], _rc(num_steps=20, candidate=0.05, prior_weight=0.5), 0, 1,
               prior=prior)
