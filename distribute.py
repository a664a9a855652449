"""TEMPORARY stand-in until the HPC branch lands: the default strategy only."""
import tensorflow as tf


def make_strategy(distribution="auto", num_gpus_hint=None):
    strategy = tf.distribute.get_strategy()
    return strategy, {"strategy": "default", "num_replicas": 1, "num_workers": 1, "task_index": 0, "is_chief": True}
