"""Overlays: which slices are drawn, and what the legend says."""

import matplotlib.image
import numpy as np
import pytest

from wmh_jax import figures


def test_overlay_slices_spread_over_the_brain_and_keep_the_lesion_slices():
  assert figures.overlay_slices(40, 6, (5, 30)) == [5, 10, 15, 20, 25, 30]
  # The slices with the most lesion replace the nearest evenly spaced ones.
  assert figures.overlay_slices(40, 6, (5, 30), keep=(12, 29)) == [5, 12, 15, 20, 25, 29]
  assert figures.overlay_slices(40, 6, (5, 30), keep=(12, 12)) == [5, 12, 15, 20, 25, 30]
  assert figures.overlay_slices(3, 6, (0, 2)) == [0, 1, 2]
  assert figures.overlay_slices(11, 3) == [1, 5, 9]   # no brain: the middle 80 %


@pytest.fixture
def captured(monkeypatch):
  """The figures ``overlay`` draws, kept open instead of saved."""
  figs = []
  monkeypatch.setattr(figures, '_save', lambda fig, path, *dpi: figs.append(fig))
  return figs


def _volumes():
  shape = (24, 24, 20)
  g = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
  brain = ((g[0] - 12) ** 2 + (g[1] - 12) ** 2) / 100 + (g[2] - 10) ** 2 / 36 < 1
  truth = np.zeros(shape, np.uint8)
  truth[10:13, 10:13, 13] = 1
  pred = np.zeros(shape, bool)
  pred[3:5, 3:5, 8] = True   # a false positive on another slice
  image = np.where(brain, 1.0, 0.0) + np.random.default_rng(0).normal(0, .1, shape)
  return image, brain, truth, pred


def test_overlay_draws_the_brain_edge_and_the_lesion_slices(captured):
  image, brain, truth, pred = _volumes()
  figures.overlay('unused.png', image, pred, truth, title='s', brain=brain)
  fig = captured[0]
  titles = [ax.get_title() for ax in fig.axes]
  # 12 asked for over the brain's 11 slices (5-15): all of them, in rows of 6,
  # the 12th panel blank
  assert len(titles) == 12 and titles[-1] == ''
  assert [int(t.split('=')[1]) for t in titles[:-1]] == list(range(5, 16))
  assert fig._suptitle.get_text() == 's  (green: truth, red: prediction, yellow: brain)'


def test_overlay_keeps_the_lesion_slices_when_the_brain_has_more_than_asked_for(captured):
  image, brain, truth, pred = _volumes()
  figures.overlay('unused.png', image, pred, truth, brain=brain, n_slices=6)
  zs = [int(t.split('=')[1]) for t in
        (ax.get_title() for ax in captured[0].axes) if t]
  assert len(zs) == 6 and zs[0] == 5 and zs[-1] == 15   # the brain's z-extent
  assert 13 in zs and 8 in zs     # most true lesion, most predicted lesion


@pytest.mark.parametrize('shape, panel', [((24, 24, 20), 256), ((300, 280, 20), 300),
                                          ((640, 640, 20), 512)])
def test_overlay_panels_have_about_a_pixel_per_voxel(tmp_path, shape, panel):
  """A panel per slice, six to a row, each as many pixels wide as the slice's
  longer side has voxels (at least 256, at most 512)."""
  image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  figures.overlay(tmp_path / 'o.png', image, n_slices=12)
  height, width = matplotlib.image.imread(tmp_path / 'o.png').shape[:2]
  assert width == 6 * panel
  assert 2 * panel < height < 2.3 * panel   # two rows, their titles and the figure's


def test_overlay_legend_lists_only_what_is_drawn(captured):
  image, brain, truth, _ = _volumes()
  figures.overlay('unused.png', image, np.zeros(image.shape, bool), truth, title='s')
  assert captured[0]._suptitle.get_text() == 's  (green: truth)'


def test_overlay_and_contact_sheet_write_pngs(tmp_path):
  image, brain, truth, pred = _volumes()
  figures.overlay(tmp_path / 'o.png', image, pred, truth, brain=brain)
  figures.contact_sheet(tmp_path / 'c.png', [('a', image, truth, brain),
                                             ('b', image, truth)])
  assert (tmp_path / 'o.png').stat().st_size > 1000
  assert (tmp_path / 'c.png').stat().st_size > 1000
  assert not list(tmp_path.glob('.*'))   # no temporary file left behind
