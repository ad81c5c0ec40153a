"""The native modules are really built, and LOLLMS_FAST_NO_EXTENSIONS switches to the twins."""

from __future__ import annotations

import os
import subprocess
import sys

import lollms_fast._native as native


def test_compiled_modules_are_used_by_default() -> None:
    if os.environ.get("LOLLMS_FAST_NO_EXTENSIONS"):
        return  # the suite itself is running on the twins
    assert native.USING_EXTENSIONS
    for mod in (native.sampling, native.stops):
        assert mod.__file__ is not None and mod.__file__.endswith(".so"), mod.__file__


def _which_modules(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("LOLLMS_FAST_NO_EXTENSIONS", None)
    if env_value is not None:
        env["LOLLMS_FAST_NO_EXTENSIONS"] = env_value
    code = ("import lollms_fast._native as n; "
            "print(n.USING_EXTENSIONS, n.sampling.__name__, n.stops.__name__)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True, timeout=60).stdout.split()


def test_env_switch_selects_pure_python_twins() -> None:
    assert _which_modules("1") == ["False", "lollms_fast._native.sampling_py",
                                   "lollms_fast._native.stops_py"]
    assert _which_modules(None) == ["True", "lollms_fast._native._sampling",
                                    "lollms_fast._native._stops"]
