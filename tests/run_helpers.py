"""Small run configurations and readers shared by the driver, fault and evaluation tests."""

import json
import os
import pathlib
import subprocess
import time


def shrink(config, demo_cache: str, steps: int = 3):
  """A recipe cut to a seconds-long CPU run: one layer per stack, batch 8, the shared data."""
  config.total_steps = steps
  config.model.num_encoder_layers = config.model.num_decoder_layers = 1
  config.batch_size = 8
  config.eval_batches = 1
  config.data.cache_dir = demo_cache
  return config


def read_metrics(workdir) -> list[dict]:
  """One row per step, as every reader of metrics.jsonl takes them (replayed steps supersede)."""
  from dro_jax import files
  return files.metrics_rows(os.path.join(str(workdir), "metrics.jsonl"))


def raw_metrics(workdir) -> list[dict]:
  """Every line of metrics.jsonl as written (the file is only ever appended to)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def set_dotted(config, changes: dict):
  """config["a.b.c"] = value for each dotted key of `changes`; returns the config."""
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def cli_env(tmp_path, demo_cache: str, compile_cache: str) -> dict:
  """The environment of a driver subprocess: CPU, one device, the session's demo data, a JAX
  compilation cache shared by the tests that name the same `compile_cache`."""
  return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
          "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "DRO_JAX_CACHE": demo_cache,
          "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / compile_cache),
          "PYTHONPATH": str(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}


def pid_of_process(launcher: subprocess.Popen, index: int, timeout: float = 120) -> int:
  """The pid of the launched copy with DRO_JAX_PROCESS_ID=index."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for name in os.listdir("/proc"):
      if not name.isdigit():
        continue
      try:
        environ = pathlib.Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        parent = int(pathlib.Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      if parent == launcher.pid and f"DRO_JAX_PROCESS_ID={index}".encode() in environ:
        return int(name)
    time.sleep(0.5)
  raise AssertionError(f"no process {index} under the launcher")
