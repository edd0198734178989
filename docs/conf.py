"""Sphinx configuration of the dsref teaching site (issue 20).

Build (strict: every warning is an error, every notebook page executes):
    python -m sphinx -W --keep-going -n -b html docs build/docs-html
The chapters under docs/chapters/ are MyST Markdown notebooks; their tables and figures are
computed at build time by the project's own code (dsref.*), so a number on the page is whatever
the installed package gives today.
"""

from __future__ import annotations

import os

# The notebook kernels inherit this process's environment: JAX on the CPU, as in the tests, so a
# machine with an accelerator builds the same pages (and JAX prints no "no GPU found" notice).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "deepseek-ref"
author = "deepseek-ref contributors"
copyright = "2026, deepseek-ref contributors"

# myst_nb brings the MyST Markdown parser with it; adding "myst_parser" too would register the
# .md suffix twice (Sphinx refuses that).
# sphinx-mathjax-offline (its module name has hyphens) copies MathJax 3.2.2 into _static/mathjax and
# points mathjax_path at it: the site shows math with no network, as the headless-Chromium check
# (tests/docs_browser.py, run by tests/test_docs_site.py) and a reader behind a firewall need.
extensions = ["myst_nb", "sphinx-mathjax-offline"]

# Math: the MyST "$...$" / "$$...$$" syntax, rendered by MathJax (Sphinx's default for HTML).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
# Heading anchors, so a page can link to "page.md#a-section" and the link is checked.
myst_heading_anchors = 3

# "force", not "cache": jupyter-cache keys a page on its own cells only, not on the dsref source
# the cells import, so after a change to (say) ModelConfig.kv_cache_bytes_per_token a cached page
# would keep showing the old number. Every chapter is small (seconds), CI builds from a fresh tree
# (nothing to reuse), and forcing keeps the built numbers those of the code being tested.
nb_execution_mode = "force"
nb_execution_raise_on_error = True  # a failing cell fails the build, not a red traceback on the page
nb_execution_timeout = 120  # per cell; each chapter takes seconds, this only stops a hung kernel
nb_execution_show_tb = True  # the traceback in the build log when a cell fails
# Anything a cell writes to stderr (a library's DeprecationWarning, a JAX notice) becomes a build
# warning, so under -W an unexpected message fails the build instead of sitting on a page.
nb_output_stderr = "warn"
# Cells print their tables as IPython Markdown; the default "commonmark" renderer has no pipe
# tables, "myst" does (and the same math and roles as the prose).
nb_render_markdown_format = "myst"

# Cross-references that do not resolve are warnings (and -W makes them errors).
nitpicky = True

# Every existing page (docs/*.md) builds strictly as it is; none is excluded. "_build": a build
# into docs/_build (myst-nb also writes its executed notebooks next to the output folder) must
# not be read back as sources.
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "deepseek-ref: DeepSeek-V3 from the equations"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,  # the pages are the notebooks' source; no .ipynb to download
}
