"""The train state: one pytree with everything a step reads and writes, and nothing else.

Fields and the checkpoint items they become (`checkpointing.py`):

| field       | item         | what                                                           |
|-------------|--------------|----------------------------------------------------------------|
| step        | rng_step     | optimizer steps taken (int32 scalar)                            |
| rng         | rng_step     | PRNG key data (uint32[2]), advanced by the step                 |
| policy      | policy       | θ (float32)                                                    |
| policy_opt  | policy_opt   | the policy optimizer's state                                   |
| value       | value        | φ of the DRO-V variants that have one, else None               |
| value_opt   | value_opt    | its optimizer's state, else None                               |
| reference   | reference    | θ_ref: a copy in `config.reference.dtype` (float32 master copy by default; bfloat16 allowed when frozen or hard-synced), frozen or moved by reference.update; None when unused |

Fields that a loss does not use are None (empty pytrees), so the same state class serves every
loss and the checkpoint holds exactly the items that exist.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

PyTree = Any

ITEMS = ("policy", "policy_opt", "value", "value_opt", "reference")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  rng: jax.Array
  policy: PyTree
  policy_opt: PyTree
  value: PyTree = None
  value_opt: PyTree = None
  reference: PyTree = None

  def items(self) -> dict[str, PyTree]:
    """The checkpoint items of this state that exist (None fields are left out)."""
    present = {name: getattr(self, name) for name in ITEMS if getattr(self, name) is not None}
    present["rng_step"] = {"step": self.step, "rng": self.rng}
    return present

  @classmethod
  def from_items(cls, items: dict[str, PyTree]) -> "TrainState":
    return cls(step=items["rng_step"]["step"], rng=items["rng_step"]["rng"],
               **{name: items.get(name) for name in ITEMS})

  @property
  def trainable(self) -> dict[str, PyTree]:
    """What the gradient is taken with respect to: {"policy": θ, "value": φ or None}."""
    return {"policy": self.policy, "value": self.value}
