"""What a fresh interpreter imports: for tests that keep a heavy package out of a module's imports."""

from __future__ import annotations

import subprocess
import sys


def modules_of_package_imported_by(modules: list[str], package: str) -> list[str]:
    """The modules of `package` (itself and its submodules) loaded after importing `modules` in a new
    Python process; that process must succeed."""
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in modules)
        + f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] == {package!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()
