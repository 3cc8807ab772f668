"""benchmarks/frontier.py --quick: every method at two regularisation values, one row per point,
the matched-KL table and the plot; a second call trains nothing again."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _frontier_module():
  spec = importlib.util.spec_from_file_location("dro_jax_frontier", ROOT / "benchmarks" /
                                                "frontier.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_the_quick_frontier_writes_a_row_per_point(tmp_path, demo_cache, demo_sft, capsys):
  frontier = _frontier_module()
  args = ["--output", str(tmp_path), "--quick", "--data_cache", demo_cache, "--sft", str(demo_sft)]
  frontier.main(args)
  points = json.loads((tmp_path / "frontier.json").read_text())
  assert len(points) == len(frontier.METHODS) * len(frontier.QUICK_FACTORS)
  text = (tmp_path / "frontier.md").read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line
          and not line.startswith("| method")]
  table = [line for line in rows if line.split("|")[1].strip() in frontier.METHODS
           and line.count("|") == 10]
  assert len(table) == len(points)
  for point in points.values():
    assert point["diverged"] or 0.0 <= point["win_rate"] <= 1.0
  assert "## Win rate at matched KL" in text and "## KL against the regularisation" in text
  assert (tmp_path / "frontier.png").stat().st_size > 10_000
  # Resumable: a second call reads every point back (no training, no judging).
  seconds = {name: point["seconds"] for name, point in points.items()}
  capsys.readouterr()
  frontier.main(args)
  assert "[frontier]" not in capsys.readouterr().out
  again = json.loads((tmp_path / "frontier.json").read_text())
  assert {name: point["seconds"] for name, point in again.items()} == seconds


def test_matched_kl_and_monotonicity_on_made_up_curves():
  frontier = _frontier_module()
  curves = {
      "DPO": [{"value": 1.0, "kl": 0.1, "kl_sd": 0.0, "win_rate": 0.55},
              {"value": 0.1, "kl": 1.1, "kl_sd": 0.0, "win_rate": 0.75}],
      "KTO": [{"value": 1.0, "kl": 0.3, "kl_sd": 0.0, "win_rate": 0.6},
              {"value": 0.1, "kl": 0.2, "kl_sd": 0.0, "win_rate": 0.62},
              {"value": 0.01, "kl": 2.0, "kl_sd": 0.0, "win_rate": 0.7}],
  }
  levels, rates = frontier.matched(curves)
  assert len(levels) == 3 and 0.2 < levels[0] < levels[-1] < 1.1
  assert rates["DPO"][0] == pytest.approx(0.55 + 0.2 * (levels[0] - 0.1))
  violations = frontier.monotonicity(curves)
  assert len(violations) == 1 and violations[0].startswith("KTO")
