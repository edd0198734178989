"""Render pages of the built documentation site in headless Chromium and report what a reader sees.

Issue 20 asks that the site be tried in a real browser: the math must be typeset (MathJax ran, no
raw LaTeX left on the page) and every figure must load (no broken image). Reading the HTML files
cannot tell either: a page whose MathJax script fails to load still *contains* the LaTeX, and an
``<img>`` tag is there whether or not its file is.

How: the site is served on 127.0.0.1 by a thread of this process; one extra address,
``/__dsref_check__.html?page=<page>``, answers a small page (kept in memory, nothing is written
into the site) that loads the target page in a same-origin iframe, waits for MathJax's startup
promise, and writes what it found as JSON into its own DOM. Chromium runs headless with
``--dump-dom`` and a virtual-time budget, and the JSON is read back from the dumped DOM. No driver
package is needed: only Debian's ``chromium`` (``.ci/run`` installs it).

Also a script, to look at a build by hand::

    python -m tests.docs_browser build/docs-html chapters/mla.html chapters/roofline.html
"""
from __future__ import annotations

import functools
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

CHECK_PATH = "/__dsref_check__.html"

# The checking page. It reports, for the page in the iframe:
#   math      -- typeset formulas (MathJax's <mjx-container> elements)
#   untypeset -- Sphinx math elements (class "math") with no <mjx-container> inside: raw LaTeX
#   merror    -- formulas MathJax could not parse (<mjx-merror>)
#   raw_tex   -- LaTeX commands or $$ left in the visible text
#   images / broken -- <img> elements, and the ones that did not load (naturalWidth 0)
CHECK_PAGE = """<!doctype html><html><body>
<iframe id="f" style="width:1200px;height:900px"></iframe>
<script>
const page = new URLSearchParams(location.search).get("page");
const f = document.getElementById("f");
function report(extra) {
  const d = f.contentDocument;
  const imgs = Array.from(d.images);
  const text = d.body ? d.body.innerText : "";
  const r = {
    page: page, title: d.title,
    mathjax: !!(f.contentWindow.MathJax && f.contentWindow.MathJax.version),
    math: d.querySelectorAll("mjx-container").length,
    untypeset: Array.from(d.querySelectorAll(".math")).filter(e => !e.querySelector("mjx-container")).length,
    merror: d.querySelectorAll("mjx-merror").length,
    raw_tex: (text.match(/\\$\\$|\\\\(frac|operatorname|mathbb|begin\\{|left|sum_|sqrt)/g) || []).length,
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    error: extra || null,
  };
  const pre = document.createElement("pre");
  pre.id = "dsref-result";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
}
f.onload = () => {
  const w = f.contentWindow;
  if (!f.contentDocument.querySelector(".math")) { report(); return; }  // no formula: Sphinx loads no MathJax
  let tries = 0;
  (function wait() {  // MathJax 3 loads asynchronously: poll for it, then await its typesetting
    if (w.MathJax && w.MathJax.startup && w.MathJax.startup.promise) {
      w.MathJax.startup.promise.then(() => report(), e => report("MathJax: " + e));
    } else if (++tries > 200) {
      report("MathJax never started");
    } else {
      setTimeout(wait, 50);
    }
  })();
};
f.src = page;
</script></body></html>"""


def chromium() -> str | None:
    """The Chromium executable (Debian's package installs /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        if url.path != CHECK_PATH:
            return super().do_GET()
        body = CHECK_PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet: the test reports what matters
        pass


def render(site: Path, pages: list[str], *, budget_ms: int = 30_000, timeout_s: float = 120.0) -> dict[str, dict]:
    """{page: report} for each page (a path relative to ``site``, e.g. ``chapters/mla.html``),
    rendered by headless Chromium. Raises RuntimeError without Chromium or when it gives no report."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (Debian: apt-get install chromium)")
    handler = functools.partial(_Handler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    out = {}
    try:
        port = server.server_address[1]
        for page in pages:
            with tempfile.TemporaryDirectory(prefix="dsref-chromium-") as profile:
                # the flags that keep Chromium off a closed network and out of first-run work
                cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                       "--disable-background-networking", "--disable-component-update", "--disable-sync",
                       f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom",
                       f"http://127.0.0.1:{port}{CHECK_PATH}?page=/{page}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            m = re.search(r'<pre id="dsref-result">(.*?)</pre>', proc.stdout, re.S)
            if m is None:
                raise RuntimeError(f"Chromium gave no report for {page} (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-600:]}")
            out[page] = json.loads(html.unescape(m.group(1)))
    finally:
        server.shutdown()
        server.server_close()
    return out


def problems(report: dict) -> list[str]:
    """What a reader would see wrong on one rendered page (empty when it renders well)."""
    bad = []
    if report.get("error"):
        bad.append(report["error"])
    if report["untypeset"]:
        bad.append(f"{report['untypeset']} formulas not typeset (raw LaTeX on the page)")
    if report["raw_tex"]:
        bad.append(f"{report['raw_tex']} LaTeX commands in the visible text")
    if report["merror"]:
        bad.append(f"{report['merror']} formulas MathJax could not parse")
    if report["broken"]:
        bad.append(f"broken images: {report['broken']}")
    return bad


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m tests.docs_browser SITE_DIR PAGE.html [PAGE.html ...]", file=sys.stderr)
        return 2
    site = Path(argv[0])
    if not (site / "index.html").is_file():
        print(f"{site}: not a built site (no index.html)", file=sys.stderr)
        return 2
    failed = 0
    for page, rep in render(site, argv[1:]).items():
        bad = problems(rep)
        failed += bool(bad)
        print(f"{page}: {rep['math']} formulas typeset, {rep['images']} images"
              + ("" if not bad else " -- " + "; ".join(bad)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
