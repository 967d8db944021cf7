"""Ray pipelines at the edge of the Ray-free core: corpus encoding, training, batch inference."""
