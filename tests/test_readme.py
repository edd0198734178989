"""The README's examples are real output: the `dsref info deepseek-v3` block is rerun and diffed."""
from __future__ import annotations

import re
from pathlib import Path

from dsref.experiments.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_info_block_is_current_output(capsys):
    text = README.read_text()
    m = re.search(r"```text\n\$ dsref info deepseek-v3\n(.*?)```", text, re.S)
    assert m, "README lost its `dsref info deepseek-v3` example"
    assert main(["info", "deepseek-v3"]) == 0
    got = capsys.readouterr().out
    assert got == m.group(1), ("README's `dsref info deepseek-v3` block differs from the command's output; "
                               "paste the new output into README.md")
