"""The config and global batches of the two-process test, shared by the test and its workers."""

from dro_jax import configs


def config_for_test():
  config = configs.load("dro", "size=tiny")
  config.mesh_shape = (2, 1, 1)
  config.batch_size = 16
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 1e-2
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  return config


def batches(count: int):
  from test_engine import make_batch
  return [make_batch(seed=index) for index in range(count)]
