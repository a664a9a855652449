"""Data, in the order it flows: sources (formats) -> volumes / synthetic -> checks -> cache (slices,
built by workers) -> loader (tf.data streams) -> augment (in-graph)."""
