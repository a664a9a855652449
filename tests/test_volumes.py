"""volumes.py: scaling, reorientation, windowing, label merge, and slices back to the file's voxels."""
import nibabel as nib
import numpy as np
import pytest

from semiseg import config
from semiseg.data import volumes
from semiseg.data.sources import DataError
from data_layouts import write_nifti

PERMUTED = np.array([[0, 0, 2.5, -10], [0.8, 0, 0, 5], [0, -0.9, 0, 20], [0, 0, 0, 1.0]])   # axes permuted + flip
AFFINES = {"identity": np.diag([0.8, 0.9, 2.5, 1.0]), "flipped": np.diag([-0.8, -0.9, 2.5, 1.0]),
           "permuted": PERMUTED}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_slices_restore_to_the_files_voxel_order(tmp_path, name, slice_axis):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)     # every voxel distinct
    path = write_nifti(tmp_path / "v.nii.gz", data, AFFINES[name])
    cfg = config.DataConfig(slice_axis=slice_axis, ct_window=[0.0, float(data.size)])
    image, spacing, meta = volumes.load_volume(path, cfg, "ct")
    canonical = nib.as_closest_canonical(nib.load(str(path)))
    assert image.shape[-1] == 1 and image.shape[0] == canonical.shape[slice_axis]
    restored = volumes.restore_orientation(np.rint(image[..., 0] * data.size), meta)
    np.testing.assert_array_equal(restored, data)
    # Canonical orientation: the slice axis runs along RAS axis `slice_axis` with its spacing.
    zooms = canonical.header.get_zooms()
    assert spacing[2] == pytest.approx(zooms[slice_axis])
    assert sorted(spacing[:2]) == pytest.approx(sorted(z for a, z in enumerate(zooms) if a != slice_axis))


def test_flipped_file_gives_the_same_slices_as_the_ras_file(tmp_path):
    data = np.random.default_rng(0).integers(-500, 500, (6, 5, 4)).astype(np.int16)
    ras = write_nifti(tmp_path / "ras.nii.gz", data, np.diag([1.0, 1.0, 2.0, 1.0]))
    flipped_affine = np.array([[-1.0, 0, 0, 5], [0, -1.0, 0, 4], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    flipped = write_nifti(tmp_path / "lps.nii.gz", data[::-1, ::-1].copy(), flipped_affine)
    cfg = config.DataConfig()
    a, _, _ = volumes.load_volume(ras, cfg, "ct")
    b, _, _ = volumes.load_volume(flipped, cfg, "ct")
    np.testing.assert_array_equal(a, b)


def test_ct_window_and_scaling_slope(tmp_path):
    # Stored values v with slope 2, intercept -1001: HU = 2v - 1001 (get_fdata applies them).
    hu = np.array([-1001, -125, 75, 275, 999], dtype=np.float64)
    stored = ((hu + 1001) / 2).astype(np.int16).reshape(5, 1, 1)
    path = write_nifti(tmp_path / "ct.nii.gz", stored, slope=2.0, inter=-1001.0)
    image, _, meta = volumes.load_volume(path, config.DataConfig(slice_axis=0, ct_window=[-125, 275]), "ct")
    np.testing.assert_allclose(image[:, 0, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert meta["modality"] == "ct" and meta["intensity_range"] == [[-125.0, 275.0]]


def test_mri_percentiles_and_channels_kept(tmp_path):
    rng = np.random.default_rng(1)
    t1 = rng.uniform(0, 100, (8, 8, 5))
    t2 = rng.uniform(1000, 5000, (8, 8, 5))
    path = write_nifti(tmp_path / "mr.nii.gz", np.stack([t1, t2], -1).astype(np.float32))
    image, _, meta = volumes.load_volume(path, config.DataConfig(), "auto")
    assert image.shape == (5, 8, 8, 2) and meta["modality"] == "mri"
    for ch, raw in enumerate((t1, t2)):            # each channel scaled by its own percentiles
        lo, hi = np.percentile(raw, [0.5, 99.5])
        expected = np.clip((np.moveaxis(raw, 2, 0) - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(image[..., ch], expected, atol=1e-5)


def test_label_merge(tmp_path):
    labels = np.array([0, 1, 2, 3], np.uint8).reshape(1, 1, 4)
    path = write_nifti(tmp_path / "l.nii.gz", labels)
    merged, _ = volumes.load_label_volume(path, config.DataConfig(label_set=[1, 2]))
    assert merged[:, 0, 0].tolist() == [0, 1, 1, 0]
    tumour, _ = volumes.load_label_volume(path, config.DataConfig(label_set=[2]))
    assert tumour[:, 0, 0].tolist() == [0, 0, 1, 0]


def test_mask_written_with_the_inputs_affine_and_shape(tmp_path):
    data = np.random.default_rng(2).integers(-300, 300, (7, 6, 5)).astype(np.int16)
    src = write_nifti(tmp_path / "in.nii.gz", data, PERMUTED)
    image, _, meta = volumes.load_volume(src, config.DataConfig(), "ct")
    mask = (image[..., 0] > 0.5).astype(np.uint8)
    volumes.save_mask_nifti(mask, meta, tmp_path / "out.nii.gz")
    out = nib.load(str(tmp_path / "out.nii.gz"))
    ref = nib.load(str(src))
    assert out.shape == ref.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    expected = ((np.clip((data.astype(float) + 125) / 400, 0, 1)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)


def test_wrong_mask_shape_and_bad_files_name_the_file(tmp_path):
    src = write_nifti(tmp_path / "in.nii.gz", np.zeros((4, 4, 3), np.int16))
    _, _, meta = volumes.load_volume(src, config.DataConfig(), "ct")
    with pytest.raises(DataError, match="in.nii.gz.*expected"):
        volumes.restore_orientation(np.zeros((3, 2, 2)), meta)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="junk.nii.gz"):
        volumes.load_volume(tmp_path / "junk.nii.gz", config.DataConfig())
    good = write_nifti(tmp_path / "big.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32))
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.nii.gz.*truncated"):
        volumes.load_volume(truncated, config.DataConfig())
