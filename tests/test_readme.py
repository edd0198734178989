"""The README's examples are real output: the `dsref info deepseek-v3` block is rerun and diffed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

_FAST_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_info_block_is_current_output():
    text = README.read_text()
    m = re.search(r"```text\n\$ dsref info deepseek-v3\n(.*?)```", text, re.S)
    assert m, "README lost its `dsref info deepseek-v3` example"
    # In a fresh process with XLA's default codegen, as a user runs it: the block ends with the JAX
    # self-check's relative errors, whose last digits depend on the LLVM level (tests/conftest.py
    # compiles the suite at -O0).
    env = {**os.environ, "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                               if f not in _FAST_FLAGS)}
    p = subprocess.run([sys.executable, "-m", "dsref.experiments.cli", "info", "deepseek-v3"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    got = p.stdout
    assert got == m.group(1), ("README's `dsref info deepseek-v3` block differs from the command's output; "
                               "paste the new output into README.md")
