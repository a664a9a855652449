"""Tests of the embedded synthetic data set: determinism, the 2D set's family shares and visible
masks, NIfTI geometry, and the cache folder's atomic generate-once behaviour.

    python -m pytest tests/test_synthetic_data.py -q
"""

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from semiseg.data import synthetic as synthetic_data  # noqa: E402
from semiseg.data.synthetic import (ARTEFACT_RATES, DEFAULT_DIFFICULTY, FAMILY_SHARES, INDEX_FILE,  # noqa: E402
                                    ensure_synthetic, family_shares, generate_2d, generate_3d)


def file_hashes(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_pairs(folder):
    images = sorted((Path(folder) / "images").glob("*.png"))
    pairs = []
    for image_path in images:
        mask_path = Path(folder) / "masks" / f"{image_path.stem}_segmentation.png"
        pairs.append((np.array(Image.open(image_path)), np.array(Image.open(mask_path))))
    return pairs


@pytest.fixture(scope="module")
def set_2d(tmp_path_factory):
    return generate_2d(tmp_path_factory.mktemp("s2d"), n_cases=40, size=64, seed=5)


def test_2d_same_seed_same_bytes_and_other_seed_differs(tmp_path, set_2d):
    again = generate_2d(tmp_path / "again", n_cases=40, size=64, seed=5)
    assert file_hashes(again) == file_hashes(set_2d)
    other = file_hashes(generate_2d(tmp_path / "other", n_cases=40, size=64, seed=6))
    reference = file_hashes(set_2d)
    differing = [name for name in reference if name.startswith("images") and other[name] != reference[name]]
    assert len(differing) == 40


def test_2d_cases_do_not_depend_on_n_cases(tmp_path, set_2d):
    few = generate_2d(tmp_path / "few", n_cases=3, size=64, seed=5)
    prefix = {name: digest for name, digest in file_hashes(few).items() if name != INDEX_FILE}
    full = file_hashes(set_2d)
    assert prefix and all(full[name] == digest for name, digest in prefix.items())
    few_cases = json.loads((few / INDEX_FILE).read_text())["cases"]
    full_cases = json.loads((set_2d / INDEX_FILE).read_text())["cases"]
    assert few_cases == {name: full_cases[name] for name in few_cases}


def test_2d_layout_pairs_and_binary_masks(set_2d):
    images = sorted(p.name for p in (set_2d / "images").iterdir())
    masks = sorted(p.name for p in (set_2d / "masks").iterdir())
    assert images == [f"case_{i:04d}.png" for i in range(40)]
    assert masks == [name.replace(".png", "_segmentation.png") for name in images]
    pairs = load_pairs(set_2d)
    for image, mask in pairs:
        assert image.shape == (64, 64) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    fractions = np.array([(mask > 0).mean() for _, mask in pairs])
    assert fractions.min() > 0.008  # every case has a lesion (the small family: 1-3%), none a speck
    assert fractions.max() > 5 * fractions.min()
    # Lesions are not all the same size: a real spread between the quartiles (areas drawn
    # uniformly over 5-32% of the frame, plus small, elongated and giant shapes).
    assert np.quantile(fractions, 0.75) > 1.5 * np.quantile(fractions, 0.25)


@pytest.fixture(scope="module")
def set_400(tmp_path_factory):
    """400 small cases: enough to test shares (binomial sd of a 10% share: 1.5 points)."""
    return generate_2d(tmp_path_factory.mktemp("s400"), n_cases=400, size=40, seed=11)


def test_2d_family_shares_match_the_documented_mix(set_400):
    index = json.loads((set_400 / INDEX_FILE).read_text())
    cases = index["cases"]
    assert len(cases) == 400 and index["generator_version"] == "v2"
    expected_shares, expected_rates = family_shares(DEFAULT_DIFFICULTY)
    assert DEFAULT_DIFFICULTY == 1.5 and index["difficulty"] == 1.5
    assert expected_shares["shape"]["giant"] == pytest.approx(1.5 * FAMILY_SHARES["shape"]["giant"])
    for factor, shares in expected_shares.items():
        assert index["shares"][factor] == pytest.approx(shares)
        for value, share in shares.items():
            observed = np.mean([case[factor] == value for case in cases.values()])
            assert abs(observed - share) < 0.05, (factor, value, observed, share)
    for artefact, rate in expected_rates.items():
        observed = np.mean([artefact in case["artefacts"] for case in cases.values()])
        assert abs(observed - rate) < 0.05, (artefact, observed, rate)
    # Many families, each in a minority of cases: a 28-image labelled subset misses some of them.
    values = [share for shares in expected_shares.values() for share in shares.values()]
    assert len(values) >= 20 and sum(0.05 <= share <= 0.2 for share in values) >= 15


def test_2d_masks_are_the_visible_connected_lesion(set_400):
    """Per case: the grey levels just inside the mask border differ from the level just outside it
    by more than 6% in every case and 10% in 99% of cases (medians; the mask is where the lesion is
    seen, not a blurred guess; the lowest cases are tiny lesions crossed by hairs), and the mask is one
    solid piece per recorded lesion (no holes, no specks)."""
    pairs = [(image.astype(np.float64), mask > 0) for image, mask in load_pairs(set_400)]
    differences = []
    for image, mask in pairs:
        inside = mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=1)
        outside = ndimage.binary_dilation(mask, iterations=2) & ~mask
        # Per inner-band pixel against the outside's median: two-tone lesions differ both ways.
        outer = np.median(image[outside])
        differences.append(np.median(np.abs(image[inside] - outer)) / outer)
    assert min(differences) > 0.06 and np.mean(np.array(differences) > 0.1) >= 0.99, sorted(differences)[:5]
    cases = json.loads((set_400 / INDEX_FILE).read_text())["cases"]
    for (image, mask), (name, case) in zip(pairs, sorted(cases.items())):
        pieces, count = ndimage.label(mask)
        assert count == case["lesion_pieces"] and (count == 1 or case["shape"] == "satellite"), name
        assert np.array_equal(ndimage.binary_fill_holes(mask), mask), name
        assert np.bincount(pieces.ravel())[1:].min() >= 5, name
    satellites = [case["lesion_pieces"] for case in cases.values() if case["shape"] == "satellite"]
    assert np.mean(np.array(satellites) > 1) > 0.6  # most satellite cases keep their small lesions


def test_2d_no_single_grey_threshold_segments_the_set(set_400):
    """Bright and dark lesions, dark skin, shadows and rims: no global threshold works."""
    pairs = [(ndimage.gaussian_filter(image.astype(np.float64), 1.0), mask > 0) for image, mask in load_pairs(set_400)]
    smoothed = np.stack([image for image, _ in pairs])
    masks = np.stack([mask for _, mask in pairs])
    best_dice = max(2 * (masks & (smoothed < t)).sum() / (masks.sum() + (smoothed < t).sum())
                    for t in range(8, 256, 8))
    assert best_dice < 0.6


def test_2d_difficulty_and_share_overrides(tmp_path):
    def index_of(folder):
        return json.loads((folder / INDEX_FILE).read_text())

    plain = index_of(generate_2d(tmp_path / "plain", n_cases=30, size=32, seed=1, difficulty=0.0))
    assert all(case["shape"] == "oval" and case["pattern"] == "uniform" and case["skin"] == "fair"
               and case["artefacts"] == [] for case in plain["cases"].values())
    heavy = index_of(generate_2d(tmp_path / "heavy", n_cases=30, size=32, seed=1, difficulty=3.0))
    assert heavy["shares"]["pattern"]["uniform"] == 0.0
    assert heavy["artefact_rates"]["hair"] == pytest.approx(min(1.0, 3 * ARTEFACT_RATES["hair"]))
    assert sum(heavy["shares"]["pattern"].values()) == pytest.approx(1.0)
    assert not any(case["pattern"] == "uniform" for case in heavy["cases"].values())
    only_pale = index_of(generate_2d(tmp_path / "pale", n_cases=12, size=32, seed=1, family_shares_override={
        "pattern": {name: float(name == "hypopigmented") for name in FAMILY_SHARES["pattern"]}}))
    assert {case["pattern"] for case in only_pale["cases"].values()} == {"hypopigmented"}
    with pytest.raises(ValueError, match="sum to"):
        generate_2d(tmp_path / "bad", n_cases=1, family_shares_override={"pattern": {"ring": 0.5}})
    with pytest.raises(ValueError, match="unknown factor or value"):
        generate_2d(tmp_path / "bad", n_cases=1, family_shares_override={"artefacts": {"tattoo": 0.1}})


def test_2d_rgb_and_gray_agree(tmp_path):
    gray = load_pairs(generate_2d(tmp_path / "gray", n_cases=4, size=48, seed=2, channels=1))
    rgb = load_pairs(generate_2d(tmp_path / "rgb", n_cases=4, size=48, seed=2, channels=3))
    for (gray_image, gray_mask), (rgb_image, rgb_mask) in zip(gray, rgb):
        assert rgb_image.shape == (48, 48, 3)
        np.testing.assert_array_equal(gray_mask, rgb_mask)
        luminance = rgb_image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(luminance - gray_image).max() <= 1.5


def test_2d_bad_channels_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="channels"):
        generate_2d(tmp_path, n_cases=1, channels=2)


@pytest.fixture(scope="module")
def set_3d(tmp_path_factory):
    return generate_3d(tmp_path_factory.mktemp("s3d"), n_cases=3, shape=(40, 36, 16), seed=1,
                       n_test=1, spacing=(0.8, 0.8, 2.5))


def test_3d_dataset_json_and_files(set_3d):
    description = json.loads((set_3d / "dataset.json").read_text())
    assert description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert description["numTraining"] == 3 and description["numTest"] == 1
    assert description["training"][0] == {"image": "./imagesTr/vol_000.nii.gz",
                                          "label": "./labelsTr/vol_000.nii.gz"}
    assert description["test"] == ["./imagesTs/vol_003.nii.gz"]
    for entry in description["training"]:
        assert (set_3d / entry["image"]).is_file() and (set_3d / entry["label"]).is_file()
    assert not (set_3d / "labelsTr" / "vol_003.nii.gz").exists()


def test_3d_geometry_values_and_reorientation(set_3d):
    spine_sides = []
    for index in range(3):
        image = nib.load(set_3d / "imagesTr" / f"vol_{index:03d}.nii.gz")
        label = nib.load(set_3d / "labelsTr" / f"vol_{index:03d}.nii.gz")
        assert image.shape == (40, 36, 16)
        np.testing.assert_allclose(image.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), (0.8, 0.8, 2.5), rtol=1e-6)
        assert np.abs(image.affine[:3, 3]).min() > 1.0  # a scanner origin, not zero
        np.testing.assert_array_equal(label.affine, image.affine)
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        hu = np.asarray(image.dataobj)
        labels = np.asarray(label.dataobj)
        assert set(np.unique(labels)) == {0, 1, 2}
        assert hu.min() <= -900 and hu.max() >= 500  # air and bone
        assert 80 < hu[labels == 1].mean() < 130 and hu[labels == 2].mean() < hu[labels == 1].mean()
        # Reoriented to RAS, the spine (bright) is posterior: low y index, for every volume.
        canonical = nib.as_closest_canonical(image)
        bone_y = np.nonzero(np.asarray(canonical.dataobj) > 500)[1].mean()
        assert bone_y < 36 / 2
        spine_sides.append(np.nonzero(hu > 500)[1].mean() < 36 / 2)
        # The organ occupies only part of the slices.
        canonical_labels = np.asarray(nib.as_closest_canonical(label).dataobj)
        slices_with_organ = (canonical_labels > 0).any(axis=(0, 1))
        assert 0 < slices_with_organ.sum() < slices_with_organ.size
    assert np.diag(nib.load(set_3d / "imagesTr" / "vol_001.nii.gz").affine)[0] < 0
    assert not all(spine_sides)  # in the stored arrays the spine is not always at low y


def test_3d_is_deterministic(tmp_path, set_3d):
    again = generate_3d(tmp_path, n_cases=3, shape=(40, 36, 16), seed=1, n_test=1,
                        spacing=(0.8, 0.8, 2.5))
    assert file_hashes(again) == file_hashes(set_3d)


def test_ensure_reuses_complete_folder(tmp_path):
    first = ensure_synthetic(tmp_path, kind="2d", n_cases=3, size=32, seed=0)
    assert first.parent == tmp_path and first.name.startswith("2d-v2-")
    marker = json.loads((first / "COMPLETE").read_text())
    assert marker["params"]["n_cases"] == 3 and marker["params"]["seed"] == 0
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    again = ensure_synthetic(tmp_path, kind="2d", n_cases=3, size=32, seed=0, channels=1)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    other_seed = ensure_synthetic(tmp_path, kind="2d", n_cases=3, size=32, seed=1)
    assert other_seed != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other_seed.name])


def test_ensure_regenerates_interrupted_folder(tmp_path):
    final = ensure_synthetic(tmp_path, kind="2d", n_cases=2, size=32)
    expected = file_hashes(final)
    (final / "COMPLETE").unlink()
    (final / "images" / "case_0001.png").unlink()  # a killed generation left half a folder
    abandoned = tmp_path / f".{final.name}.tmp-{synthetic_data.socket.gethostname()}-999999999-dead"
    abandoned.mkdir()
    again = ensure_synthetic(tmp_path, kind="2d", n_cases=2, size=32)
    assert again == final and file_hashes(again) == expected
    assert not abandoned.exists()


def test_ensure_race_loser_uses_winner(tmp_path, monkeypatch):
    real_generate = synthetic_data.generate_2d
    calls = []

    @functools.wraps(real_generate)  # keep the real signature: ensure_synthetic hashes by it
    def generate_while_another_process_wins(out_dir, **params):
        calls.append(out_dir)
        if len(calls) == 1:  # the other process finishes first, during our generation
            ensure_synthetic(tmp_path, kind="2d", **params)
        return real_generate(out_dir, **params)

    monkeypatch.setitem(synthetic_data._GENERATORS, "2d", generate_while_another_process_wins)
    final = ensure_synthetic(tmp_path, kind="2d", n_cases=2, size=32)
    assert len(calls) == 2 and (final / "COMPLETE").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # the loser's temp is gone


def test_ensure_3d_and_bad_arguments(tmp_path):
    folder = ensure_synthetic(tmp_path, kind="3d", n_cases=1, n_test=1, shape=(16, 16, 8), seed=2)
    # The 2D set moved to v2; the 3D set kept v1's folder name and bytes (digest made by v1's code).
    assert folder.name.startswith("3d-v1-") and (folder / "dataset.json").is_file()
    assert ensure_synthetic(tmp_path, kind="2d", n_cases=1, size=16).name.startswith("2d-v2-")
    digest = hashlib.sha256()
    for name, path in sorted((str(p.relative_to(folder)), p) for p in folder.rglob("*") if p.is_file()):
        if name != "COMPLETE":
            digest.update(name.encode() + path.read_bytes())
    assert digest.hexdigest() == "f30fd1808d2583c729be98936640dcbedbfeb0f10487e3b590b5925171963776"
    with pytest.raises(TypeError, match="n_volumes"):
        ensure_synthetic(tmp_path, kind="3d", n_volumes=3)
    with pytest.raises(ValueError, match="kind"):
        ensure_synthetic(tmp_path, kind="4d")


def test_command_line(tmp_path):
    synthetic_data.main([str(tmp_path / "cli"), "--n", "3", "--size", "32", "--seed", "4"])
    assert len(list((tmp_path / "cli" / "images").glob("*.png"))) == 3
    synthetic_data.main([str(tmp_path / "plain"), "--n", "2", "--size", "32", "--difficulty", "0"])
    plain = json.loads((tmp_path / "plain" / INDEX_FILE).read_text())
    assert {case["pattern"] for case in plain["cases"].values()} == {"uniform"}
    with pytest.raises(SystemExit) as stopped:
        synthetic_data.main([str(tmp_path / "bad"), "--difficulty", "-1"])
    assert stopped.value.code == 2 and not (tmp_path / "bad").exists()
    synthetic_data.main([str(tmp_path / "cli3d"), "--kind", "3d", "--n", "1"])
    assert json.loads((tmp_path / "cli3d" / "dataset.json").read_text())["numTraining"] == 1
    assert os.path.isfile(tmp_path / "cli3d" / "imagesTs" / "vol_001.nii.gz")
