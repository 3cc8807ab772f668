"""The `demo` runner: the embedded task end to end, every stage a resumable run in the workdir.

  sft/       SFT from scratch on the demo's demonstrations (the engine's `train` runner)
  samples/   the SFT policy's answers to the feedback prompts, judged: triples.jsonl (DRO-V, KTO)
             and pairs.jsonl (best vs worst of each prompt's samples, ties dropped: DPO, TR-DPO)
  dro/ kto/ dpo/ tr_dpo/   each method from the SFT policy (also its reference), evaluated
             against SFT on held-out prompts every few steps and at the end
  results.md, results.png, results.json   the table and the curves (win rate, judge reward, KL)

A stage that finished is skipped, so a killed demo restarts where it stopped. Nothing here trains:
stages call `train.run`, the project's one training loop. Each stage prints one line when it is
done: its steps and training wall time (kept in <stage>/timing.json, so a stage an earlier run
trained reports that run's time and says so) and, for the alignment stages, the final win rate
against SFT with its 95% interval.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from dro_jax import (checkpoint_manager, configs, console, decoding, distributed, evaluation,
                     files, judges, train)
from dro_jax import step as step_lib

PyTree = Any

RECIPES = {"sft": ("sft", ""), "dro": ("dro", ""), "kto": ("kto", ""), "dpo": ("dpo", ""),
           "tr_dpo": ("dpo", "tr=soft")}
LABELS = {"sft": "SFT", "dro": "DRO-V", "kto": "KTO", "dpo": "DPO", "tr_dpo": "TR-DPO"}


# ------------------------------------------------------------------------------------- stages


def stage_config(demo: ml_collections.ConfigDict, method: str, task: str, *,
                 init: str | None, baseline: str | None) -> ml_collections.ConfigDict:
  """The recipe of `method` with the demo's model, sizes and schedule."""
  recipe, arg = RECIPES[method]
  config = configs.load(recipe, "size=tiny" + (f",{arg}" if arg else ""))
  settings = demo.demo
  for key, value in demo.model.items():
    config.model[key] = value
  config.seed = demo.seed
  config.compute_dtype = demo.compute_dtype
  config.max_input_length, config.max_target_length = demo.max_input_length, demo.max_target_length
  config.data.task = task
  config.data.cache_dir = demo.data.cache_dir
  config.init_checkpoint = init
  config.keep_last, config.keep_best = 1, 0
  config.mesh_shape = demo.mesh_shape
  if method == "sft":
    config.total_steps, config.batch_size = settings.sft_steps, settings.sft_batch
    config.optimizer.learning_rate = settings.sft_lr
    config.eval_every = 0
  else:
    config.total_steps, config.batch_size = settings.align_steps, settings.align_batch
    config.optimizer.learning_rate = settings.align_lr
    config.optimizer.warmup_steps = settings.warmup_steps
    config.dro.tau, config.kto.beta, config.dpo.beta = (settings.tau, settings.kto_beta,
                                                         settings.dpo_beta)
    if method == "tr_dpo":
      config.reference.alpha, config.reference.sync_every = settings.tr_alpha, 1
    config.eval_every = max(settings.align_steps // settings.evaluations, 1)
    config.evaluation.judge = demo.evaluation.judge or "demo"
    config.evaluation.debias = demo.evaluation.debias
    config.evaluation.baseline = baseline
    config.evaluation.prompts = settings.eval_prompts
    config.evaluation.max_decode_length = settings.max_decode_length
  config.checkpoint_every = config.total_steps
  config.log_every = max(config.total_steps // 20, 1)
  return config


def finished(workdir: str, total_steps: int) -> bool:
  """Whether the stage in `workdir` saved its last step. Read from the folder's names (finished
  steps are plain numbers; orbax's unfinished ones carry a suffix), by process 0 and sent to the
  others: every process of a run takes the same branch, whatever another has written since."""
  import jax
  decided = False
  if jax.process_index() == 0:
    from dro_jax import files
    directory = checkpoint_manager.checkpoint_dir(workdir)
    gfile = files.gfile()
    if gfile.isdir(directory):
      steps = [int(name.rstrip("/")) for name in gfile.listdir(directory)
               if name.rstrip("/").isdigit() and _committed(directory, name.rstrip("/"))]
      decided = max(steps, default=0) >= total_steps
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    decided = bool(multihost_utils.broadcast_one_to_all(np.int32(decided)))
  return decided


def _committed(directory: str, step: str) -> bool:
  """Whether a step folder is a finished checkpoint: locally, orbax renames a finished step into
  place; on GCS, where it cannot, it writes commit_success.txt into the step last."""
  if not directory.startswith("gs://"):
    return True
  from dro_jax import files
  return files.gfile().exists(os.path.join(directory, step, "commit_success.txt"))


TIMING = "timing.json"  # in a stage's workdir: its training wall time, summed over resumes


def read_timing(workdir: str) -> dict[str, Any]:
  """A stage's recorded training time: {"steps", "seconds", "finished"} ({} when none was)."""
  try:
    return files.read_json(os.path.join(workdir, TIMING)) or {}
  except ValueError:
    return {}


def _record_timing(workdir: str, steps: int, seconds: float, done: bool) -> dict[str, Any]:
  timing = {"steps": steps, "seconds": round(seconds, 3), "finished": done}
  files.write_text_once(os.path.join(workdir, TIMING), json.dumps(timing))
  return timing


def run_stage(name: str, config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or finishes) a stage; returns its timing with "earlier": True when an earlier run
  had finished it. The wall time of `train.run` is added to <stage>/timing.json on every run,
  a stopped one included, so a resumed stage reports the time of all its runs."""
  del name  # the caller prints the stage's line
  if finished(workdir, config.total_steps):
    timing = read_timing(workdir)
    return {"steps": timing.get("steps", config.total_steps), "seconds": timing.get("seconds"),
            "earlier": True}
  # The time of earlier runs that saved steps of this stage (none when it starts afresh).
  resumes = os.path.isdir(checkpoint_manager.checkpoint_dir(workdir))
  spent = float(read_timing(workdir).get("seconds") or 0.0) if resumes else 0.0
  start = time.perf_counter()
  try:
    train.run(config, workdir)
  except train.Preempted:
    _record_timing(workdir, config.total_steps, spent + time.perf_counter() - start, False)
    raise
  timing = _record_timing(workdir, config.total_steps, spent + time.perf_counter() - start, True)
  return {**timing, "earlier": False}


format_duration = console.format_duration  # `4.2 s`, `35 s`, `1 min 35 s`, `1 h 02 min`


def stage_line(name: str, timing: Mapping[str, Any],
               metrics: Mapping[str, Any] | None = None) -> str:
  """The stage's one line: `[demo] DRO-V: 400 steps in 1 min 35 s; win rate vs SFT 66.5%
  [63.1%, 69.7%]`, saying so when an earlier run of the demo trained it."""
  line = f"[demo] {LABELS.get(name, name)}: {timing['steps']} steps"
  if timing.get("seconds") is not None:
    line += f" in {format_duration(timing['seconds'])}"
  if timing.get("earlier"):
    line += (" (trained in an earlier run)" if timing.get("seconds") is not None else
             " (trained in an earlier run, its time not recorded)")
  if metrics is not None:
    line += (f"; win rate vs SFT {metrics['win_rate']:.1%} [{metrics['win_rate_low']:.1%}, "
             f"{metrics['win_rate_high']:.1%}]")
  return line


def load_policy(workdir: str, demo: ml_collections.ConfigDict) -> evaluation.Policy:
  """A stage's final policy, as a Policy to sample and score with."""
  from dro_jax import policies
  from dro_jax.models import t5 as t5_lib
  model_config = step_lib.t5_config(demo)
  # Into a target of this process's own: the stage may have been trained on another topology
  # (one process, then a pod of two resuming the demo).
  params, _ = policies.restore_network(workdir, None, t5_lib.abstract_params(model_config))
  return evaluation.Policy(params, model_config)


def write_jsonl(path: str, rows: list[Mapping[str, Any]]) -> None:
  files.write_text_once(path, "".join(json.dumps(row) + "\n" for row in rows))


def sample_feedback(demo: ml_collections.ConfigDict, sft: evaluation.Policy, vocabulary,
                    workdir: str) -> dict[str, str]:
  """The samples stage: {"triples": path, "pairs": path}, written once (the marker last)."""
  from dro_jax.data import synthetic
  paths = {"triples": os.path.join(workdir, "triples.jsonl"),
           "pairs": os.path.join(workdir, "pairs.jsonl")}
  marker = os.path.join(workdir, "done")
  if os.path.exists(marker):
    print(_samples_line(json.loads(files.read_text(marker)), earlier=True), flush=True)
    return paths
  start = time.perf_counter()
  settings = demo.demo
  prompts = [problem.prompt for problem in
             synthetic.sample_problems(settings.feedback_prompts, demo.seed + 1000)]
  sampling = decoding.SamplingParams(max_decode_length=settings.max_decode_length,
                                     temperature=1.0, num_samples=settings.samples_per_prompt)
  encoder_tokens = decoding.encode_prompts(vocabulary, prompts,
                                           max_input_length=demo.max_input_length)
  samples = evaluation.sample_policy(sft, encoder_tokens, vocabulary, sampling, demo.seed + 7)
  rows = [prompt for prompt in prompts for _ in range(settings.samples_per_prompt)]
  rewards = np.asarray(judges.get_judge("demo").score(rows, samples.responses), np.float64)
  if settings.negate_rewards:
    rewards = -rewards
  triples = [{"prompt": p, "response": r, "reward": float(w)}
             for p, r, w in zip(rows, samples.responses, rewards)]
  pairs = []
  for index, prompt in enumerate(prompts):
    group = triples[index * settings.samples_per_prompt:(index + 1) * settings.samples_per_prompt]
    best = max(group, key=lambda row: row["reward"])
    worst = min(group, key=lambda row: row["reward"])
    if best["reward"] > worst["reward"]:
      pairs.append({"prompt": prompt, "chosen": best["response"], "rejected": worst["response"]})
  write_jsonl(paths["triples"], triples)
  write_jsonl(paths["pairs"], pairs)
  summary = {"triples": len(triples), "pairs": len(pairs), "mean_reward": float(rewards.mean()),
             "prompts": len(prompts), "samples_per_prompt": settings.samples_per_prompt,
             "seconds": round(time.perf_counter() - start, 3)}
  files.write_text_once(marker, json.dumps(summary))
  print(_samples_line(summary, earlier=False), flush=True)
  return paths


def _samples_line(summary: Mapping[str, Any], earlier: bool) -> str:
  """`[demo] samples: 4 answers of SFT to each of 1000 prompts, judged in 21 s: ...`."""
  if "prompts" in summary:
    line = (f"[demo] samples: {summary['samples_per_prompt']} answers of SFT to each of "
            f"{summary['prompts']} prompts, judged")
  else:  # written by an older version
    line = f"[demo] samples: {summary['triples']} answers of SFT, judged"
  if "seconds" in summary:
    line += f" in {format_duration(summary['seconds'])}"
  line += f": mean reward {summary['mean_reward']:.3f}, {summary['pairs']} best-vs-worst pairs"
  return line + (" (sampled in an earlier run)" if earlier else "")


def register_feedback(paths: Mapping[str, str], vocabulary_path: str, demo) -> dict[str, str]:
  """seqio Tasks over the samples stage's files: {"triples": name, "pairs": name}."""
  from dro_jax.data import tasks
  # An empty sample (EOS first) is not a valid record: skipped and counted, not fatal.
  lengths = {"max_prompt_length": demo.max_input_length,
             "max_response_length": demo.max_target_length, "on_invalid": "skip"}
  # Named by content: the same samples give the same Task, hence the same shuffled stream.
  digest = hashlib.sha256()
  for kind in ("triples", "pairs"):
    digest.update(files.read_text(paths[kind]).encode())
  suffix = digest.hexdigest()[:16]
  names = {"triples": f"dro_jax_demo_samples_{suffix}", "pairs": f"dro_jax_demo_pairs_{suffix}"}
  tasks.register_single_trajectory_task(names["triples"], {"train": paths["triples"]},
                                        vocabulary_path, overwrite=True, **lengths)
  tasks.register_pairwise_task(names["pairs"], {"train": paths["pairs"]}, vocabulary_path,
                               overwrite=True, **lengths)
  return names


class FinalEvaluation:
  """Each method side by side against SFT on the held-out prompts; SFT's answers sampled once
  (the same seed for every method) and each method's result cached in its stage's workdir."""

  def __init__(self, demo, sft: evaluation.Policy, vocabulary):
    from dro_jax.data import synthetic
    settings = demo.demo
    self.demo, self.sft, self.vocabulary = demo, sft, vocabulary
    self.prompts = synthetic.eval_prompts(settings.eval_prompts, demo.seed)
    self.sampling = decoding.SamplingParams(max_decode_length=settings.max_decode_length,
                                            temperature=1.0, num_samples=settings.final_samples)
    self.seeds = {"policy_seed": 2 * demo.seed + 11, "baseline_seed": 2 * demo.seed + 12}
    self.baseline_samples = None
    self.judge_spec = demo.evaluation.judge or "demo"
    self.judge = judges.on_process_zero(judges.judge_from_spec(
        self.judge_spec, **judges.judge_options(
            demo.evaluation, max_calls=demo.evaluation.get("judge_max_calls") or 0)))
    self.debias = bool(demo.evaluation.debias)

  def __call__(self, policy: evaluation.Policy, workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "evaluation.json")
    if os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      # Judged again when the judge or its debiasing changed (or by an older version).
      if (cached.get("judge") == self.judge_spec and cached.get("debias") == self.debias
          and "samples_per_prompt" in cached):
        return cached
    if self.baseline_samples is None:
      self.baseline_samples = evaluation.sample_baseline(
          self.sft, self.vocabulary, self.prompts, sampling=self.sampling,
          baseline_seed=self.seeds["baseline_seed"], max_input_length=self.demo.max_input_length)
    metrics = evaluation.evaluate_policies(
        policy, self.sft, self.vocabulary, self.prompts, self.judge,
        sampling=self.sampling, max_input_length=self.demo.max_input_length,
        baseline_samples=self.baseline_samples, debias=self.debias, **self.seeds)
    metrics = {key: value for key, value in metrics.items() if key != "samples"}
    metrics.update(judge=self.judge_spec, debias=self.debias)
    files.write_text_once(path, json.dumps(metrics, indent=2))
    return metrics


# ------------------------------------------------------------------------------------ results


def curves(workdir: str) -> dict[str, np.ndarray]:
  """The periodic evaluations of a stage: step, win rate with its interval, judge reward and
  KL(π‖SFT) in nats per answer (from the policy's own samples) with its standard error."""
  rows = [row for row in train_rows(workdir) if "eval/win_rate" in row]
  keys = {"step": "step", "win_rate": "eval/win_rate", "low": "eval/win_rate_low",
          "high": "eval/win_rate_high", "reward": "eval/policy_reward", "kl": "eval/kl",
          "kl_stderr": "eval/kl_stderr", "baseline_reward": "eval/baseline_reward"}
  return {name: np.array([row.get(key, np.nan) for row in rows]) for name, key in keys.items()}


def train_rows(workdir: str) -> list[dict[str, Any]]:
  """One row per step (the last values written for it: replayed steps supersede)."""
  return files.metrics_rows(os.path.join(workdir, "metrics.jsonl"))


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  lines = ["| method | win rate vs SFT [95% CI] | judge reward | KL(π‖SFT) | length | cut at max |",
           "|---|---|---|---|---|---|"]
  baseline = next(iter(results.values()), None)
  if baseline is not None:
    lines.append(f"| SFT | 50% (itself) | {baseline['baseline_reward']:.3f} | 0 | "
                 f"{baseline['baseline_length']:.2f} | {baseline['baseline_truncated']:.1%} |")
  for method, metrics in results.items():
    lines.append(
        f"| {LABELS[method]} | {metrics['win_rate']:.1%} [{metrics['win_rate_low']:.1%}, "
        f"{metrics['win_rate_high']:.1%}] | {metrics['policy_reward']:.3f} | "
        f"{metrics['kl']:.3f} | {metrics['policy_length']:.2f} | "
        f"{metrics['policy_truncated']:.1%} |")
  return "\n".join(lines)


def plot(results_curves: Mapping[str, Mapping[str, np.ndarray]], path: str, *,
         title: str = "dro_jax demo: each method against SFT during training") -> None:
  """results.png: win rate against SFT (95% interval), the judge's mean reward and KL(π‖SFT),
  side by side, over training steps (step 0: SFT itself)."""
  # A Figure with its own Agg canvas, not pyplot: the caller's backend (a notebook's) is kept.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(15, 4.6), layout="constrained")
  FigureCanvasAgg(figure)
  draw_curves(figure, results_curves, title=title)
  figure.savefig(path, dpi=100)


def draw_curves(figure, results_curves: Mapping[str, Mapping[str, np.ndarray]], *,
                title: str) -> None:
  """The three panels of `plot` on `figure` (a notebook draws them on its own figure)."""
  from matplotlib.ticker import PercentFormatter
  win, reward, kl = figure.subplots(1, 3)
  for method, curve in results_curves.items():
    if not curve["step"].size:
      continue
    label = LABELS.get(method, method)
    # Step 0 is SFT itself: 50% against itself, KL 0, SFT's reward on the same prompts.
    start = lambda values, at_sft: np.concatenate([[at_sft], values])
    steps = start(curve["step"], 0)
    line, = win.plot(steps, start(curve["win_rate"], 0.5), marker="o", label=label)
    color = line.get_color()
    win.fill_between(steps, start(curve["low"], 0.5), start(curve["high"], 0.5), alpha=0.2,
                     color=color)
    reward.plot(steps, start(curve["reward"], curve["baseline_reward"][0]), marker="o",
                label=label, color=color)
    kl.errorbar(steps, start(curve["kl"], 0.0),
                yerr=1.96 * np.nan_to_num(start(curve["kl_stderr"], 0.0)), marker="o", capsize=3,
                label=label, color=color)
  win.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="SFT (50%)")
  win.yaxis.set_major_formatter(PercentFormatter(1.0))
  win.set(xlabel="training step", ylabel="win rate vs SFT (%, 95% interval)", ylim=(0, 1),
          title="win rate against SFT")
  reward.set(xlabel="training step", ylabel="mean judge reward (0 to 1)",
             title="judge reward of the policy's answers")
  kl.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
  kl.set(xlabel="training step", ylabel="KL(π‖SFT) (nats per answer)",
         title="KL from SFT (±95%)")
  win.legend(loc="lower right")
  figure.suptitle(title)


def write_results(workdir: str, demo, results, results_curves) -> str:
  table = results_table(results)
  settings = demo.demo
  text = (f"# dro_jax demo results (seed {demo.seed})\n\n"
          f"SFT {settings.sft_steps} steps; {settings.feedback_prompts} feedback prompts x "
          f"{settings.samples_per_prompt} SFT samples judged; each method {settings.align_steps} "
          f"steps from SFT; {settings.eval_prompts} held-out prompts x {settings.final_samples} "
          f"samples per side at temperature 1, judged side by side (ties half; 95% intervals "
          f"clustered by prompt)"
          + (" — CONTROL: rewards negated" if settings.negate_rewards else "") + ".\n\n"
          f"{table}\n\n![win rate, judge reward and KL over training](results.png)\n")
  if jax.process_index() == 0:  # on a pod, process 0 writes the results once
    files.write_text(os.path.join(workdir, "results.md"), text)
    files.write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    plot(results_curves, os.path.join(workdir, "results.png"), title=plot_title(demo))
  distributed.barrier("the demo wrote its results")
  return table


def plot_title(demo: ml_collections.ConfigDict) -> str:
  settings = demo.demo
  return (f"dro_jax demo (seed {demo.seed}): each method from SFT, judged against SFT on "
          f"{settings.eval_prompts} held-out prompts every "
          f"{max(settings.align_steps // settings.evaluations, 1)} steps"
          + (" (CONTROL: rewards negated)" if settings.negate_rewards else ""))


def synthetic_tasks(demo: ml_collections.ConfigDict) -> dict[str, str]:
  """The demo task's seqio Tasks (its demonstrations for SFT among them), registered."""
  from dro_jax.data import synthetic
  return synthetic.register_demo_tasks(demo.data.cache_dir, sft_examples=demo.demo.sft_examples)


def _feedback_task(feedback: Mapping[str, str], method: str) -> str:
  return feedback["pairs"] if method in ("dpo", "tr_dpo") else feedback["triples"]


# ----------------------------------------------------------------------------- worker processes
# A stage in a worker stops as `train.run` does in the demo's process: on SIGTERM or SIGINT it
# saves the step it is at and stops, and a restart resumes it. The demo passes its signals on to
# its workers and waits for their saves; a worker whose demo is gone exits after its save.

STOP_TIMEOUT_S = 60.0  # how long the demo waits for its workers to save and exit
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_PARENT: int | None = None  # in a worker: the demo's process id
_STOP_REQUESTED = False  # in a worker: a signal came (no later stage starts)
_IN_STAGE = False  # in a worker: a stage is running
_PASSING_ON = False  # in a worker: a thread hands the request on to the stage's training loop


class StagesPreempted(train.Preempted):
  """SIGTERM or SIGINT while the alignment stages trained in worker processes: each saved the
  step it was at (main exits 143) and the same command resumes them."""

  def __init__(self, message: str):
    Exception.__init__(self, message)
    self.step = None


def _parent_gone() -> bool:
  return _PARENT is not None and os.getppid() != _PARENT


def _exit_worker() -> None:
  """Ends a worker whose demo is gone at once, handing nothing back (nobody would read it)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(143)


def _stop_with_parent(parent: int) -> None:
  """A worker's initializer. The worker gets SIGTERM when the demo's process dies (Linux), and
  SIGTERM or SIGINT stops its stage at the next step, saved, and any later stage before it starts:
  a killed demo leaves no stage running on, and a restart resumes it."""
  global _PARENT
  _PARENT = parent
  for signum in _STOP_SIGNALS:
    signal.signal(signum, _worker_signal)
  # Spawned with them blocked: one that came while it started up is handled now.
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if _parent_gone():  # the demo died before the prctl
    _exit_worker()


def _worker_signal(signum, frame) -> None:
  """A worker's SIGTERM and SIGINT handler (train.run's own replaces it for SIGTERM while a
  stage's training loop runs)."""
  del signum, frame
  global _STOP_REQUESTED, _PASSING_ON
  _STOP_REQUESTED = True
  if not _IN_STAGE:  # between stages: nothing to save
    if _parent_gone():
      _exit_worker()
    return
  if not _PASSING_ON:
    _PASSING_ON = True
    threading.Thread(target=_pass_stop_to_training, daemon=True).start()


def _pass_stop_to_training() -> None:
  """SIGTERM to this worker once train.run's handler is in place (or at once when it is: a
  SIGINT): the training loop saves its step and raises Preempted. Nothing if the stage ends."""
  global _PASSING_ON
  while _IN_STAGE:
    if signal.getsignal(signal.SIGTERM) is not _worker_signal:
      os.kill(os.getpid(), signal.SIGTERM)
      break
    time.sleep(0.05)
  _PASSING_ON = False


def _stage_in_worker(demo: ml_collections.ConfigDict, method: str, paths: Mapping[str, str],
                     workdir: str) -> tuple[str, int | None]:
  """One alignment stage in a worker process; its console output goes to <stage>/stage.log.
  ("trained", None), ("saved", step) when a signal stopped it, or ("not started", None) after
  one; a worker whose demo is gone exits (143) instead of handing back."""
  global _IN_STAGE
  _IN_STAGE = True  # before the check: a signal from here on reaches the stage
  try:
    outcome = ("not started", None) if _STOP_REQUESTED else _align(demo, method, paths, workdir)
  except BaseException:
    if _parent_gone():
      traceback.print_exc()
      _exit_worker()
    raise
  finally:
    _IN_STAGE = False
  if _parent_gone():
    _exit_worker()
  return outcome


def _align(demo: ml_collections.ConfigDict, method: str, paths: Mapping[str, str],
           workdir: str) -> tuple[str, int | None]:
  global _STOP_REQUESTED
  from dro_jax.data import synthetic
  stage = os.path.join(workdir, method)
  os.makedirs(stage, exist_ok=True)
  log = os.open(os.path.join(stage, "stage.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(log, 1)
  os.dup2(log, 2)
  os.close(log)
  synthetic_tasks(demo)
  feedback = register_feedback(paths, synthetic.demo_vocabulary(demo.data.cache_dir), demo)
  sft = os.path.join(workdir, "sft")
  os.environ[console.PROGRESS_ENV] = progress_path(stage)  # the demo's line of this stage
  try:
    run_stage(method, stage_config(demo, method, _feedback_task(feedback, method), init=sft,
                                   baseline=sft), stage)
  except train.Preempted as preempted:
    _STOP_REQUESTED = True
    return "saved", preempted.step
  return "trained", None


class _ForwardedStop:
  """The demo's SIGTERM and SIGINT while its workers train: passed on to them as SIGTERM."""

  def __init__(self):
    self.reason: str | None = None  # what asked the stages to stop
    self.deadline = 0.0
    self.pids: list[int] = []
    self._previous = {}

  def __enter__(self) -> "_ForwardedStop":
    for signum in _STOP_SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._signal)
      except ValueError:  # not the main thread (a notebook's worker thread): left as they are
        break
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)

  def _signal(self, signum, frame) -> None:
    del frame
    self.request(signal.Signals(signum).name)

  def request(self, reason: str) -> None:
    if self.reason is None:
      self.reason, self.deadline = reason, time.monotonic() + STOP_TIMEOUT_S
    self.forward()

  def watch(self, pids: list[int]) -> None:
    self.pids = list(pids)
    if self.reason is not None:
      self.forward()

  def forward(self) -> None:
    for pid in self.pids:
      try:
        os.kill(pid, signal.SIGTERM)
      except ProcessLookupError:
        pass


def run_stages_in_workers(demo: ml_collections.ConfigDict, methods: list[str],
                          paths: Mapping[str, str], workdir: str) -> None:
  """The alignment stages `methods`, `demo.demo.workers` at a time in worker processes (each
  stage is the same `train.run` as in-process; they only share the SFT policy and the samples).

  SIGTERM or SIGINT goes on to the workers: each saves the step it is at; after at most
  STOP_TIMEOUT_S, StagesPreempted (main exits 143), with no worker left behind.
  """
  import concurrent.futures
  import multiprocessing
  from multiprocessing import resource_tracker
  workers = min(demo.demo.workers, len(methods))
  print(f"[demo] training {', '.join(LABELS[m] for m in methods)}, {workers} at a time in worker "
        f"processes (logs: <stage>/stage.log); each stage's line follows its final judging",
        flush=True)
  board = _stage_board(demo, methods, workdir)
  with _ForwardedStop() as stop:
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_stop_with_parent, initargs=(os.getpid(),))
    try:
      # The workers start with SIGTERM and SIGINT blocked (inherited), not killed half started:
      # their initializer handles a signal that came meanwhile. (Starting multiprocessing's
      # resource tracker unblocks them: it is started first.)
      resource_tracker.ensure_running()
      mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
      try:
        futures = {pool.submit(_stage_in_worker, demo, method, dict(paths), workdir): method
                   for method in methods}
        processes = list(pool._processes.values())  # all started: one per submit up to workers
        stop.watch([process.pid for process in processes])
      finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
      pending = set(futures)
      while pending and stop.reason is None:
        board.poll()
        done, pending = concurrent.futures.wait(
            pending, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          if stop.reason is not None:  # the stages' outcomes are told below
            break
          outcome, _ = future.result()  # a stage's error is raised here
          if outcome != "trained":  # its worker alone was signalled: the other stages stop too
            stop.request(f"{futures[future]}'s worker was signalled")
    except BaseException:
      board.close()
      pool.shutdown(wait=True)
      raise
    board.close()
    if stop.reason is None:
      pool.shutdown(wait=True)
      return
    raise _stop_stages(pool, processes, futures, stop)


PROGRESS_EVERY_S = 30.0  # a stage's progress line when the console is not a terminal


def progress_path(stage: str) -> str:
  """The progress file a stage's worker writes (console.ProgressFile)."""
  return os.path.join(stage, "progress.json")


def _stage_board(demo: ml_collections.ConfigDict, methods: list[str],
                 workdir: str) -> console.StageBoard:
  """The demo's live lines while the workers train: one per stage (step/total, steps/s, time
  left), rewritten in place on a terminal, printed every PROGRESS_EVERY_S seconds otherwise."""
  stages = {}
  for method in methods:
    path = progress_path(os.path.join(workdir, method))
    if os.path.exists(path):  # an earlier run's: the stage shows as waiting until it steps
      os.remove(path)
    stages[f"[demo] {LABELS[method]}"] = (path, int(demo.demo.align_steps))
  return console.StageBoard(stages, plain_every_s=PROGRESS_EVERY_S)


def _stop_stages(pool, processes, futures, stop: _ForwardedStop) -> StagesPreempted:
  """Waits (until the stop's deadline) for the workers to save and exit, kills any left."""
  import concurrent.futures
  from multiprocessing import connection
  print(f"[demo] {stop.reason}: the alignment stages save their steps and stop", flush=True)
  for future in futures:
    future.cancel()  # the stages no worker took yet
  concurrent.futures.wait(futures, timeout=max(stop.deadline - time.monotonic(), 0))
  pool.shutdown(wait=False, cancel_futures=True)
  alive = {process.sentinel: process for process in processes}
  exit_by = max(stop.deadline, time.monotonic() + 10)  # a worker that has handed back exits
  while alive and time.monotonic() < exit_by:
    for sentinel in connection.wait(list(alive), timeout=exit_by - time.monotonic()):
      del alive[sentinel]
  for process in alive.values():
    process.kill()
  connection.wait(list(alive), timeout=10)
  states = []
  for future, method in futures.items():
    if future.cancelled():
      states.append(f"{method} not started")
    elif not future.done():
      states.append(f"{method} killed after {STOP_TIMEOUT_S:.0f} s (its last checkpoint stays)")
    elif future.exception(timeout=0) is not None:
      states.append(f"{method} stopped ({type(future.exception(timeout=0)).__name__})")
    else:
      outcome, step = future.result(timeout=0)
      states.append(f"{method} saved at step {step}" if outcome == "saved" else
                    f"{method} {outcome}")
  return StagesPreempted(f"preempted: {', '.join(states)}; the same command resumes them")


def run(demo: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Runs (or finishes) every stage; returns {method: evaluation metrics against SFT}."""
  import seqio
  from dro_jax.data import synthetic
  names = synthetic_tasks(demo)
  vocabulary_path = synthetic.demo_vocabulary(demo.data.cache_dir)
  vocabulary = seqio.SentencePieceVocabulary(vocabulary_path)
  stage_dir = lambda name: os.path.join(workdir, name)

  methods = demo.demo.methods
  settings = demo.demo
  print(f"[demo] in {workdir}: SFT {settings.sft_steps} steps, its samples judged, then "
        f"{', '.join(LABELS[m] for m in methods)} {settings.align_steps} steps each "
        f"(stages finished in an earlier run are reused)", flush=True)
  timing = run_stage("sft", stage_config(demo, "sft", names["sft"], init=None, baseline=None),
                     stage_dir("sft"))
  print(stage_line("sft", timing), flush=True)
  sft = load_policy(stage_dir("sft"), demo)
  paths = sample_feedback(demo, sft, vocabulary, stage_dir("samples"))
  feedback = register_feedback(paths, vocabulary_path, demo)
  results, results_curves = {}, {}
  final_evaluation = FinalEvaluation(demo, sft, vocabulary)
  pending = [m for m in methods if not finished(stage_dir(m), demo.demo.align_steps)]
  in_workers = set()
  # Worker processes train stages side by side on one host; the processes of a pod train each
  # stage together over their one mesh instead.
  if demo.demo.workers > 1 and len(pending) > 1 and jax.process_count() == 1:
    run_stages_in_workers(demo, pending, paths, workdir)
    in_workers = set(pending)
  for method in methods:
    config = stage_config(demo, method, _feedback_task(feedback, method), init=stage_dir("sft"),
                          baseline=stage_dir("sft"))
    timing = run_stage(method, config, stage_dir(method))
    if method in in_workers:  # trained by this run, in a worker process
      timing["earlier"] = False
    policy = load_policy(stage_dir(method), demo)
    results[method] = final_evaluation(policy, stage_dir(method))
    results_curves[method] = curves(stage_dir(method))
    print(stage_line(method, timing, results[method]), flush=True)
  table = write_results(workdir, demo, results, results_curves)
  print(table, flush=True)
  print(f"[demo] results in {os.path.join(workdir, 'results.md')}", flush=True)
  return results
