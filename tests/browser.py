"""A report as a headless Chromium lays it out: its text and the boxes of its table cells, captions and pictures.

Chromium's ``--dump-dom`` prints a page's DOM once its scripts have run; the report is loaded into an iframe of a
small page whose script measures it (``getBoundingClientRect``; text lines by the client rects of a ``Range``) and
writes the measurements into its own DOM as JSON. No browser: :func:`chromium` is None (the tests skip, saying so).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

SKIP = "no Chromium binary (chromium, chromium-browser, google-chrome) on PATH: the rendered report is not checked"

MEASURE = """<!doctype html><html><body>
<iframe id="page" src="%s" style="width:%dpx;height:%dpx;border:0"></iframe><pre id="out">not measured</pre>
<script>
const page = document.getElementById("page");
page.onload = () => {
  const d = page.contentDocument;
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const lines = e => { const r = d.createRange(); r.selectNodeContents(e);
                       return new Set([...r.getClientRects()].map(q => Math.round(q.top))).size; };
  document.getElementById("out").textContent = JSON.stringify({
    runs: d.querySelector("p").textContent,
    header: [...d.querySelectorAll("table tr th")].map(c => c.textContent),
    rows: [...d.querySelectorAll("table tr")].slice(1).map(tr =>
      [...tr.cells].map(c => ({text: c.textContent, lines: lines(c), box: box(c)}))),
    figures: [...d.querySelectorAll("figure")].map(f => ({
      caption: f.querySelector("figcaption").textContent, caption_box: box(f.querySelector("figcaption")),
      image_box: box(f.querySelector("img")), image_width: f.querySelector("img").naturalWidth})),
    images: [...d.querySelectorAll("img")].map(i => ({alt: i.alt, width: i.naturalWidth, box: box(i)})),
  });
};
</script></body></html>"""


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _run(binary: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def measure(page: Path, folder: Path, width: int = 1400, height: int = 6000) -> dict:
    """The report at ``page`` as Chromium lays it out in a ``width`` px wide window (see the module's docstring)."""
    wrapper = folder / "measure.html"
    wrapper.write_text(MEASURE % (page.resolve().as_uri(), width, height), encoding="utf-8")
    dom = _run(chromium(), "--virtual-time-budget=20000", "--dump-dom", wrapper.as_uri()).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "not measured", dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 3000) -> Path:
    _run(chromium(), f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri())
    return png
