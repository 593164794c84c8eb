"""Imported right before the kernel modules: records whether ``triton.jit`` decorates them for
Triton's interpreter (``TRITON_INTERPRET=1`` at that moment) or for compilation."""

import os

try:  # triton >= 3.4 reads its settings through knobs
    from triton import knobs

    INTERPRETED = bool(knobs.runtime.interpret)
except (ImportError, AttributeError):
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
