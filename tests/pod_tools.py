"""The command-line tools one after another in one process, each as its own command line runs it
(`python -m dro_jax.TOOL ARGS`): `python tests/pod_tools.py WORKDIR PROMPTS OUT`, under
launch/local.py in tests/test_pod_local.py. Writes OUT/evaluation/, OUT/responses.jsonl and
OUT/hf/."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool_arguments(workdir: str, prompts: str, out: str) -> dict[str, list[str]]:
  return {
      "evaluate": ["--policy", workdir, "--baseline", workdir, "--num_prompts", "24",
                   "--output", os.path.join(out, "evaluation")],
      "sample": ["--policy", workdir, "--prompts", prompts, "--out",
                 os.path.join(out, "responses.jsonl"), "--num_samples", "3", "--temperature",
                 "0.7", "--seed", "5"],
      "export": ["--workdir", workdir, "--output", os.path.join(out, "hf")],
  }


def main() -> None:
  workdir, prompts, out = sys.argv[1:4]
  for tool, arguments in tool_arguments(workdir, prompts, out).items():
    sys.argv = [f"dro_jax.{tool}", *arguments]
    runpy.run_module(f"dro_jax.{tool}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
