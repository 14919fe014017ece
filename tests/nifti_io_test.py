import gzip

import nibabel as nib
import numpy as np
import pytest

from wmh_jax import nifti_io


def _lps_oblique_affine():
  c, s = np.cos(0.2), np.sin(0.2)
  rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  a = np.eye(4)
  a[:3, :3] = rot @ np.diag([-0.47, -0.47, 8.0])
  a[:3, 3] = [60, 70, -40]
  return a


def test_canonical_load_and_save_like_round_trip(tmp_path):
  data = np.random.default_rng(0).integers(0, 3, (20, 16, 5)).astype(np.uint8)
  ref = nifti_io.save(tmp_path / 'in.nii.gz', data.astype(np.int16),
                      _lps_oblique_affine(), dtype=np.int16)
  canon = nifti_io.load(ref)
  assert nib.aff2axcodes(canon.affine) == ('R', 'A', 'S')
  out = nifti_io.save_like(tmp_path / 'out.nii.gz', np.asarray(canon.dataobj),
                           ref)
  back = nib.load(str(out))
  assert back.shape == data.shape
  np.testing.assert_allclose(back.affine, _lps_oblique_affine(), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(back.dataobj), data)
  assert back.get_data_dtype() == np.uint8


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(nifti_io.NiftiError, match='no such file'):
    nifti_io.load(tmp_path / 'missing.nii.gz')
  (tmp_path / 'text.nii.gz').write_bytes(gzip.compress(b'not an image'))
  with pytest.raises(nifti_io.NiftiError, match='text.nii.gz'):
    nifti_io.load(tmp_path / 'text.nii.gz')
  nifti_io.save(tmp_path / 'flat.nii.gz', np.zeros((4, 4), np.float32), np.eye(4))
  with pytest.raises(nifti_io.NiftiError, match='3-D'):
    nifti_io.load(tmp_path / 'flat.nii.gz')
  nan = np.ones((4, 4, 4), np.float32)
  nan[1, 1, 1] = np.nan
  nifti_io.save(tmp_path / 'nan.nii.gz', nan, np.eye(4))
  with pytest.raises(nifti_io.NiftiError, match='NaN'):
    nifti_io.load_image(tmp_path / 'nan.nii.gz')
  nifti_io.save(tmp_path / 'lab.nii.gz', np.full((4, 4, 4), 3, np.uint8), np.eye(4))
  with pytest.raises(nifti_io.NiftiError, match='labels'):
    nifti_io.load_labels(tmp_path / 'lab.nii.gz')
  with pytest.raises(nifti_io.NiftiError, match='shape'):
    nifti_io.load_labels(tmp_path / 'lab.nii.gz', like_shape=(4, 4, 5))


def test_four_d_single_volume_accepted(tmp_path):
  nifti_io.save(tmp_path / 'v.nii.gz', np.ones((4, 5, 6, 1), np.float32), np.eye(4))
  assert nifti_io.load(tmp_path / 'v.nii.gz').shape == (4, 5, 6)
  nifti_io.save(tmp_path / 'w.nii.gz', np.ones((4, 5, 6, 2), np.float32), np.eye(4))
  with pytest.raises(nifti_io.NiftiError, match='3-D'):
    nifti_io.load(tmp_path / 'w.nii.gz')


def test_save_refuses_existing_without_overwrite(tmp_path):
  p = nifti_io.save(tmp_path / 'a.nii.gz', np.ones((3, 3, 3), np.float32), np.eye(4))
  with pytest.raises(FileExistsError):
    nifti_io.save(p, np.zeros((3, 3, 3), np.float32), np.eye(4), overwrite=False)
  assert np.asarray(nib.load(str(p)).dataobj).sum() == 27
  assert [f.name for f in tmp_path.iterdir()] == ['a.nii.gz']  # no temp left


def test_predict_mark_tells_predict_outputs_from_scans(tmp_path):
  data = np.zeros((6, 5, 4), np.uint8)
  ref = nifti_io.save(tmp_path / 'scan.nii.gz', data.astype(np.int16), np.eye(4))
  assert not nifti_io.written_by_predict(ref)
  out = nifti_io.save_like(tmp_path / 'scan_wmh.nii.gz', data, ref,
                           descrip=f'{nifti_io.PREDICT_MARK}: lesion mask')
  assert nib.load(str(out)).header['descrip'].item() == b'wmh_jax predict: lesion mask'
  assert nifti_io.written_by_predict(out)
  assert not nifti_io.written_by_predict(nifti_io.save_like(tmp_path / 'b.nii.gz', data,
                                                            ref))
  (tmp_path / 'junk.nii.gz').write_bytes(b'not a nifti')
  assert not nifti_io.written_by_predict(tmp_path / 'junk.nii.gz')
  assert not nifti_io.written_by_predict(tmp_path / 'missing.nii.gz')


TRANSFORM_FIELDS = ('qform_code', 'sform_code', 'quatern_b', 'quatern_c', 'quatern_d',
                    'qoffset_x', 'qoffset_y', 'qoffset_z', 'srow_x', 'srow_y', 'srow_z')


def _header_case(name):
  """A NIfTI header whose transforms a rewrite from its affine would change."""
  hdr = nib.Nifti1Header()
  hdr.set_data_shape((20, 16, 5))
  hdr.set_data_dtype(np.int16)
  hdr.set_zooms((0.9, 0.9, 6.5))
  base = np.diag([0.9, 0.9, 6.5, 1.0])
  base[:3, 3] = [-9, -7, -15]
  c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
  rotated = base.copy()
  rotated[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ base[:3, :3]
  rotated[:3, 3] += 20
  sheared = base.copy()
  sheared[0, 1] = 0.3
  if name == 'sform_only':        # as MS3SEG: sform code 2, qform code 0
    hdr.set_sform(base, code=2)
    hdr.set_qform(None, code=0)
  elif name == 'disagree':        # qform and sform give different places
    hdr.set_qform(rotated, code=1)
    hdr.set_sform(base, code=2)
  elif name == 'qform_only':
    hdr.set_qform(base, code=1)
    hdr.set_sform(None, code=0)
  elif name == 'no_codes':
    hdr.set_qform(None, code=0)
    hdr.set_sform(None, code=0)
  elif name == 'sheared':         # an sform no qform can hold
    hdr.set_sform(sheared, code=1)
    hdr.set_qform(None, code=0)
  return hdr


@pytest.mark.parametrize('name', ['sform_only', 'disagree', 'qform_only', 'no_codes',
                                  'sheared'])
def test_save_like_keeps_the_reference_qform_and_sform_as_they_are(tmp_path, name):
  hdr = _header_case(name)
  data = np.random.default_rng(0).integers(0, 300, (20, 16, 5)).astype(np.int16)
  ref = tmp_path / 'in.nii.gz'
  nib.save(nib.Nifti1Image(data, None, hdr), str(ref))
  stored = nib.load(str(ref)).header
  assert [int(stored['qform_code']), int(stored['sform_code'])] == [
      int(hdr['qform_code']), int(hdr['sform_code'])]   # the case is on file as built
  mask = (np.asarray(nifti_io.load(ref).dataobj) > 150).astype(np.uint8)
  out = nib.load(str(nifti_io.save_like(tmp_path / 'out.nii.gz', mask, ref)))
  for field in TRANSFORM_FIELDS:
    np.testing.assert_array_equal(out.header[field], stored[field], err_msg=field)
  np.testing.assert_array_equal(out.header['pixdim'][1:4], stored['pixdim'][1:4])
  np.testing.assert_array_equal(np.asarray(out.dataobj), (data > 150).astype(np.uint8))


def test_save_refuses_an_affine_its_header_does_not_give(tmp_path):
  hdr = _header_case('sform_only')
  with pytest.raises(ValueError, match="out.nii.gz: the affine given is not the header's own"):
    nifti_io.save(tmp_path / 'out.nii.gz', np.zeros((20, 16, 5), np.uint8), np.eye(4), hdr)
  assert not list(tmp_path.iterdir())
