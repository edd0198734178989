"""The documentation site (docs/, issue 20) builds strictly, and its chapters show computed numbers.

One strict build (warnings are errors, nitpicky, every notebook page executed) into a temporary
directory; the tests then read the built HTML. A number is looked for in the pages' *cell
outputs*, never anywhere on the page: the included source (``literalinclude``) and the prose may
quote the same number, and finding it there would prove nothing about the computation.
Skipped when the ``docs`` extra (sphinx, myst-nb, sphinx-book-theme, ipykernel) is not installed.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs_html import cell_outputs, page_images, page_text

DOCS = Path(__file__).resolve().parent.parent / "docs"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    pytest.importorskip("sphinx_book_theme")
    pytest.importorskip("ipykernel")
    if os.environ.get("DSREF_DOCS_SITE"):  # an existing build, to check pages while writing them
        return Path(os.environ["DSREF_DOCS_SITE"])
    out = tmp_path_factory.mktemp("docs") / "html"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
                           str(DOCS), str(out)], capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    # the kernel's "running over TCP without encryption" notice is ipykernel's, not Sphinx's
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "IPKernelApp" not in line)
    assert proc.returncode == 0, f"strict docs build failed (exit {proc.returncode}) after {wall:.0f} s:\n{log[-6000:]}"
    print(f"\ndocs site: strict build in {wall:.1f} s wall")
    return out


def test_every_page_is_built(site):
    pages = sorted(p.stem for p in DOCS.glob("*.md")) + sorted(f"chapters/{p.stem}" for p in (DOCS / "chapters").glob("*.md"))
    missing = [p for p in pages if not (site / f"{p}.html").is_file()]
    assert not missing, f"docs pages without a built HTML page: {missing}"


def test_mla_chapter_computes_the_v3_cache(site):
    from dsref.reference.presets import get_preset
    v3 = get_preset("deepseek-v3")
    page = site / "chapters" / "mla.html"
    out = cell_outputs(page)
    per_token = (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * 2
    assert per_token == v3.kv_cache_bytes_per_token() == 70_272
    assert f"{per_token:,}" in out  # "70,272" printed by a cell
    assert f"{v3.kv_cache_bytes_per_token(absorbed=False):,.0f}" in out  # the MHA column
    assert "max |naive - absorbed| / max |naive| =" in out
    for name in ("deepseek-v2-lite",):
        assert f"{get_preset(name).kv_cache_bytes_per_token():,.0f} bytes per token" in out
    src = page_text(page)
    assert "def mla_absorbed(" in src and "def mla_naive(" in src  # included from reference/model.py
    assert "<table" in page.read_text()  # the cache table rendered as a table, not as text


def test_roofline_chapter_computes_the_h800_ridge_and_draws_the_figure(site):
    from dsref.hwmodels.catalog import load_device
    from dsref.sim.roofline import ridge_point
    page = site / "chapters" / "roofline.html"
    out = cell_outputs(page)
    h800 = load_device("h800")
    assert f"{ridge_point(h800, 'fp8'):,.0f}" in out and f"{ridge_point(h800, 'bf16'):,.0f}" in out
    assert f"{h800.peak('fp8') / h800.memory_bandwidth:,.0f}" in out  # ridge from the peaks alone
    assert "compute-bound from batch" in out
    imgs = page_images(page, site)
    assert imgs and all(i.stat().st_size > 10_000 for i in imgs), imgs  # the matplotlib figure


def test_gate_chapter_routes_tokens(site):
    page = site / "chapters" / "moe-gate.html"
    out = cell_outputs(page)
    assert "def gate(x, w, cfg: ModelConfig, prefix: str):" in page_text(page)  # from numpy_ref.py
    assert "with bias +1.0 it is chosen by all 6 tokens" in out
    assert "mask value 0.0: 6 of 6 tokens pick an expert from a dropped group" in out
    assert "mask value -inf: 0 of 6 tokens" in out


def test_prose_numbers_match_the_presets():
    """The chapters' prose names a few of DeepSeek-V3's dimensions; they are the preset's."""
    from dsref.reference.presets import get_preset
    v3 = get_preset("deepseek-v3")
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert v3.num_experts_per_tok // v3.topk_group == 2  # "the top-2 sum" of the gate chapter
    assert v3.num_attention_heads == 128 and v3.n_shared_experts == 1
    assert (v3.kv_lora_rank, v3.qk_rope_head_dim, v3.num_hidden_layers) == (512, 64, 61)
    text = (DOCS / "chapters" / "moe-gate.md").read_text()
    assert "$E = 256$" in text and "$k = 8$" in text and "4 of 8" in text


def _chapter_checks():
    """Every ``check_*(site)`` function of tests/docs_checks_*.py: one chapter's checks per file,
    run here so that the whole suite builds the site once (this module's fixture)."""
    for path in sorted(TESTS.glob("docs_checks_*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        for name, fn in sorted(vars(module).items()):
            if name.startswith("check_") and callable(fn):
                yield pytest.param(fn, id=f"{path.stem[len('docs_checks_'):]}:{name[len('check_'):]}")


@pytest.mark.parametrize("check", list(_chapter_checks()))
def test_chapter(site, check):
    check(site)


def _need_chromium():
    from tests.docs_browser import chromium
    if chromium() is None:
        if os.environ.get("DSREF_REQUIRE_CHROMIUM"):  # .ci/run installs it: a missing browser fails there
            pytest.fail("DSREF_REQUIRE_CHROMIUM is set but no Chromium is installed")
        pytest.skip("no Chromium (Debian: apt-get install chromium)")


def test_pages_render_in_chromium(site):
    """Every chapter, and the reference pages with figures, in headless Chromium: the math is typeset
    by the MathJax shipped with the site (no network), no LaTeX is left raw, every image loads."""
    _need_chromium()
    from tests.docs_browser import problems, render
    chapters = sorted(f"chapters/{p.stem}.html" for p in (DOCS / "chapters").glob("*.md"))
    pages = ["index.html", *chapters, "validation.html", "training-experiments.html"]
    reports = render(site, pages)
    bad = {p: problems(r) for p, r in reports.items() if problems(r)}
    assert not bad, bad
    for page in chapters:  # every chapter states its mechanism as equations
        assert reports[page]["mathjax"] and reports[page]["math"] >= 3, (page, reports[page])
    figures = {p: r["images"] for p, r in reports.items()}
    assert figures["chapters/roofline.html"] >= 1 and figures["validation.html"] >= 2, figures


def test_browser_check_sees_raw_latex_and_broken_images(tmp_path):
    """The check above can fail: a page whose MathJax does not load and whose figure is missing."""
    _need_chromium()
    from tests.docs_browser import problems, render
    (tmp_path / "index.html").write_text("<html><body><p>index</p></body></html>")
    (tmp_path / "bad.html").write_text(
        '<html><head><script defer src="_static/mathjax/absent.js"></script></head><body>'
        '<p><span class="math notranslate nohighlight">\\(\\frac{a}{b}\\)</span></p>'
        '<img src="_images/missing.png"></body></html>')
    bad = problems(render(tmp_path, ["bad.html"], budget_ms=15_000)["bad.html"])
    assert any("not typeset" in b for b in bad) and any("broken images" in b for b in bad), bad
