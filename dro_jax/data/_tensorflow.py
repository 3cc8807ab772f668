"""TensorFlow for the input pipeline only: quiet, and kept off the accelerators JAX uses.

Every module of this package that needs TensorFlow imports it from here, so the first import
hides the GPUs from TensorFlow before it claims any memory. TF_CPP_MIN_LOG_LEVEL is set (unless
the user set it) in the package's `__init__`, before anything imports TensorFlow; level 3 is
needed because the failed CUDA probe of a CPU-only machine is logged as an error. Errors of the
input pipeline itself still reach Python as exceptions. The import itself goes through
`dro_jax.console`, which keeps TensorFlow's native start-up notices off stderr. CUDA_VISIBLE_DEVICES is left alone: it
would hide the GPUs from JAX too.
"""

from dro_jax import console

tf = console.import_tensorflow()


def hide_accelerators_from_tensorflow() -> bool:
  """tf.data runs on the host; True if the GPUs are now hidden from TensorFlow.

  Once TensorFlow has initialised its devices (something used it before this package was
  imported), the list can no longer change; then it is left as it is.
  """
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    return False
  return True


hide_accelerators_from_tensorflow()

__all__ = ["tf", "hide_accelerators_from_tensorflow"]
