"""`python -m dro_jax.X` from a folder that holds a folder named `dro_jax` (the clone's parent).

There `dro_jax` is imported as a namespace package over that folder (the clone's root, which
holds `configs/`), and `dro_jax.configs` would be the clone's configs/ folder instead of
dro_jax/configs.py. `repair()`, called by an entry point before it imports anything else of
dro_jax, points the package back at this file's folder. Standard library only.
"""

from __future__ import annotations

import os
import sys


def repair() -> bool:
  """Makes `dro_jax` this package when a namespace package shadows it; True if it did."""
  package = sys.modules.get("dro_jax")
  if package is None or getattr(package, "__file__", None) is not None:
    return False
  here = os.path.dirname(os.path.abspath(__file__))
  package.__path__ = [here]
  package.__file__ = os.path.join(here, "__init__.py")
  for name in [name for name, module in sys.modules.items()
               if name.startswith("dro_jax.") and getattr(module, "__file__", None) is None]:
    del sys.modules[name]  # a namespace module picked up from that folder
  return True
