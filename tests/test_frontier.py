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
  state = json.loads((tmp_path / "frontier.json").read_text())
  protocol = state["protocol"]
  assert protocol["selection"] == "validation" and protocol["seeds"] == [0]
  assert protocol["validation_prompts"] == frontier.QUICK_PROMPTS["validation"]
  assert protocol["test_prompts"] == frontier.QUICK_PROMPTS["test"]
  assert protocol["train_prompts"] > 0
  points = state["points"]
  assert protocol["methods"] == list(frontier.QUICK_METHODS)
  assert len(points) == len(frontier.QUICK_METHODS) * 2
  for point in points.values():
    assert point["diverged"] or all(
        0.0 <= point[split]["win_rate_low"] <= point[split]["win_rate"]
        <= point[split]["win_rate_high"] <= 1.0 and "kl" in point[split]
        for split in ("validation", "test"))
  assert {f"learning_rate/{m}" for m in frontier.QUICK_METHODS} | {
      f"best/{m}" for m in frontier.QUICK_METHODS} <= set(state["choices"])
  text = (tmp_path / "frontier.md").read_text()
  rows = [line for line in text.split("## Every point")[1].split("##")[0].splitlines()
          if line.startswith("| ") and line.split("|")[1].strip() in frontier.METHODS]
  assert len(rows) == len(points)
  assert "## Paired differences at matched KL" in text and "## KL against the regularisation" in text
  assert (tmp_path / "frontier.png").stat().st_size > 10_000
  # Resumable: a second call reads every point back (no training, no judging).
  seconds = {name: point["seconds"] for name, point in points.items()}
  capsys.readouterr()
  frontier.main(args)
  assert "[frontier]" not in capsys.readouterr().out
  again = json.loads((tmp_path / "frontier.json").read_text())["points"]
  assert {name: point["seconds"] for name, point in again.items()} == seconds


def _fake_frontier(frontier, output, monkeypatch, trained, poison=0.0, prompts=40):
  """A Frontier whose points train instantly: each point's metrics follow from its settings.
  Validation favours lr 1e-3 and the middle of each grid; test scores are `poison`ed: shifted
  by an amount that depends on the setting, so a choice that read them would change."""
  import numpy as np
  monkeypatch.setattr(frontier.train, "run", lambda config, workdir: trained.append(workdir))
  monkeypatch.setattr(frontier.demo, "finished", lambda workdir, steps: False)
  monkeypatch.setattr(frontier.demo, "load_policy", lambda workdir, demo: workdir)
  monkeypatch.setattr(frontier, "POLL_S", 0.01)
  run = object.__new__(frontier.Frontier)
  run.output, run.quick, run.seeds, run.points, run.choices = str(output), False, [0, 1], {}, {}
  run.demo, run.methods = None, tuple(frontier.METHODS)
  run.path = str(output / "frontier.json")
  run.protocol = {"train_prompts": 100, "train_prompts_per_seed": 50, "validation_prompts": 10,
                  "test_prompts": prompts, "samples_per_prompt": 2, "selection": "validation",
                  "seeds": [0, 1], "judge": "demo"}
  run.config = lambda method, value, seed, rate, extra: type("Config", (), {"total_steps": 1})()

  def evaluate(policy, workdir):
    tag, seed = pathlib.Path(workdir).parts[-2], int(workdir.rsplit("_", 1)[1])
    setting, rate = tag.rsplit("_lr", 1)
    value, rate = float(setting.rsplit("_", 1)[-1]), float(rate)
    alpha = "TR-DPO" in workdir
    kl = 10 * value if alpha else 1.0 / value
    good = 0.6 + 0.1 * (rate == 1e-3) + 0.05 * (value in (0.3, 0.03)) + 0.01 * seed
    rng = np.random.default_rng(abs(hash((workdir, poison))) % 2**32)
    test = np.clip(good + poison * np.sin(7 * value + 100 * rate)
                   + rng.normal(0, 0.05, prompts), 0, 1)
    kls = kl * (1 + rng.normal(0, 0.05, prompts))
    result = lambda win, scores, kls: {  # noqa: E731
        "win_rate": win, "win_rate_low": win - 0.02, "win_rate_high": win + 0.02, "kl": kl,
        "policy_length": 5.0, "prompt_scores": frontier.protocol.pack(scores),
        "prompt_kl": frontier.protocol.pack(kls)}
    return {"validation": result(good, np.full(10, good), np.full(10, kl)),
            "test": result(float(test.mean()), test, kls)}
  run.evaluators = {0: evaluate, 1: evaluate}
  return run


def test_the_full_sweep_order_choices_and_ablation(tmp_path, monkeypatch):
  """Without training: every point once, each method's sweep at its learning rate chosen on
  validation, the ablation around DRO-V's best τ, a claim left by a stopped process taken over,
  and a live one (another process's) waited for."""
  frontier = _frontier_module()
  trained = []
  run = _fake_frontier(frontier, tmp_path, monkeypatch, trained)
  stale = pathlib.Path(run.workdir("DPO|0.5@lr0.001|0") + ".claim")
  stale.parent.mkdir(parents=True)
  stale.write_text("999999999")  # no such process
  # A report before any point is done says so and claims nothing.
  empty = frontier.write(run, "frontier")
  assert f"Partial: 0 of the sweep's {run.planned()} points" in empty
  assert "Too few complete points for matched KL." in empty
  run.run()
  methods, values = len(frontier.METHODS), len(frontier.METHODS["DRO-V"][4])
  # The grid: one seed, every rate, at the default (its 1e-3 point is the sweep's too).
  grid = methods * (len(frontier.LEARNING_RATES) - 1)
  ablation = len(frontier.ABLATION) * 3 * len(run.seeds)
  assert len(trained) == len(set(trained)) == len(run.points) == \
      grid + methods * values * len(run.seeds) + ablation
  assert not list(tmp_path.rglob("*.claim"))
  assert all(run.choices[f"learning_rate/{m}"]["pick"] == "0.001" for m in frontier.METHODS)
  assert run.choices["best/DRO-V"]["pick"] == "0.3"
  assert run.choices["ablation_tau"]["taus"] == [0.4, 0.3, 0.2]
  for choice in run.choices.values():
    assert choice["selection"] == "validation" and set(choice["validation"]) == set(choice["grid"])
  text = frontier.write(run, "frontier")
  assert "Partial" not in text
  state = json.loads((tmp_path / "frontier.json").read_text())
  assert {"protocol", "points", "choices", "matched"} <= set(state)
  assert "## Paired differences at matched KL" in text
  assert "## DRO-V value functions at matched KL" in text
  assert state["matched"]["levels"] and state["matched"]["cells"]["DPO"][0]["verdict"]
  # A point claimed by a live process (this test's parent) is not trained here: it is waited for.
  name = "KTO|0.1@lr0.001|0"
  claimed = run.workdir(name) + ".claim"
  del run.points[name]
  state["points"].pop(name)
  (tmp_path / "frontier.json").write_text(json.dumps(state))
  pathlib.Path(claimed).write_text(str(__import__("os").getppid()))
  assert run.point("KTO", 0.1, 0, 1e-3) is None
  pathlib.Path(claimed).unlink()
  with pytest.raises(RuntimeError, match="run the same command again"):
    run.wait([name])


def test_poisoned_test_scores_change_no_choice(tmp_path, monkeypatch):
  """The same sweep with test scores shifted by large, setting-dependent amounts: every choice
  (learning rates, best values, the ablation's τ) and its validation scores stay the same."""
  frontier = _frontier_module()
  choices = []
  for poison in (0.0, 0.3):
    run = _fake_frontier(frontier, tmp_path / f"poison_{poison}", monkeypatch, [], poison=poison)
    run.run()
    choices.append(run.choices)
    tests = [p["test"]["win_rate"] for p in run.points.values()]
  assert choices[0] == choices[1]
  assert max(tests) - min(tests) > 0.3  # the poison did move the test scores


def test_matched_levels_leave_out_a_method_whose_range_does_not_overlap():
  """A method whose KL stays far above the others' (a reference that follows the policy) does not
  empty the comparison: the levels are where the others meet; it gets no cell there."""
  import numpy as np
  frontier = _frontier_module()
  ones = np.ones((1, 30))
  curves = {name: [{"value": 1.0, "scores": 0.6 * ones, "kls": low * ones, "kl_seed_sd": 0.0},
                   {"value": 0.1, "scores": 0.8 * ones, "kls": high * ones, "kl_seed_sd": 0.0}]
            for name, low, high in (("DRO-V", 0.1, 2.0), ("B", 0.5, 3.0), ("C", 3.2, 3.6))}
  levels = frontier.matched_levels(curves)
  assert len(levels) == 3 and 0.5 < levels[0] < levels[-1] < 2.0
  table = frontier.matched_table(curves, "DRO-V", levels, frontier.protocol.Replicates(1, 30, 50))
  assert all(np.isnan(cell["linear"]["win_rate"]) for cell in table["C"])
  assert all(cell["verdict"] in ("better", "worse", "indistinguishable", "no claim")
             for cell in table["B"])
  violations = frontier.monotonicity({"DRO-V": [
      {"value": 1.0, "kls": 0.3 * ones, "scores": ones, "kl_seed_sd": 0.0},
      {"value": 0.1, "kls": 0.2 * ones, "scores": ones, "kl_seed_sd": 0.0}]})
  assert len(violations) == 1 and violations[0].startswith("DRO-V")


def test_the_plot_adds_the_range_where_the_methods_meet(tmp_path):
  """With matched-KL levels the plot has a second panel: linear KL around the levels, its y range
  from the points inside it, and one dotted line per level; without levels, the sweep alone."""
  import matplotlib.image
  import numpy as np
  frontier = _frontier_module()
  ones = np.ones((1, 30))
  curves = {name: [{"value": v, "scores": s * ones, "kls": k * ones, "kl_seed_sd": 0.0}
                   for v, s, k in ((1.0, 0.6, 0.05), (0.5, 0.7, 0.8), (0.2, 0.8 + shift, 2.5))]
            for name, shift in (("DRO-V", 0.0), ("B", 0.02))}
  replicates = frontier.protocol.Replicates(1, 30, 50)
  levels = frontier.matched_levels(curves)
  assert levels
  both, alone = tmp_path / "both.png", tmp_path / "alone.png"
  frontier.plot(curves, replicates, str(both), levels)
  frontier.plot(curves, replicates, str(alone))
  height, width = matplotlib.image.imread(str(both)).shape[:2]
  assert width > 2 * height  # two panels side by side
  height, width = matplotlib.image.imread(str(alone)).shape[:2]
  assert width < 1.5 * height
