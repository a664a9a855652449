"""Multi-class data: label maps kept as class indices through sources, the slice cache and the
streams, and binary data unchanged bit for bit.

    python -m pytest tests/test_multiclass_data.py -q
"""
import hashlib
import json

import numpy as np
import pytest

from semiseg import config
from semiseg.data import cache as slice_cache
from semiseg.data import loader, sources, volumes


def _fingerprint(cfg) -> dict:
    """Hashes of a cache's records (parsed: protobuf map order is not fixed), one batch of each
    training stream (weak augmentation, the trainer's stream ids), one eval batch and the splits."""
    import tensorflow as tf

    from semiseg.data import augment
    bundle = loader.prepare_data(cfg, log=lambda *a: None, progress=False)
    h = hashlib.sha256()
    for shard in bundle.manifest["shards"]:
        for record in tf.data.TFRecordDataset(str(bundle.cache_dir / shard["file"])):
            example = tf.train.Example.FromString(record.numpy())
            for name in sorted(example.features.feature):
                f = example.features.feature[name]
                h.update(name.encode() + repr(list(f.bytes_list.value) + list(f.int64_list.value)).encode())
    out = {"records": h.hexdigest()[:16]}
    for split, stream in (("labeled", 1), ("unlabeled", 2)):
        image, mask = next(iter(bundle.train_dataset(split, 4, None, 0, augment.weak_augment, stream_id=stream)))
        out[split] = hashlib.sha256(image.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()[:16]
    batch = next(iter(bundle.eval_dataset("val", 8)))
    out["eval"] = hashlib.sha256(batch["image"].numpy().tobytes() + batch["mask"].numpy().tobytes()).hexdigest()[:16]
    out["splits"] = hashlib.sha256(json.dumps(bundle.splits, sort_keys=True).encode()).hexdigest()[:16]
    return out


# Computed with the code before data.classes existed (main at ffc6614), same settings and seeds.
BINARY_SMOKE = {"records": "c24262a400a1d0b8", "labeled": "5d9ca27b327b9236", "unlabeled": "310b661aa671d99a",
                "eval": "0617c3cae608fd42", "splits": "3a7753dd656d9aa0"}
BINARY_VOLUMES = {"records": "e0d5a40148d59b6a", "labeled": "922848ecb6020287", "unlabeled": "16a7d9c9510a11b0",
                  "eval": "dce17299ee4ecb48", "splits": "75ef4e49d5aff7db"}
# key_settings of the smoke preset before data.classes: binary caches keep their keys.
OLD_KEY_SETTINGS = {"background_ratio": 0.1, "channels": 0, "ct_window": [-125.0, 275.0], "foreground_only": False,
                    "format": "synthetic", "image_size": 32, "label_set": [1, 2], "modality": "auto", "path": "",
                    "slice_axis": 2, "split_seed": 0, "synthetic_cases": 48, "synthetic_difficulty": 1.5,
                    "synthetic_seed": 0, "synthetic_size": 48}


def test_binary_smoke_cache_and_streams_are_unchanged(tmp_path):
    cfg = config.resolve("smoke", overrides=[f"data.cache_dir={tmp_path}"])
    assert _fingerprint(cfg) == BINARY_SMOKE


def test_binary_volumes_cache_and_streams_are_unchanged(tmp_path):
    """The synthetic CT volumes through the msd source with label_set [1, 2] merged (resized 40 -> 32)."""
    from semiseg.data.synthetic import generate_3d
    generate_3d(tmp_path / "vol3d", n_cases=6, shape=(40, 40, 12), seed=0, n_test=1)
    cfg = config.resolve("smoke", overrides=[f"data.cache_dir={tmp_path / 'cache'}", "data.format=msd",
                                             f"data.path={tmp_path / 'vol3d'}"])
    assert _fingerprint(cfg) == BINARY_VOLUMES


def test_binary_cache_key_settings_are_unchanged():
    assert slice_cache.key_settings(config.resolve("smoke").data) == OLD_KEY_SETTINGS
    # A single class of another name is still binary: same slices, same key.
    renamed = config.resolve("smoke", overrides=["data.classes=[lesion]", "data.split_file=x.yaml", "data.labeled_cases=3"])
    assert slice_cache.key_settings(renamed.data) == OLD_KEY_SETTINGS
    multi = config.resolve("smoke", overrides=["data.format=msd", "data.classes=[a,b]"]).data
    assert slice_cache.key_settings(multi)["classes"] == ["a", "b"]


def test_label_maps_keep_classes_apart():
    values = np.array([[0, 1, 2], [3, 4, 2.0000001]])
    assert volumes.map_labels(values, [3, 1]).tolist() == [[0, 2, 0], [1, 0, 0]]
    binary = config.resolve("smoke").data
    two = config.resolve("smoke", overrides=["data.format=msd", "data.classes=[pancreas,tumour]", "data.label_set=[1,2]"]).data
    assert volumes.class_map(values, binary).tolist() == [[0, 1, 1], [0, 0, 1]]      # today's merge
    assert volumes.class_map(values, two).tolist() == [[0, 1, 2], [0, 0, 2]]


def test_multiclass_resize_never_blends_indices_and_keeps_thin_structures():
    label = np.zeros((1, 40, 40), np.uint8)
    label[0, 8:30, 5:20] = 1           # RV
    label[0, 8:30, 20:35] = 3          # LV abutting it: blended indices would put MYO (2) on the border
    label[0, 33, 4:36] = 2             # a one-pixel line
    image = np.zeros((1, 40, 40, 1), np.float32)
    _, small = slice_cache.resize_slices(image, label, 32, num_classes=4)
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1, 2, 3}
    assert np.count_nonzero(small == 2) >= 20          # the thin line survives, nowhere else
    assert not (small[0, :24] == 2).any()          # row 33 of 40 lands near row 26 of 32
    _, big = slice_cache.resize_slices(image, label, 80, num_classes=4)
    assert set(np.unique(big)) == {0, 1, 2, 3} and not (big[0, :60] == 2).any()


def test_weak_augment_keeps_class_indices():
    import tensorflow as tf

    from semiseg.data import augment
    mask = np.zeros((32, 32, 1), np.float32)
    mask[4:20, 4:14], mask[4:20, 14:24], mask[22:26, 4:28] = 1, 3, 2
    for step in range(6):
        _, warped = augment.weak_augment(tf.zeros([32, 32, 1]), tf.constant(mask), augment.seed_for(step))
        assert set(np.unique(warped.numpy())) <= {0.0, 1.0, 2.0, 3.0}


def test_picture_masks_map_label_values(tmp_path):
    from PIL import Image
    values = np.array([[0, 1, 2], [7, 2, 0]], np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "grey.png")
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.stack([values * 30] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    two = config.resolve("smoke", overrides=["data.format=folders", "data.classes=[a,b]", "data.label_set=[1,2]"]).data
    for name in ("grey.png", "palette.png"):
        assert sources.read_mask_picture(tmp_path / name, two).tolist() == [[0, 1, 2], [0, 2, 0]]
    # Binary keeps today's rule: 0/255 masks, so with values above 1 only pixels > 127 are foreground.
    assert sources.read_mask_picture(tmp_path / "grey.png").tolist() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(sources.DataError, match="rgb.png.*single-channel"):
        sources.read_mask_picture(tmp_path / "rgb.png", two)


def test_msd_multi_label_keeps_pancreas_and_tumour_apart(tmp_path):
    """Labels 1 and 2 of the synthetic CT volumes become classes 1 and 2 in the cache and the streams;
    check-data warns, per file, about a value label_set does not map."""
    from data_layouts import write_nifti

    from semiseg.data import checks
    from semiseg.data.synthetic import generate_3d
    root = generate_3d(tmp_path / "vol3d", n_cases=5, shape=(32, 32, 10), seed=1, n_test=0)
    stray = root / "labelsTr" / "vol_004.nii.gz"
    import nibabel as nib
    img = nib.load(str(stray))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 5
    write_nifti(stray, data, img.affine)
    cfg = config.resolve("smoke", overrides=[f"data.cache_dir={tmp_path / 'cache'}", "data.format=msd",
                                             f"data.path={root}", "data.image_size=32",
                                             "data.classes=[pancreas,tumour]", "data.label_set=[1,2]"])
    fmt, _, cases = sources.resolve_source(cfg.data, log=lambda *a: None)
    report = checks.check_data(fmt, root, cases, cfg.data)
    flagged = [(p.path, p.message) for p in report.warnings if "unexpected label values" in p.message]
    assert flagged == [(str(stray), "unexpected label values [5]: data.label_set maps only 1->pancreas, "
                                    "2->tumour; these count as background")]
    bundle = loader.prepare_data(cfg, log=lambda *a: None, progress=False)
    assert bundle.num_classes == 3 and bundle.class_names == ["pancreas", "tumour"]
    want, got = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for case in cases:
        raw = np.rint(np.asarray(nib.load(case.label).dataobj)).astype(np.int64)
        want += [np.count_nonzero((raw != 1) & (raw != 2)), np.count_nonzero(raw == 1), np.count_nonzero(raw == 2)]
    for batch in bundle.eval_dataset("", 64, case_ids=[c.case_id for c in cases]):   # every case is labelled
        got += np.bincount(batch["mask"].numpy().astype(np.int64).ravel(), minlength=3)[:3]
    assert want[2] > 0 and got.tolist() == want.tolist()
