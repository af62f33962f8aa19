"""Headless Chromium for the report tests: open a copy of a report page with a probe
script added (it records console errors, then measures the plots, hovers a point and
clicks a legend entry), or take a screenshot of a page.

As a script, it writes the screenshot the README shows:

    .venv/bin/python -m tests.orchestrator.browser results/smoke/report.html docs/report.png
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Runs before the page's own scripts: every console error or warning, uncaught
# exception and rejected promise is kept.
CATCH = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled rejection: " + e.reason);
});
["error", "warn"].forEach(function (level) {
  var original = console[level];
  console[level] = function () {
    window.__errors.push(level + ": " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
});
</script>"""

# Runs after the page's scripts: waits for the plots, measures them and the layout,
# hovers the first point of PLOT, clicks the legend entry named LEGEND in it, and writes
# what it saw as JSON into <pre id="probe">.
PROBE = """<script>
(function () {
  var out = {};
  function settle(then) { setTimeout(then, 1500); }
  function press(node) {
    var box = node.getBoundingClientRect();
    var at = {bubbles: true, clientX: box.left + 2, clientY: box.top + 2, button: 0};
    node.dispatchEvent(new MouseEvent("mousedown", at));
    node.dispatchEvent(new MouseEvent("mouseup", at));
  }
  function finish() {
    out.errors = window.__errors;
    var pre = document.createElement("pre");
    pre.id = "probe";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }
  settle(function () {
    out.plots = Array.prototype.map.call(document.querySelectorAll(".plotly-box"), function (b) {
      var r = b.getBoundingClientRect();
      return {id: b.id, drawn: b.getAttribute("data-drawn") === "true", width: r.width,
        height: r.height, shown: !b.closest("section.dataset").hidden};
    });
    out.scrollWidth = document.documentElement.scrollWidth;
    out.innerWidth = window.innerWidth;
    out.wideTables = Array.prototype.filter.call(document.querySelectorAll("table"),
      function (t) { return t.scrollWidth > t.clientWidth + 1 ||
        t.getBoundingClientRect().right > window.innerWidth; }).length;
    out.findings = Array.prototype.map.call(
      document.querySelectorAll("#findings ul.findings > li"),
      function (li) { return li.querySelector(".statement").textContent; });
    var gd = document.getElementById("plot-PLOT");
    if (!gd) { finish(); return; }
    Plotly.Fx.hover(gd, [{curveNumber: 0, pointNumber: 0}]);
    out.hover = Array.prototype.map.call(gd.querySelectorAll(".hoverlayer .hovertext"),
      function (n) { return n.textContent; });
    var entry = Array.prototype.filter.call(gd.querySelectorAll(".legend .traces"),
      function (t) { return t.textContent === "LEGEND"; })[0];
    out.legendFound = !!entry;
    if (entry) press(entry.querySelector(".legendtoggle"));
    settle(function () {
      out.traces = gd.data.map(function (t) {
        return {name: t.name, visible: t.visible === undefined ? true : t.visible,
          x: t.x, customdata: t.customdata || null};
      });
      finish();
    });
  });
})();
</script>"""


def chromium() -> str | None:
    """Debian's ``chromium`` (``make test`` installs it), or ``$CHROMIUM``."""
    return (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )


def _run(page: Path, fragment: str, *args: str, width: int, height: int) -> str:
    profile = page.parent / f"profile-{page.stem}-{abs(hash((fragment, args)))}"
    done = subprocess.run(
        [
            chromium() or "chromium",
            "--headless",
            "--no-sandbox",  # the tests may run as root
            "--disable-gpu",
            "--enable-unsafe-swiftshader",  # software WebGL for the 3-D and parallel plots
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--hide-scrollbars",
            "--virtual-time-budget=20000",  # timers (the probe's waits) run in virtual time
            *args,
            f"{page.as_uri()}{fragment}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout


def probe(page: Path, plot: str, legend: str, fragment: str = "", width: int = 1400) -> dict:
    """What the probe saw on a copy of ``page`` at ``width`` px."""
    text = page.read_text()
    text = text.replace("<head>", "<head>" + CATCH, 1)
    probe_js = PROBE.replace("PLOT", plot).replace("LEGEND", legend)
    text = text[: text.rindex("</body>")] + probe_js + "</body></html>\n"
    copy = page.with_name(f"{page.stem}-probe-{abs(hash((plot, legend, fragment)))}.html")
    copy.write_text(text)
    dom = _run(copy, fragment, "--dump-dom", width=width, height=1000)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, flags=re.S)
    if found is None:
        raise AssertionError("the probe wrote nothing: the page's scripts did not finish")
    return json.loads(
        found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    )


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 2000) -> Path:
    """A ``width`` x ``height`` screenshot of the top of ``page``."""
    _run(page, "", f"--screenshot={out.resolve()}", width=width, height=height)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.orchestrator.browser REPORT.html OUT.png")
    print(screenshot(Path(sys.argv[1]).resolve(), Path(sys.argv[2])))
