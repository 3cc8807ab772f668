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


def _fake_frontier(frontier, output, monkeypatch, trained):
  """A Frontier whose points train instantly: each point's metrics follow from its settings."""
  monkeypatch.setattr(frontier.train, "run", lambda config, workdir: trained.append(workdir))
  monkeypatch.setattr(frontier.demo, "finished", lambda workdir, steps: False)
  monkeypatch.setattr(frontier.demo, "load_policy", lambda workdir, demo: workdir)
  monkeypatch.setattr(frontier, "POLL_S", 0.01)
  run = object.__new__(frontier.Frontier)
  run.output, run.quick, run.seeds, run.points, run.demo = str(output), False, [0, 1], {}, None
  run.path = str(output / "frontier.json")
  run.config = lambda method, value, seed, extra: type("Config", (), {"total_steps": 1})()

  def evaluate(policy, workdir):
    value = float(workdir.split("/")[-2].split("_")[-1]) if "_" in workdir.split("/")[-2] else \
        float(workdir.split("/")[-2])
    return {"win_rate": 0.5 + 0.01 * (value == 0.3), "win_rate_low": 0.4, "win_rate_high": 0.6,
            "policy_reward": 0.0, "kl": 1.0 / value, "policy_length": 5.0}
  run.evaluate = evaluate
  return run


def test_the_full_sweep_order_learning_rate_and_ablation_tau(tmp_path, monkeypatch):
  """Without training: every point once, the no-1/τ points at the chosen learning rate, the
  ablation at DRO-V's best τ, a claim left by a stopped process taken over, and a live one
  (another process's) waited for."""
  frontier = _frontier_module()
  trained = []
  run = _fake_frontier(frontier, tmp_path, monkeypatch, trained)
  stale = pathlib.Path(run.workdir("DPO|0.5|0") + ".claim")
  stale.parent.mkdir(parents=True)
  stale.write_text("999999999")  # no such process
  run.run()
  sweeps = (len(frontier.METHODS) * len(frontier.FACTORS) + len(frontier.NO_SCALE_LEARNING_RATES)
            + len(frontier.ABLATION)) * len(run.seeds)
  assert len(trained) == len(set(trained)) == len(run.points) == sweeps
  assert not list(tmp_path.rglob("*.claim"))
  ablation = {p["label"] for p in run.points.values() if p["label"].startswith("ablation_")}
  assert all(label.endswith("_0.3") for label in ablation)  # DRO-V's best τ: 0.3 here
  text = frontier.write(run, "frontier")
  assert "## DRO-V value functions at its best τ" in text
  # A point claimed by a live process (this test's parent) is not trained here: it is waited for.
  claimed = run.workdir("KTO|0.1|0") + ".claim"
  del run.points["KTO|0.1|0"]
  (tmp_path / "frontier.json").write_text(json.dumps(run.points))
  pathlib.Path(claimed).write_text(str(__import__("os").getppid()))
  assert run.point("KTO", 0.1, 0) is None
  pathlib.Path(claimed).unlink()
  with pytest.raises(RuntimeError, match="run the same command again"):
    run.wait(["KTO|0.1|0"])


def test_matched_kl_levels_leave_out_a_method_whose_range_does_not_overlap():
  """A method whose KL stays far above the others' (a reference that follows the policy) does not
  empty the comparison: the levels are where the others meet; it gets none there."""
  frontier = _frontier_module()
  curves = {name: [{"value": 1.0, "kl": low, "kl_sd": 0.0, "win_rate": 0.6},
                   {"value": 0.1, "kl": high, "kl_sd": 0.0, "win_rate": 0.8}]
            for name, low, high in (("A", 0.1, 2.0), ("B", 0.5, 3.0), ("C", 3.2, 3.6))}
  levels, rates = frontier.matched(curves)
  assert len(levels) == 3 and 0.5 < levels[0] < levels[-1] < 2.0
  assert rates["C"] == [None, None, None] and None not in rates["A"] + rates["B"]
