"""`main.py predict` and the `Predictor` API: pictures, folders, NIfTI volumes, refusals."""
import numpy as np
import pytest
from PIL import Image

from semiseg import cli as main
from semiseg.data import synthetic as synthetic_data
from semiseg.evaluation.predict import Predictor


@pytest.fixture(scope="module")
def run(one_epoch_run):
    # One epoch (conftest): the best model and the latest checkpoint are the same weights.
    return one_epoch_run


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(run)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    # RGB at 40x40 for a grey model trained at 32x32: channels and size both differ from training.
    return synthetic_data.generate_2d(tmp_path_factory.mktemp("pics"), n_cases=3, size=40, seed=5, channels=3) / "images"


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    # vol_001 is stored LPS-like (x and y flipped) with a non-zero origin: orientation matters.
    return synthetic_data.generate_3d(tmp_path_factory.mktemp("vols"), n_cases=2, shape=(40, 36, 10), n_test=0,
                                      spacing=(0.9, 0.7, 3.0)) / "imagesTr"


def _png(path):
    return np.asarray(Image.open(path))


def test_predict_png_writes_binary_mask_of_input_size(run, predictor, pictures, tmp_path):
    src = pictures / "case_0000.png"
    out = tmp_path / "mask.png"
    assert main.main(["predict", str(run), str(src), str(out), "--save-probabilities", "--no-progress"]) == 0
    mask = _png(out)
    assert mask.shape == (40, 40) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    prob = np.load(tmp_path / "mask_prob.npy")
    assert prob.shape == (40, 40) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    np.testing.assert_array_equal(mask == 255, prob >= 0.5)
    np.testing.assert_allclose(prob, predictor.predict_file(src), atol=1e-6)


def test_threshold_changes_the_mask(run, predictor, pictures, tmp_path):
    src = pictures / "case_0001.png"
    prob = predictor.predict_file(src)
    t = float(np.median(prob))          # a threshold that splits this image's pixels
    assert main.main(["predict", str(run), str(src), str(tmp_path / "m.png"), "--threshold", str(t),
                      "--no-progress"]) == 0
    np.testing.assert_array_equal(_png(tmp_path / "m.png") == 255, prob >= t)


def test_predict_folder_into_existing_empty_folder(run, pictures, tmp_path):
    out = tmp_path / "masks"
    out.mkdir()
    assert main.main(["predict", str(run), str(pictures), str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case_0000.png", "case_0001.png", "case_0002.png"]
    for path in out.iterdir():
        assert _png(path).shape == (40, 40) and set(np.unique(_png(path))) <= {0, 255}


def test_existing_output_is_refused_and_untouched(run, pictures, tmp_path, capsys):
    src = pictures / "case_0000.png"
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep me")
    assert main.main(["predict", str(run), str(src), str(taken), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and taken.read_bytes() == b"keep me"
    # A folder whose files would collide: nothing is written, not even the files that are free.
    out = tmp_path / "partly"
    out.mkdir()
    (out / "case_0002.png").write_bytes(b"old")
    assert main.main(["predict", str(run), str(pictures), str(out), "--no-progress"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["case_0002.png"]
    assert (out / "case_0002.png").read_bytes() == b"old"


def test_bad_inputs_exit_2(run, pictures, tmp_path, capsys):
    assert main.main(["predict", str(tmp_path / "no_run"), str(pictures), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main.main(["predict", str(run), str(tmp_path / "missing.png"), str(tmp_path / "o.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    assert main.main(["predict", str(run), str(broken), str(tmp_path / "o.png"), "--no-progress"]) == 2
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    assert main.main(["predict", str(run), str(pictures / "case_0000.png"), str(tmp_path / "o.jpg")]) == 2
    assert "o.jpg" in capsys.readouterr().err


def test_predictor_on_arrays_of_several_shapes(predictor):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (50, 30), dtype=np.uint8)
    prob = predictor.predict(grey)
    assert prob.shape == (50, 30) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    # uint8 is read as /255, and [H,W] is the same image as [H,W,1].
    np.testing.assert_allclose(predictor.predict(grey.astype(np.float32) / 255), prob, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(grey[..., None]), prob, atol=1e-6)
    rgb = rng.random((20, 24, 3)).astype(np.float32)
    assert predictor.predict(rgb).shape == (20, 24)
    batch = rng.random((3, 32, 32, 1)).astype(np.float32)
    probs = predictor.predict(batch)
    assert probs.shape == (3, 32, 32)
    np.testing.assert_allclose(probs[1], predictor.predict(batch[1]), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictor.predict(grey.astype(np.float32))          # 0..255 floats: not what training saw
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(np.zeros((4, 32, 32)))             # a grey batch needs a channel axis


def test_predict_volume_keeps_affine_header_and_shape(run, predictor, volume_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("semiseg.data.volumes")
    src = volume_dir / "vol_001.nii.gz"
    out = tmp_path / "vol_001_mask.nii.gz"
    assert main.main(["predict", str(run), str(src), str(out), "--save-probabilities", "--no-progress"]) == 0
    image, mask_img = nib.load(str(src)), nib.load(str(out))
    assert (np.diag(image.affine)[:3] < 0).any()          # stored with flipped axes
    np.testing.assert_allclose(mask_img.affine, image.affine)
    assert mask_img.shape == image.shape == (40, 36, 10)
    assert mask_img.header.get_zooms() == image.header.get_zooms()
    assert mask_img.get_data_dtype() == np.uint8
    mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    prob_img = nib.load(str(tmp_path / "vol_001_mask_prob.nii.gz"))
    assert prob_img.get_data_dtype() == np.float32 and prob_img.shape == image.shape
    np.testing.assert_allclose(prob_img.affine, image.affine)
    np.testing.assert_array_equal(mask, (prob_img.get_fdata() >= 0.5).astype(np.uint8))
    api_mask, affine = predictor.predict_volume(src)
    np.testing.assert_array_equal(api_mask, mask)
    np.testing.assert_allclose(affine, image.affine)


def test_volume_slices_return_to_their_voxels(predictor, tmp_path):
    """With the network replaced by 'probability = the normalised input' and in-plane size equal
    to image_size (no resizing), the mask must be the thresholded CT window voxel for voxel in the
    file's own (flipped) order: any slip in reorientation or stacking would show."""
    nib = pytest.importorskip("nibabel")
    volumes = pytest.importorskip("semiseg.data.volumes")
    vols = synthetic_data.generate_3d(tmp_path / "v", n_cases=3, shape=(32, 32, 9), n_test=0) / "imagesTr"
    identity = Predictor.__new__(Predictor)
    identity.__dict__.update(predictor.__dict__)
    identity._predict = lambda images: images[..., 0]
    for src in sorted(vols.iterdir()):
        hu = nib.load(str(src)).get_fdata()
        expected = volumes.normalise(hu[..., None], "ct", predictor.cfg.data.ct_window)[0][..., 0] >= 0.5
        mask, _ = identity.predict_volume(src)
        assert 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(mask, expected.astype(np.uint8))


def test_predict_folder_of_volumes(run, volume_dir, tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("semiseg.data.volumes")
    out = tmp_path / "masks"
    assert main.main(["predict", str(run), str(volume_dir), str(out), "--tta", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vol_000.nii.gz", "vol_001.nii.gz"]
    for name in ("vol_000.nii.gz", "vol_001.nii.gz"):
        np.testing.assert_allclose(nib.load(str(out / name)).affine, nib.load(str(volume_dir / name)).affine)


def test_uncertainty_on_a_run_without_mc_teacher_is_refused_before_writing(run, pictures, tmp_path):
    out = tmp_path / "mask.png"
    assert main.main(["predict", str(run), str(pictures / "case_0000.png"), str(out), "--uncertainty",
                      "--no-progress"]) == 2
    assert not out.exists() and not (tmp_path / "mask_uncertainty.npy").exists()
