"""Native hot paths and their pure-Python twins.

`sampling` and `stops` are the compiled Cython modules. With the environment variable
LOLLMS_FAST_NO_EXTENSIONS=1 the pure-Python twins are used instead; without it a missing
compiled module is an error at import (never a silent, slow fallback).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

USING_EXTENSIONS = os.environ.get("LOLLMS_FAST_NO_EXTENSIONS", "") not in ("1", "true", "yes")

if TYPE_CHECKING:  # callers are checked against the stubs (_sampling.pyi, _stops.pyi)
    from . import _sampling as sampling
    from . import _stops as stops
elif USING_EXTENSIONS:
    try:
        from . import _sampling as sampling
        from . import _stops as stops
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "lollms_fast's native modules are missing (the package was not built with its "
            "CMake/Cython step). Reinstall with `pip install .`, or set "
            "LOLLMS_FAST_NO_EXTENSIONS=1 to run on the slow pure-Python twins."
        ) from exc
else:
    from . import sampling_py as sampling
    from . import stops_py as stops

__all__ = ["USING_EXTENSIONS", "sampling", "stops"]
