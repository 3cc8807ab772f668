"""Per-chip memory of a recipe's train step on a TPU slice, compiled here on the CPU.

  python -m dro_jax.sizing --config configs/dro.py:size=xl --topology v5e:4x8 \\
      --config.mesh_shape='(1,32,1)' [--config.num_microbatches=4] [--json sizing.json]

Nothing is allocated: the train state and the batch are ShapeDtypeStructs with the run's
shardings (`initialization.state_layout`, `partitioning.batch_shardings`), the step is the engine's own
(`step.make_train_step` through `partitioning.jit_step`: the same shardings and donation), and the
mesh (`config.mesh_shape`, one entry may be -1) is laid over the devices of a TPU topology that
libtpu describes without any TPU present (`pip install -e '.[tpu]'`). XLA's `memory_analysis()`
of that compile gives the per-chip bytes:

    per chip = arguments + outputs - aliased (the donated state, not counted twice)
               + temporaries + generated code

The arguments are split into parameters, optimizer state, the reference copy and the batch (from
the shardings); the temporaries are activations, gradients and the optimizer's work space. The
sequence lengths default to 512 / 256 for every size but tiny (whose 16 / 12 hide activation
memory); `--input_length` / `--target_length`, or `--config.max_input_length=...`, change them.
When the step does not fit the chip's HBM, the report lists what would (a wider fsdp axis, a
bfloat16 reference, more microbatches, rematerialisation) with ESTIMATED per-chip sizes: state
scales with 1/fsdp, activations with 1/microbatches; recompile with the flags to measure.
Progress goes to stderr while it compiles. A step the compiler refuses even without the HBM limit
ends in one line naming the smallest slice of the chip whose chips hold its state (estimated from
the shardings, activations on top).

The roofline (`roofline`; `--noroofline` leaves it out), per chip, an estimate from the compiled
program and not a measurement: FLOPs per step from XLA's cost analysis of the lowered step (the
compiled TPU program's own count misses the work in loops the compiler makes), bytes of HBM
traffic from the compiled step's cost analysis, bytes sent by its collectives (ring algorithm,
from the compiled module), a lower bound on the
step time max(FLOPs / peak, HBM bytes / HBM bandwidth, 2 x bytes sent / ICI bandwidth), and the
MFU ceiling it implies. XLA counts a loop body once, so a step with scanned layers or microbatches
is measured by the same step compiled unrolled with one microbatch at 1 and 2 layers,
extrapolated in depth. The chips' published peaks (CHIP_PEAKS; Cloud TPU system architecture
pages, docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e), per chip:

    chip   bf16 peak      HBM bandwidth   ICI bandwidth (bidirectional)
    v4     275 TFLOP/s    1200 GB/s       not published there (no ICI bound)
    v5e    197 TFLOP/s     819 GB/s        400 GB/s
    v5p    459 TFLOP/s    2765 GB/s       1200 GB/s
    v6e    918 TFLOP/s    1638 GB/s        800 GB/s
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Mapping, Sequence

from dro_jax import own_package

own_package.repair()  # run from the clone's parent folder, dro_jax/configs.py stays itself

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

GIB = 2 ** 30
# HBM per chip, GiB (Cloud TPU system architecture pages).
CHIP_HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
MEGACORE_CHIPS = frozenset({"v4", "v5p"})  # two TensorCores per chip, one JAX device
DEFAULT_LENGTHS = (512, 256)  # (inputs, targets) assumed for every size but tiny
HEADROOM = 0.9  # suggestions aim at 90% of HBM: XLA's runtime and fragmentation need some room
REMAT_ACTIVATION_FACTOR = 1 / 3  # rough estimate of what full remat keeps of the activations
_HBM_OPTION = "xla_tpu_max_hbm_size_mib"  # libtpu's compiler option: the HBM a program may use
UNLIMITED_HBM_MIB = 1 << 22  # 4 TiB: measure a step that does not fit


@dataclasses.dataclass
class Report:
  """Per-chip bytes of one compiled train step and the assumptions it was compiled with."""

  config: str
  topology: str
  chip: str
  devices: int
  hbm_bytes: int
  loss: str
  preset: str
  mesh: dict[str, int]
  batch_size: int
  num_microbatches: int
  input_length: int
  target_length: int
  compute_dtype: str
  reference_dtype: str | None  # None when the state holds no reference parameters
  reference_cached: bool  # a frozen reference's log-probs come with the batch (reference_cache)
  model_options: dict[str, Any]  # remat / scan_layers when the model has them
  # memory_analysis() of the compile, per chip
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int
  # the arguments split by what they hold, per chip (from the shardings)
  parameters: int
  optimizer_state: int
  reference: int
  batch: int
  # the TPU compiler's refusal at the chip's HBM (the numbers are then of a compile without it)
  compiler_error: str | None = None
  suggestions: list[str] = dataclasses.field(default_factory=list)
  plan: dict[str, Any] = dataclasses.field(default_factory=dict)
  roofline: dict[str, Any] = dataclasses.field(default_factory=dict)  # see `roofline`

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm_bytes and self.compiler_error is None

  @property
  def state(self) -> int:
    return self.parameters + self.optimizer_state + self.reference

  def to_dict(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data.update(total=self.total, fits=self.fits, state=self.state,
                total_gib=self.total / GIB, hbm_gib=self.hbm_bytes / GIB)
    return data


# ------------------------------------------------------------------------------------- topology


def chip_of(topology: str) -> str:
  """"v5e:4x8" -> "v5e"."""
  return topology.split(":", 1)[0].lower()


def hbm_bytes_of(topology: str) -> int:
  chip = chip_of(topology)
  if chip not in CHIP_HBM_GIB:
    raise ValueError(f"topology {topology!r}: unknown chip {chip!r}; known: "
                     f"{sorted(CHIP_HBM_GIB)} (or give the HBM with hbm_gib)")
  return int(CHIP_HBM_GIB[chip] * GIB)


@functools.lru_cache(maxsize=None)
def topology_devices(topology: str) -> tuple[Any, ...]:
  """The devices of a TPU slice (e.g. "v5e:4x8"), described by libtpu with no TPU present."""
  # Without these libtpu looks for a TPU VM's metadata and prints warnings about it, and takes
  # its one-process lock (/tmp/libtpu_lockfile), which only matters for real chips: two sizing
  # runs (or tests) at once would otherwise fail.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401
  except ImportError as error:
    raise RuntimeError("sizing for a TPU topology needs libtpu: pip install -e '.[tpu]'") from error
  from jax.experimental import topologies
  # v4 and v5p chips hold two TensorCores that JAX drives as one device ("megacore"): one
  # device per chip, as on the real slice (libtpu's default description has one per core).
  options = {"chip_config_name": "megacore"} if chip_of(topology) in MEGACORE_CHIPS else {}
  from dro_jax import console
  try:
    with console.filtered_stderr():  # libtpu's notices about the TPU VM it is not on
      description = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 **options)
  except Exception as error:  # libtpu's INVALID_ARGUMENT for a slice it does not know
    raise ValueError(f"topology {topology!r}: libtpu cannot describe it: "
                     f"{str(error).splitlines()[0]}") from error
  return tuple(description.devices)


# ---------------------------------------------------------------------------------------- batch


def is_tiny(config) -> bool:
  return str(config.model.preset).endswith("tiny")


def batch_spec(config, *, reference_cached: bool) -> dict[str, Any]:
  """ShapeDtypeStructs of the batch the train step of `config.loss` receives: the data
  converter's model features at the config's lengths, less the host-side ids, plus the cached
  reference log-probs (and KTO's data-level partners) when the reference cache is on."""
  import jax
  import numpy as np

  from dro_jax import datasets, reference_cache
  from dro_jax.data import converters
  pairwise = datasets.loss_kind(config) == "pairs"
  cache_kind = reference_cache.KINDS.get(config.loss) if reference_cached else None
  converter = converters.feature_converter("pairwise" if pairwise else "single_trajectory",
                                           with_partners=cache_kind == "kto")
  lengths = converter.get_model_feature_lengths(
      converter.complete_lengths(datasets.feature_lengths(config)))
  rows = int(config.batch_size)
  batch = {}
  for key, spec in converter.MODEL_FEATURES.items():
    dtype = np.dtype(spec.dtype.as_numpy_dtype)
    if key in datasets.HOST_KEYS or dtype.kind not in "biuf":
      continue
    shape = (rows,) if spec.rank == 0 else (rows, lengths[key])
    batch[key] = jax.ShapeDtypeStruct(shape, dtype)
  if cache_kind is not None:
    for key in reference_cache.VALUE_KEYS[cache_kind]:
      batch[key] = jax.ShapeDtypeStruct((rows,), np.float32)
  return batch


# -------------------------------------------------------------------------------------- compile


def _shard_bytes(abstract: Any, shardings: Any) -> int:
  import jax
  import numpy as np
  leaves = jax.tree.leaves(abstract)
  layouts = jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
  return int(sum(np.prod(s.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x, s in zip(leaves, layouts)))


def _with_sharding(abstract: Any, shardings: Any) -> Any:
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def prepare_config(config, *, input_length: int | None = None,
                   target_length: int | None = None, num_microbatches: int | None = None):
  """A copy of `config` with the given lengths / microbatches (None: the config's own)."""
  config = config.copy_and_resolve_references()
  if config.loss == "preference_model":
    # The answer tokens' ids come from the task's vocabulary at run time; any ids give the same
    # program and memory, so sizing needs no vocabulary.
    for key, token in (("a_token", 3), ("b_token", 4)):
      if config.preference[key] is None:
        config.preference[key] = token
  if input_length is not None:
    config.max_input_length = int(input_length)
  if target_length is not None:
    config.max_target_length = int(target_length)
  if num_microbatches is not None:
    config.num_microbatches = int(num_microbatches)
  return config


class DoesNotCompile(ValueError):
  """The step was refused at the chip's HBM and again without the limit (`message`: the
  compiler's first line)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


def progress(message: str) -> None:
  """One line of progress on stderr (the report itself goes to stdout)."""
  print(f"[sizing] {message}", file=sys.stderr, flush=True)


class _Compiling:
  """Says what is compiling, then every `every` seconds that it still is, then how long it took."""

  def __init__(self, message: str, every: float = 30.0):
    import threading
    self.message, self.every = message, every
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def _beat(self) -> None:
    import time
    begin = time.perf_counter()
    while not self._done.wait(self.every):
      progress(f"  still compiling ({time.perf_counter() - begin:.0f} s)")

  def __enter__(self):
    import time
    self.begin = time.perf_counter()
    progress(self.message)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    import time
    self._done.set()
    self._thread.join()
    if exc[0] is None:
      progress(f"  compiled in {time.perf_counter() - self.begin:.1f} s")


def _compile_with(lowered, options: dict[str, Any], message: str):
  with _Compiling(message):
    return lowered.compile(compiler_options=options)


def _compile(lowered, hbm_bytes: int | None):
  """(executable, None), or where the step needs more than the chip's HBM (the TPU compiler
  refuses it: RESOURCE_EXHAUSTED) the executable compiled without that limit, so its memory
  can still be read, and the compiler's message. DoesNotCompile when that compile fails too."""
  import jax
  limit = {} if hbm_bytes is None else {_HBM_OPTION: max(int(hbm_bytes) // 2 ** 20, 1)}
  # Executables for a described topology cannot be loaded back from the persistent cache, so
  # it is off for these compiles (reset_cache: JAX decides once per process whether to use it).
  from jax.experimental.compilation_cache import compilation_cache
  cache = jax.config.jax_enable_compilation_cache
  reset = compilation_cache.reset_cache if jax.config.jax_compilation_cache_dir else lambda: None
  jax.config.update("jax_enable_compilation_cache", False)
  reset()
  try:
    try:
      return _compile_with(lowered, limit, "compiling the train step" + (
          f" within {_gib(hbm_bytes)} of HBM" if hbm_bytes else "")), None
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      message = str(error).split("\n")[0]
    try:
      return _compile_with(lowered, {_HBM_OPTION: UNLIMITED_HBM_MIB},
                           "it does not fit; compiling again without the HBM limit to measure "
                           "it"), message
    except jax.errors.JaxRuntimeError as error:
      raise DoesNotCompile(str(error).split("\n")[0]) from error
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    reset()


def state_bytes(config, topology: str) -> dict[str, int]:
  """Per-chip bytes of the train state's parameters, optimizer state and reference copy on
  `topology`, from the shardings alone (no compile: seconds even for T5-XXL). The gradients, in
  the temporaries, are at least as large as the parameters."""
  from dro_jax import initialization, partitioning, reference_cache
  from dro_jax import step as step_lib
  mesh = partitioning.make_mesh(tuple(config.mesh_shape), devices=topology_devices(topology))
  rules = partitioning.rules_from_config(config)
  abstract, shardings = initialization.state_layout(config, step_lib.t5_config(config), mesh,
                                                    rules,
                                           with_reference=not reference_cache.enabled(config))
  return {"parameters": _shard_bytes((abstract.policy, abstract.value),
                                     (shardings.policy, shardings.value)),
          "optimizer_state": _shard_bytes((abstract.policy_opt, abstract.value_opt),
                                          (shardings.policy_opt, shardings.value_opt)),
          "reference": _shard_bytes(abstract.reference, shardings.reference)}


def compile_step(config, topology: str, hbm_bytes: int | None = None):
  """(compiled train step, its Report without suggestions) of `config` on `topology`.

  `hbm_bytes`: the HBM the compiler may use (default: the chip's). A step that needs more is
  compiled again without the limit to measure it; `Report.compiler_error` says so."""
  import jax

  from dro_jax import partitioning, reference, reference_cache
  from dro_jax import step as step_lib
  devices = topology_devices(topology)
  mesh = partitioning.make_mesh(tuple(config.mesh_shape), devices=devices)
  rules = partitioning.rules_from_config(config)
  model_config = step_lib.t5_config(config)
  partitioning.validate(mesh, batch_size=config.batch_size,
                        num_microbatches=config.num_microbatches,
                        num_heads=model_config.num_heads)
  lowered, abstract, shardings, batch = _lower(config, mesh, rules)
  cached = reference_cache.enabled(config)
  compiled, compiler_error = _compile(lowered, hbm_bytes)
  stats = compiled.memory_analysis()
  uses_reference = abstract.reference is not None
  model_options = {key: config.model[key] for key in ("remat", "scan_layers")
                   if key in config.model}
  report = Report(
      config="", topology=topology, chip=chip_of(topology), devices=len(devices),
      hbm_bytes=0, loss=config.loss, preset=config.model.preset,
      mesh={name: int(size) for name, size in mesh.shape.items()},
      batch_size=int(config.batch_size), num_microbatches=int(config.num_microbatches),
      input_length=int(config.max_input_length), target_length=int(config.max_target_length),
      compute_dtype=str(model_config.dtype),
      reference_dtype=str(reference.dtype_from_config(config)) if uses_reference else None,
      reference_cached=bool(cached and step_lib.OBJECTIVES[config.loss].uses_reference),
      model_options=model_options,
      arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
      aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
      code=int(stats.generated_code_size_in_bytes),
      parameters=_shard_bytes((abstract.policy, abstract.value),
                              (shardings.policy, shardings.value)),
      optimizer_state=_shard_bytes((abstract.policy_opt, abstract.value_opt),
                                   (shardings.policy_opt, shardings.value_opt)),
      reference=_shard_bytes(abstract.reference, shardings.reference) if uses_reference else 0,
      batch=_shard_bytes(batch, partitioning.batch_shardings(batch, mesh)),
      compiler_error=compiler_error)
  return compiled, report


def size(config, topology: str, *, input_length: int | None = None,
         target_length: int | None = None, hbm_gib: float | None = None,
         name: str = "", with_roofline: bool = True) -> Report:
  """Compiles `config`'s train step for `topology` and reports its per-chip memory, with
  suggestions when it does not fit (`hbm_gib` overrides the chip's HBM), and its roofline
  (`roofline`; with_roofline=False leaves it out and compiles nothing more)."""
  config = prepare_config(config, input_length=input_length, target_length=target_length)
  hbm_bytes = int(hbm_gib * GIB) if hbm_gib else hbm_bytes_of(topology)
  try:
    compiled, report = compile_step(config, topology, hbm_bytes if hbm_gib else None)
  except DoesNotCompile as error:
    from dro_jax import errors
    raise errors.UserError(f"the train step does not compile for {topology} even without the "
                           f"HBM limit ({error.message}); "
                           f"{smallest_topology_line(config, topology, hbm_bytes)}") from error
  report.config = name
  report.hbm_bytes = hbm_bytes
  report.suggestions, report.plan = suggest(report, config)
  if with_roofline and chip_of(topology) in CHIP_PEAKS:
    report.roofline = roofline(config, topology, compiled)
  return report


# Slices of each chip, smallest first (what `smallest_topology` tries).
SLICES = {
    "v5e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v6e": ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
}
SLICES["v5litepod"] = SLICES["v5e"]


def smallest_topology(config, topology: str, hbm_bytes: int) -> tuple[str, int] | None:
  """(the smallest slice of `topology`'s chip with more chips than it whose chips hold the
  state and its gradients under fsdp over every chip, within HEADROOM of the HBM; those bytes per
  chip), from the shardings alone (no compile). An estimate: activations come on top."""
  chip = chip_of(topology)
  current = len(topology_devices(topology))
  for shape in SLICES.get(chip, ()):
    candidate = f"{chip}:{shape}"
    try:
      devices = len(topology_devices(candidate))
      if devices <= current:
        continue
      wide = config.copy_and_resolve_references()
      wide.mesh_shape = (1, devices, 1)
      sizes = state_bytes(wide, candidate)
    except Exception:  # a slice libtpu or the model's shapes do not allow: the next one
      continue
    need = sizes["parameters"] * 2 + sizes["optimizer_state"] + sizes["reference"]
    if need <= HEADROOM * hbm_bytes:
      return candidate, need
  return None


def smallest_topology_line(config, topology: str, hbm_bytes: int) -> str:
  found = smallest_topology(config, topology, hbm_bytes)
  if found is None:
    largest = f"{chip_of(topology)}:{SLICES.get(chip_of(topology), ('?',))[-1]}"
    return (f"no {chip_of(topology)} slice up to {largest} holds its state: a smaller model, "
            f"shorter sequences or a chip with more HBM")
  candidate, need = found
  devices = len(topology_devices(candidate))
  return (f"the smallest slice whose chips hold its state and gradients is {candidate} "
          f"(~{_gib(need)} per chip with fsdp over all {devices} chips; activations come on "
          f"top): --topology={candidate} --config.mesh_shape='(1,{devices},1)'")


# ------------------------------------------------------------------------------------- roofline

# Published per-chip peaks: (bf16 FLOP/s, HBM bytes/s, bidirectional ICI bytes/s), from the Cloud
# TPU system architecture pages (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p-training, /v6e,
# as read in December 2026). v4's page gives no per-chip ICI figure: no ICI bound there.
CHIP_PEAKS: dict[str, tuple[float, float, float | None]] = {
    "v4": (275e12, 1200e9, None),
    "v5e": (197e12, 819e9, 400e9),
    "v5litepod": (197e12, 819e9, 400e9),
    "v5p": (459e12, 2765e9, 1200e9),
    "v6e": (918e12, 1638e9, 800e9),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}


def _array_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type (`bf16[8,128]{1,0}` or a tuple of them)."""
  import re
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", type_text):
    size = 1
    for dim in filter(None, dims.split(",")):
      size *= int(dim)
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def _group_size(line: str, devices: int) -> int:
  """How many devices one replica group of a collective spans (its HLO attributes)."""
  import re
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", line)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    named = re.search(r"device_ids=\S+ \{([^}]*)\}", line)
    axes = re.findall(r"'(\w+)'", named.group(1)) if named else list(sizes)
    size = 1
    for axis in axes:
      size *= int(sizes.get(axis, 1))
    return size
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  pairs = re.search(r"source_target_pairs=\{", line)
  return 2 if pairs else devices


def collective_bytes(hlo_text: str, devices: int) -> dict[str, float]:
  """Bytes each chip sends per collective kind in a compiled (per-chip) HLO module, counting each
  instruction once, as a ring algorithm moves them: all-reduce 2(n-1)/n of its array,
  all-gather and all-to-all (n-1)/n of the whole, reduce-scatter (n-1) x its shard,
  collective-permute the whole array (n: the replica group's size)."""
  import re
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (.*?) (" + "|".join(COLLECTIVES)
                       + r")(-start)?\(")
  sent: dict[str, float] = {}
  for line in hlo_text.splitlines():
    found = pattern.match(line)
    if not found:
      continue
    kind, size = found.group(2), _array_bytes(found.group(1))
    if found.group(3):  # an async start's type holds the operands and the results
      size /= 2
    n = max(_group_size(line, devices), 1)
    factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
              "all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
              "collective-permute": 1.0}[kind]
    sent[kind] = sent.get(kind, 0.0) + factor * size
  return sent


def program_costs(compiled, devices: int) -> dict[str, float]:
  """Per chip: XLA's cost analysis of a compiled program (FLOPs, bytes of memory traffic) and the
  bytes its collectives send. XLA counts a while loop's body once."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  sent = collective_bytes(compiled.as_text(), devices)
  return {"flops": float(analysis.get("flops", 0.0)),
          "hbm_bytes": float(analysis.get("bytes accessed", 0.0)),
          "collective_bytes": float(sum(sent.values())),
          **{f"collective_bytes/{kind}": value for kind, value in sent.items()}}


def _has_loops(config) -> bool:
  return bool(config.model.get("scan_layers", False)) or int(config.num_microbatches) > 1


def _unrolled(config, encoder_layers: int, decoder_layers: int, remat: str | None = None):
  variant = config.copy_and_resolve_references()
  variant.num_microbatches = 1
  if "scan_layers" in variant.model:
    variant.model.scan_layers = False
  if remat is not None and "remat" in variant.model:
    variant.model.remat = remat
  variant.model.num_encoder_layers = encoder_layers
  variant.model.num_decoder_layers = decoder_layers
  return variant


def step_costs(config, topology: str, compiled=None) -> dict[str, float]:
  """Per-chip costs of one train step of `config` on `topology` (program_costs), loops counted as
  often as they run. `compiled`, a compile of the step without loops (unrolled layers, one
  microbatch): its own costs. Otherwise the same step compiled unrolled with one microbatch at 1
  and 2 layers per stack, extrapolated linearly in depth (each cost is a + b x layers): XLA's
  analysis counts the body of a scanned layer stack or of the microbatch loop once."""
  devices = len(topology_devices(topology))
  if compiled is not None and not _has_loops(config):
    return program_costs(compiled, devices)
  layers, points = _depth_points(config)
  costs = []
  for encoder, decoder in points:
    progress(f"roofline: the step unrolled at {encoder} + {decoder} layers, one microbatch")
    variant, _ = compile_step(_unrolled(config, encoder, decoder), topology)
    costs.append(program_costs(variant, devices))
  keys = sorted(set().union(*costs))
  return {key: _in_depth([c.get(key, 0.0) for c in costs], layers) for key in keys}


def _depth_points(config) -> tuple[tuple[int, int], list[tuple[int, int]]]:
  """((encoder, decoder) layers of `config`, the unrolled depths to measure: 1 + 1 alone for a
  one-layer model, 1 + 1 and 2 + 2 for equal stacks, else 1 + 1, 2 + 1 and 1 + 2)."""
  from dro_jax import step as step_lib
  model = step_lib.t5_config(config)
  layers = (int(model.num_encoder_layers), int(model.num_decoder_layers))
  points = ([(1, 1)] if layers == (1, 1) else [(1, 1), (2, 2)] if layers[0] == layers[1]
            else [(1, 1), (2, 1), (1, 2)])
  return layers, points


def _in_depth(values: list[float], layers: tuple[int, int]) -> float:
  """A cost measured at `_depth_points`, extrapolated linearly to the model's depth."""
  if len(values) == 1:
    return values[0]
  if layers[0] == layers[1]:
    return values[0] + (layers[0] - 1) * (values[1] - values[0])
  return (values[0] + (layers[0] - 1) * (values[1] - values[0])
          + (layers[1] - 1) * (values[2] - values[0]))


def lower_step(config, topology: str):
  """The train step of `config` lowered for `topology` (nothing compiled, nothing allocated)."""
  from dro_jax import partitioning
  mesh = partitioning.make_mesh(tuple(config.mesh_shape), devices=topology_devices(topology))
  return _lower(config, mesh, partitioning.rules_from_config(config))[0]


def _lower(config, mesh, rules):
  """(the train step lowered over `mesh` with the engine's shardings and donation, the state's
  shapes, their shardings, the batch's shapes)."""
  from dro_jax import initialization, partitioning, reference_cache
  from dro_jax import step as step_lib
  cached = reference_cache.enabled(config)
  abstract, shardings = initialization.state_layout(config, step_lib.t5_config(config), mesh,
                                                    rules, with_reference=not cached)
  batch = batch_spec(config, reference_cached=cached)
  batch_layout = partitioning.batch_shardings(batch, mesh)
  train_step = partitioning.jit_step(
      step_lib.make_train_step(config, partitioning.microbatch_constraint(mesh)), mesh,
      shardings, batch_layout, rules)
  with partitioning.activate(mesh, rules):
    lowered = train_step.jitted.lower(_with_sharding(abstract, shardings),
                                      _with_sharding(batch, batch_layout))
  return lowered, abstract, shardings, batch


def lowered_flops(config, topology: str) -> float:
  """FLOPs per chip of one train step: XLA's cost analysis of the whole step as lowered, before
  the compiler's passes (rematerialisation included), over the slice's chips; unrolled with one
  microbatch at 1 and 2 layers and extrapolated in depth as `step_costs` does. Lowering takes
  seconds. The compiled TPU program's own count misses the work inside loops the compiler makes
  (collective matmuls over fsdp shards): T5-L DRO-V on v5e:4x4 compiled counts 70 TFLOP where
  the lowered step, and suite_common.step_flops, count 92."""
  from jax._src import xla_bridge
  from jax._src.lib import xla_client
  devices = len(topology_devices(topology))
  layers, points = _depth_points(config)
  counts = []
  for encoder, decoder in points:
    module = lower_step(_unrolled(config, encoder, decoder), topology).compiler_ir(
        "hlo").get_hlo_module()
    analysis = xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    counts.append(float(analysis["flops"]) / devices)
  return _in_depth(counts, layers)


def roofline(config, topology: str, compiled=None) -> dict[str, Any]:
  """A lower bound on the step time of `config` on `topology` from the compiled program's own
  costs (step_costs) and the chip's published peaks (CHIP_PEAKS):

      compute = FLOPs / peak FLOP/s;  memory = HBM bytes / HBM bandwidth;
      network = 2 x bytes sent (sent and received) / bidirectional ICI bandwidth
      lower bound = max(compute, memory, network)   (everything overlapped)
      MFU ceiling = model FLOPs / (peak FLOP/s x lower bound)

  all per chip. FLOPs: `lowered_flops` (the compiled program's own count, which misses the work
  in the compiler's loops, is kept as compiled_flops_per_chip); the model FLOPs are those of the
  step without rematerialisation (remat's recomputation is executed, not model, work). Bytes:
  the compiled program's (`step_costs`). An estimate from the compiled program, not a
  measurement: XLA's byte counts are its model of the traffic (loops the compiler makes counted
  once), collectives are assumed to run at the full ICI bandwidth."""
  chip = chip_of(topology)
  peak_flops, hbm_bandwidth, ici_bandwidth = CHIP_PEAKS.get(chip, (None, None, None))
  if peak_flops is None:
    raise ValueError(f"topology {topology!r}: no published peaks for chip {chip!r}; known: "
                     f"{sorted(CHIP_PEAKS)}")
  costs = dict(step_costs(config, topology, compiled))
  costs["compiled_flops"] = costs["flops"]
  costs["flops"] = lowered_flops(config, topology)
  model_flops = costs["flops"]
  if config.model.get("remat", "none") not in (None, "none"):
    model_flops = lowered_flops(_with_remat(config, "none"), topology)
  return roofline_of(costs, model_flops, topology)


def roofline_of(costs: Mapping[str, float], model_flops: float, topology: str) -> dict[str, Any]:
  """`roofline` from per-chip costs (step_costs) and the model's FLOPs per chip."""
  chip = chip_of(topology)
  peak_flops, hbm_bandwidth, ici_bandwidth = CHIP_PEAKS[chip]
  compute_s = costs["flops"] / peak_flops
  memory_s = costs["hbm_bytes"] / hbm_bandwidth
  network_s = 2 * costs["collective_bytes"] / ici_bandwidth if ici_bandwidth else 0.0
  bound = max(compute_s, memory_s, network_s)
  limit = {compute_s: "compute", memory_s: "HBM", network_s: "ICI"}[bound]
  devices = len(topology_devices(topology))
  return {"chip": chip, "devices": devices, "peak_flops_per_s": peak_flops,
          "hbm_bytes_per_s": hbm_bandwidth, "ici_bytes_per_s": ici_bandwidth,
          "flops_per_chip": costs["flops"], "model_flops_per_chip": model_flops,
          "compiled_flops_per_chip": costs.get("compiled_flops", costs["flops"]),
          "flops": costs["flops"] * devices, "model_flops": model_flops * devices,
          "hbm_bytes_per_chip": costs["hbm_bytes"],
          "collective_bytes_per_chip": costs["collective_bytes"],
          "collective_bytes_by_kind": {key.split("/", 1)[1]: value for key, value in costs.items()
                                       if key.startswith("collective_bytes/")},
          "compute_s": compute_s, "memory_s": memory_s, "network_s": network_s,
          "lower_bound_s": bound, "bound_by": limit,
          "mfu_ceiling": model_flops / (peak_flops * bound) if bound else 0.0}


def _with_remat(config, remat: str):
  variant = config.copy_and_resolve_references()
  variant.model.remat = remat
  return variant


def format_roofline(roof: dict[str, Any]) -> list[str]:
  ici = (f"{roof['ici_bytes_per_s'] / 1e9:.0f} GB/s ICI" if roof["ici_bytes_per_s"]
         else "no published ICI figure")
  return [
      f"  roofline per chip (an estimate from the compiled program, not a measurement; peaks "
      f"{roof['peak_flops_per_s'] / 1e12:.0f} TFLOP/s, {roof['hbm_bytes_per_s'] / 1e9:.0f} GB/s "
      f"HBM, {ici}):",
      f"    FLOPs/step           {roof['flops_per_chip'] / 1e12:>12.3f} TFLOP"
      f"  (model, without remat: {roof['model_flops_per_chip'] / 1e12:.3f}; whole slice "
      f"{roof['flops'] / 1e12:.1f})",
      f"    HBM traffic          {roof['hbm_bytes_per_chip'] / 1e9:>12.2f} GB",
      f"    collectives sent     {roof['collective_bytes_per_chip'] / 1e9:>12.3f} GB",
      f"    lower bound          {roof['lower_bound_s'] * 1e3:>12.1f} ms  ({roof['bound_by']}-"
      f"bound: compute {roof['compute_s'] * 1e3:.1f}, HBM {roof['memory_s'] * 1e3:.1f}, ICI "
      f"{roof['network_s'] * 1e3:.1f} ms)",
      f"    MFU ceiling          {100 * roof['mfu_ceiling']:>11.0f}%",
  ]


# ---------------------------------------------------------------------------------- suggestions


def _gib(value: float) -> str:
  if abs(value) < GIB / 10:
    return f"{value / 2 ** 20:.2f} MiB"
  return f"{value / GIB:.2f} GiB"


def _powers_of_two_dividing(n: int) -> list[int]:
  return [2 ** k for k in range(0, n.bit_length()) if n % (2 ** k) == 0]


def suggest(report: Report, config) -> tuple[list[str], dict[str, Any]]:
  """What would make the step fit, with estimated per-chip sizes; ([], {}) when it fits.

  The estimates: parameters, optimizer state, the reference and the gradients (taken to be the
  size of the trainable parameters, inside the temporaries) scale with 1/fsdp; the rest of the
  temporaries (activations) with 1/microbatches; a bfloat16 reference halves a float32 one;
  full remat keeps about a third of the activations (rough)."""
  if report.total <= HEADROOM * report.hbm_bytes and report.compiler_error is None:
    return [], {}
  from dro_jax import reference
  data, fsdp, model = report.mesh["data"], report.mesh["fsdp"], report.mesh["model"]
  gradients = min(report.parameters, report.temporaries)
  activations = report.temporaries - gradients
  fixed = report.total - report.state - report.temporaries  # batch, metrics, code
  target = HEADROOM * report.hbm_bytes
  verdict = ("does not fit" if not report.fits else
             f"fits with under {100 * (1 - HEADROOM):.0f}% headroom")
  lines = [f"{verdict}: {_gib(report.total)} per chip of {_gib(report.hbm_bytes)} HBM "
           f"(estimates below; recompile with the flags to measure)"]
  flags: dict[str, Any] = {}
  state_scale = 1.0
  wide = report.devices // model
  emb_dim = _emb_dim(config)
  if (wide > fsdp and report.batch_size % wide == 0
      and (emb_dim is None or emb_dim % wide == 0)):
    state_scale = fsdp / wide
    saved = (report.state + gradients) * (1 - state_scale)
    lines.append(f"fsdp over all {wide} data-parallel chips (--config.mesh_shape='(1,{wide},"
                 f"{model})'): parameters + optimizer state + gradients "
                 f"{_gib(report.state + gradients)} -> "
                 f"{_gib((report.state + gradients) * state_scale)} (saves ~{_gib(saved)})")
    flags["mesh_shape"] = (1, wide, model)
  ref_scale = 1.0
  alpha = float(config.reference.alpha)
  if report.reference and report.reference_dtype == "float32":
    if reference.is_frozen(alpha) and config.get("reference_cache", "auto") == "off":
      lines.append(f"reference_cache='auto' (frozen reference): no reference parameters in the "
                   f"state (saves ~{_gib(report.reference * state_scale)})")
    if alpha in (0.0, 1.0):
      ref_scale = 0.5
      lines.append(f"a bfloat16 reference (--config.reference.dtype=bfloat16): reference "
                   f"{_gib(report.reference * state_scale)} -> "
                   f"{_gib(report.reference * state_scale * ref_scale)}")
      flags["reference.dtype"] = "bfloat16"
  state_after = ((report.parameters + report.optimizer_state + gradients) * state_scale
                 + report.reference * state_scale * ref_scale)
  remat = config.model.get("remat", None)
  act_scale = 1.0
  if remat is not None and remat != "full":
    lines.append(f"full rematerialisation (--config.model.remat=full): activations "
                 f"{_gib(activations)} -> ~{_gib(activations * REMAT_ACTIVATION_FACTOR)} "
                 f"(rough estimate)")
  mesh_rows = (1 if "mesh_shape" in flags else data) * (wide if "mesh_shape" in flags else fsdp)
  micro = report.num_microbatches
  options = [m for m in _powers_of_two_dividing(report.batch_size // mesh_rows)
             if report.batch_size % (mesh_rows * m) == 0 and m > micro]
  chosen = micro
  for m in options if fixed + state_after + activations > target else ():
    chosen = m
    if fixed + state_after + activations * micro / m <= target:
      break
  if chosen > micro:
    act_scale = micro / chosen
    lines.append(f"{chosen} microbatches (--config.num_microbatches={chosen}): activations "
                 f"{_gib(activations)} -> {_gib(activations * act_scale)}")
    flags["num_microbatches"] = chosen
  estimate = fixed + state_after + activations * act_scale
  if estimate > target and remat is not None and remat != "full":
    estimate = fixed + state_after + activations * act_scale * REMAT_ACTIVATION_FACTOR
    flags["model.remat"] = "full"
  verdict = "fits" if estimate <= report.hbm_bytes else "still does not fit: a bigger slice"
  command = " ".join(f"--config.{key}={_flag_value(value)}" for key, value in flags.items())
  lines.append(f"together: ~{_gib(estimate)} per chip (estimate; {verdict})"
               + (f": {command}" if command else ""))
  return lines, {"flags": flags, "estimate_bytes": int(estimate),
                 "estimate_fits": bool(estimate <= report.hbm_bytes)}


def _flag_value(value: Any) -> str:
  if isinstance(value, tuple):
    return "'(" + ",".join(str(v) for v in value) + ")'"
  return str(value)


def _emb_dim(config) -> int | None:
  from dro_jax import step as step_lib
  try:
    return int(step_lib.t5_config(config).emb_dim)
  except Exception:  # an unusual preset: no divisibility check
    return None


# ---------------------------------------------------------------------------------------- print


def format_report(report: Report) -> str:
  mesh = " x ".join(f"{name} {size}" for name, size in report.mesh.items())
  reference_line = ("none in the state (log-probs cached with the batch)" if report.reference_cached
                    else ("none" if report.reference_dtype is None
                          else f"{report.reference_dtype} copy in the state"))
  options = "".join(f", {k}={v}" for k, v in report.model_options.items())
  rows = [
      f"{report.config or report.loss}: {report.preset} {report.loss} on {report.topology} "
      f"({report.devices} chips, {_gib(report.hbm_bytes)} HBM each)",
      f"  assumed: inputs {report.input_length} / targets {report.target_length} tokens, "
      f"batch {report.batch_size}, {report.num_microbatches} microbatch(es), mesh {mesh}, "
      f"compute {report.compute_dtype}, parameters float32, reference {reference_line}"
      f"{options}",
      "  per chip:",
      f"    parameters           {_gib(report.parameters):>12}",
      f"    optimizer state      {_gib(report.optimizer_state):>12}",
      f"    reference            {_gib(report.reference):>12}",
      f"    batch                {_gib(report.batch):>12}",
      f"    activations/temps    {_gib(report.temporaries):>12}  (incl. gradients)",
      f"    code                 {_gib(report.code):>12}",
      f"    outputs not donated  {_gib(report.outputs - report.aliased):>12}",
      f"    total                {_gib(report.total):>12}  = arguments {_gib(report.arguments)}"
      f" + outputs {_gib(report.outputs)} - aliased {_gib(report.aliased)} + temporaries "
      f"{_gib(report.temporaries)} + code {_gib(report.code)}",
      f"  {'fits' if report.fits else 'DOES NOT FIT'}: {100 * report.total / report.hbm_bytes:.0f}%"
      f" of {_gib(report.hbm_bytes)}",
  ]
  if report.compiler_error:
    rows.append(f"  the TPU compiler refused it ({report.compiler_error}); the numbers above are "
                f"of a compile without the HBM limit")
  rows += [f"  - {line}" if i else f"  {line}" for i, line in enumerate(report.suggestions)]
  if report.roofline:
    rows += format_roofline(report.roofline)
  return "\n".join(rows)


# ------------------------------------------------------------------------------------------ CLI


def lengths_for(config, argv: Sequence[str], input_length: int | None,
                target_length: int | None) -> tuple[int | None, int | None]:
  """The lengths to compile with: the flags, else the config's when set on the command line
  (`--config.max_input_length=...`) or tiny, else 512 / 256."""
  def given(key: str) -> bool:
    return any(arg.split("=", 1)[0].lstrip("-") == f"config.{key}" for arg in argv)
  chosen = []
  for value, key, default in ((input_length, "max_input_length", DEFAULT_LENGTHS[0]),
                              (target_length, "max_target_length", DEFAULT_LENGTHS[1])):
    if value is None and not given(key) and not is_tiny(config):
      value = default
    chosen.append(value)
  return chosen[0], chosen[1]


def _define_flags(values, argv: Sequence[str]) -> None:
  from absl import flags
  from ml_collections import config_flags
  # The config's --config.KEY=VALUE overrides are read from `argv` (not sys.argv).
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:k=v,...]", flag_values=values,
                                  lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:4x8, v4:2x2x2", flag_values=values)
  flags.DEFINE_integer("input_length", None, "encoder tokens (default 512; the config's for tiny)",
                       flag_values=values)
  flags.DEFINE_integer("target_length", None, "target tokens (default 256; the config's for "
                       "tiny)", flag_values=values)
  flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: the chip's)",
                     flag_values=values)
  flags.DEFINE_string("json", None, "write the report as JSON here", flag_values=values)
  flags.DEFINE_bool("roofline", True, "also the step's roofline: FLOPs, HBM and collective bytes "
                    "from XLA's cost analysis, a lower bound on the step time, the MFU ceiling "
                    "(--noroofline: memory only; with scanned layers or microbatches it compiles "
                    "the step twice more, unrolled at 1 and 2 layers)", flag_values=values)
  flags.mark_flags_as_required(["config", "topology"], flag_values=values)


def parse(argv: Sequence[str]):
  """The flags of `argv` (the config loaded), or SystemExit naming the mistake: nothing of JAX is
  needed, so the command line checks them before it starts the backends."""
  from absl import flags
  values = flags.FlagValues()
  _define_flags(values, argv)
  try:
    values(list(argv))
    values.validate_all_flags()
  except flags.Error as error:
    raise SystemExit(f"{argv[0]}: {error}\nTry --help.") from None
  except (AttributeError, KeyError) as error:  # a --config.KEY=... naming no key of the config
    overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
    raise SystemExit(f"{argv[0]}: an override names no key of the config ({error}); the "
                     f"overrides given: {' '.join(overrides)}") from None
  return values


def cli(argv: Sequence[str]) -> Report | None:
  """The command line (`argv` as sys.argv, the program's name first) run in this process: prints
  the report, writes `--json`, returns the report (None for --help). The flags live in their own
  FlagValues, so importing or calling this defines nothing in absl's global flags."""
  if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
    print_help()
    return None
  values = parse(argv)
  config = values.config
  input_length, target_length = lengths_for(config, argv, values.input_length,
                                            values.target_length)
  name = values["config"].config_filename  # as given, with its :args
  progress(f"{name} on {values.topology}: building the step (nothing is allocated)")
  try:
    report = size(config, values.topology, input_length=input_length,
                  target_length=target_length, hbm_gib=values.hbm_gib, name=name,
                  with_roofline=values.roofline)
  except ValueError as error:  # a topology, mesh, batch or key the run cannot have
    raise SystemExit(f"{argv[0]}: {' '.join(str(error).split())}") from None
  print(format_report(report), flush=True)
  if values.json:
    from dro_jax import files
    files.write_text(values.json, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
  return report


def wants_help(argv: Sequence[str]) -> bool:
  return any(arg in ("--help", "-h", "--helpfull", "-help", "--helpshort") for arg in argv[1:])


def print_help() -> None:
  """The usage, without the backends (answers in well under a second)."""
  from absl import flags
  values = flags.FlagValues()
  _define_flags(values, ["sizing"])
  print(__doc__ + "\n" + values.get_help(), flush=True)


if __name__ == "__main__":
  if wants_help(sys.argv):
    print_help()
    sys.exit(0)
  parse(sys.argv)  # a mistake in the flags is named before the backends start
  # Sizing needs no accelerator of this machine: the TPU devices come from libtpu's topology.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from dro_jax import console
  console.initialize_backends()
  cli(sys.argv)
