"""train.labeled_augment: the labelled stream's augmentation is each method's own (`method`: strong
for MIRA-U as its paper, weak for the rest) unless one value is set for every method, and the
stream really applies what is set."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from semiseg import config
from semiseg.data import loader
from semiseg.errors import ConfigError
from semiseg.methods import get_method


def _trainer(method, *overrides):
    extra = ["mira_u.student_swin_depth=1"] if method == "mira_u" else []
    cfg = config.resolve("smoke", overrides=[*extra, *overrides], method=method)
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    keras.utils.set_random_seed(0)
    return get_method(method)(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)


def _first_labelled_batch(trainer):
    images, masks = next(trainer._iterators(0)[0])
    return images.numpy(), masks.numpy()


def test_method_default_and_override():
    assert _trainer("supervised").labeled_augmentation() == "weak"
    assert _trainer("mira_u").labeled_augmentation() == "strong"          # its paper's strong views
    assert _trainer("mira_u", "train.labeled_augment=weak").labeled_augmentation() == "weak"
    assert _trainer("supervised", "train.labeled_augment=strong").labeled_augmentation() == "strong"


def test_stream_applies_the_setting():
    raw = _trainer("supervised", "train.labeled_augment=none")
    images, _ = _first_labelled_batch(raw)
    originals = np.concatenate([b["image"].numpy() for b in raw.data.eval_dataset("labeled", 64)])
    for image in images:            # unaugmented: every image is one of the labelled slices as stored
        assert np.abs(originals - image[None]).reshape(len(originals), -1).max(1).min() < 1e-6

    weak_images, weak_masks = _first_labelled_batch(_trainer("supervised", "train.labeled_augment=weak"))
    strong_images, strong_masks = _first_labelled_batch(_trainer("supervised", "train.labeled_augment=strong"))
    np.testing.assert_array_equal(weak_masks, strong_masks)     # strong = the weak geometry ...
    assert np.abs(weak_images - strong_images).max() > 0.01     # ... plus photometric changes


def test_unknown_value_is_named():
    with pytest.raises(ConfigError, match="train.labeled_augment"):
        config.resolve("smoke", overrides=["train.labeled_augment=heavy"])


def test_runs_saved_before_the_key_read_as_their_method_default():
    mapping = config.saved_run_mapping({"method": "mira_u", "train": {"epochs": 1}})
    assert mapping["train"]["labeled_augment"] == "method"
