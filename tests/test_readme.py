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
    got, want = p.stdout, m.group(1)
    # The self-check's float32 errors end in digits that XLA's CPU code generation sets (the same
    # code gave 6.9e-07 / 6.5e-07 on one Xeon and 6.6e-07 / 6.6e-07 on another): the README's pair
    # must be the same size as the output's (below 1e-5, within a factor 3), the rest verbatim.
    err = re.compile(r"(rel\. err absorbed )([0-9.e+-]+)(, naive )([0-9.e+-]+)")
    g, w = err.search(got), err.search(want)
    assert g and w, "the self-check line lost its relative errors"
    for a, b in ((g.group(2), w.group(2)), (g.group(4), w.group(4))):
        assert float(a) < 1e-5 and float(b) < 1e-5 and 1 / 3 < float(a) / float(b) < 3, (a, b)
    mask = lambda s: err.sub(r"\1E\3E", s)  # noqa: E731
    assert mask(got) == mask(want), ("README's `dsref info deepseek-v3` block differs from the command's "
                                     "output; paste the new output into README.md")
