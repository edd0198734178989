"""Layering: the model core never imports the oracle (reference/oracle/ is built on the core, not in it)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CORE = ("config", "params", "model", "numpy_ref", "checkpoint", "decode", "presets")
ORACLE = "dsref.reference.oracle"
REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def test_importing_the_core_imports_no_oracle_module():
    """In a fresh interpreter: every core module imported, no dsref.reference.oracle* module with them."""
    code = ("import json, sys\n"
            f"for m in {CORE!r}:\n"
            "    __import__('dsref.reference.' + m)\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    mods = json.loads(p.stdout.strip().splitlines()[-1])
    assert {f"dsref.reference.{m}" for m in CORE} <= set(mods)
    assert [m for m in mods if m == ORACLE or m.startswith(ORACLE + ".")] == []


def test_core_sources_name_no_oracle_import():
    """Also the imports inside functions (which the import above does not run)."""
    for m in CORE:
        tree = ast.parse((REFERENCE / f"{m}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{a.name}" for a in node.names]
                if node.level:  # relative: from . import oracle / from .oracle import x
                    names = [f"dsref.reference.{n.lstrip('.')}" for n in names]
            else:
                continue
            bad = [n for n in names if n == ORACLE or n.startswith(ORACLE + ".")]
            assert not bad, f"reference/{m}.py line {node.lineno} imports {bad}"
