"""The tiny training commands of the README and docs/training.md, run as written (their /tmp/
workdirs under pytest's): a value-function ablation, SFT then DRO-V from it, and TR-DPO with 4
microbatches."""

import subprocess
import sys

import pytest

import readme_commands
import run_helpers

PREFIXES = ("python -m dro_jax.main --config configs/dro.py:size=tiny,value=",
            "python -m dro_jax.main --config configs/sft.py:size=tiny --workdir /tmp/sft",
            "python -m dro_jax.main --config configs/dro.py:size=tiny,init=",
            "python -m dro_jax.main --config configs/dpo.py:size=tiny,tr=soft")


@pytest.mark.slow
def test_the_readme_training_commands_run_as_written(tmp_path, demo_cache):
  env = run_helpers.cli_env(tmp_path, demo_cache, "readme_recipes_cache")
  for prefix in PREFIXES:
    words = readme_commands.argv(readme_commands.command(prefix), tmp_path)
    result = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    workdir = words[words.index("--workdir") + 1]
    rows = run_helpers.read_metrics(workdir)
    assert rows[-1]["step"] == 200, prefix
    # Alignment from random init says so; DRO-V from the SFT workdir does not.
    warned = "from random init" in output
    assert warned == ("init=" not in prefix and "sft.py" not in prefix), (prefix, output[-2000:])
  dro = run_helpers.read_metrics(tmp_path / "dro")
  ablation = run_helpers.read_metrics(tmp_path / "dro_ablation")
  # Started from the trained SFT policy (the reference too), DRO-V's reference log-probabilities
  # are far above those of a random init.
  assert dro[0]["logps/ref"] > ablation[0]["logps/ref"] + 1.0, (dro[0], ablation[0])
