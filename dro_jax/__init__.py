"""dro_jax: alignment of T5 encoder-decoders from human feedback in JAX/Flax."""
