"""Run a snippet in a fresh interpreter with some modules made unimportable.

The pure-Python parts of batchops (data, tuning, train, testing) must import without the
compiled kernels; tests prove it by running code in a subprocess where importing
``batchops._C`` (and whatever else is named) raises ImportError. batchops/__init__.py, which
loads the kernels, is skipped: the package is registered as a bare namespace first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable

__all__ = ["run_isolated"]

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PREAMBLE = """\
import sys, types, importlib.abc
_BLOCKED, _PREFIXES = {blocked!r}, {prefixes!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in _BLOCKED or name.startswith(_PREFIXES):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
_pkg = types.ModuleType("batchops"); _pkg.__path__ = [{package!r}]
sys.modules["batchops"] = _pkg  # skip batchops/__init__, which loads the kernels
"""


def run_isolated(
    code: str,
    *,
    blocked: Iterable[str] = ("batchops._C", "batchops.ops"),
    blocked_prefixes: Iterable[str] = ("batchops.ops.",),
    script: str | os.PathLike | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a new Python where the modules ``blocked`` and any module whose
    name starts with one of ``blocked_prefixes`` cannot be imported. With ``script`` the code is
    written to that file and run as ``__main__`` (needed when it starts processes by spawn);
    otherwise it runs with ``python -c``. Returns the completed process (text output)."""
    source = _PREAMBLE.format(
        blocked=tuple(blocked), prefixes=tuple(blocked_prefixes), package=os.path.join(_ROOT, "batchops")
    ) + textwrap.dedent(code)
    if script is None:
        argv = [sys.executable, "-c", source]
    else:
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        argv = [sys.executable, os.fspath(script)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
