"""One optimizer step of each method on the binary smoke preset; prints loss and weight digests as JSON.

    python tests/binary_step_script.py supervised mean_teacher mixmatch mira_u

Used by tests/test_binary_unchanged.py, which compares the output with values computed on the code
before multi-class support existed (tolerance 0): the binary path must stay bit-for-bit.
The networks are built with Keras' own BatchNormalization, as then: the fused kernel the networks use
now (semiseg.models.fused_batchnorm) sums in another order, and tests/test_fused_batchnorm.py checks
it against Keras BN within float32 round-off.
"""
import hashlib
import json
import sys

import numpy as np


def main(methods):
    import keras
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    from semiseg import config
    from semiseg.data import loader
    from semiseg.methods import get_method
    from semiseg.models.fused_batchnorm import keras_batchnorm
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("auto")
    results = {}
    for method in methods:
        # The reference commit ran labelled and unlabelled images in one forward pass (joint) and
        # Keras' own optimizer update ops (the fused kernel rounds differently); MixMatch's K views
        # carried the photometric jitter then.
        then = ["mixmatch.photometric_views=true"] if method == "mixmatch" else []
        cfg = config.resolve("smoke", "", ["train.steps_per_epoch=2", "train.epochs=1", "train.labeled_forward=joint",
                                           "train.fused_update=false", *then], method)
        keras.utils.set_random_seed(cfg.seed)
        bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
        with keras_batchnorm():
            trainer = get_method(method)(cfg, bundle, strategy, info, log=lambda m: None)
        loop = trainer._make_loop(*trainer._iterators(0))
        logs = {k: float(v) for k, v in loop(tf.constant(1)).items()}
        weights = [np.asarray(keras.ops.convert_to_numpy(w), np.float32) for w in trainer.trainable_variables()]
        digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
        results[method] = {"loss": logs["loss"], "loss_hex": float(logs["loss"]).hex(),
                           "weights_sha256": digest, "weights_sum": float(sum(float(w.astype(np.float64).sum()) for w in weights))}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
