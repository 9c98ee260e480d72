"""Check, in headless Chromium at 1280 px, that no code cell of the built book scrolls sideways.

    python .ci/check_overflow.py [_build/html]    # after `jupyter-book build .`

For each chapter page it writes a copy with a small script that, once the page has loaded,
reports every ``div.cell_input pre`` whose ``scrollWidth`` exceeds its ``clientWidth``; Chromium
dumps the DOM and the report is read back. Exit status 1 if any code cell overflows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

WIDTH = 1280
REPORT = re.compile(r"OVERFLOW\[(\d+)\|([^\]]*)\]")
PROBE = """<script>
window.addEventListener('load', function () {
  var pres = document.querySelectorAll('div.cell_input pre');
  var wide = [];
  pres.forEach(function (pre, i) {
    if (pre.scrollWidth > pre.clientWidth + 1) wide.push(i + ':' + pre.scrollWidth + 'x' + pre.clientWidth);
  });
  var out = document.createElement('pre');
  out.textContent = 'OVERFLOW[' + pres.length + '|' + wide.join(';') + ']';
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def overflowing(page: Path, browser: str) -> tuple[int, list[str]]:
    """(number of code cells, the ones that scroll sideways) of one built page."""
    probe = page.with_name(f"_overflow_{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},4000",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        ).stdout
    finally:
        probe.unlink()
    found = REPORT.search(dom)
    if not found:
        raise RuntimeError(f"{page}: the overflow probe did not report (did the page load?)")
    return int(found.group(1)), [w for w in found.group(2).split(";") if w]


def main(argv: list[str]) -> int:
    html = Path(argv[0] if argv else "_build/html").resolve()  # file:// URIs need an absolute path
    browser = chromium()
    if browser is None:
        print("no chromium on this machine: install it (apt-get install chromium) to run this check")
        return 2
    pages = sorted((html / "book").glob("[0-9]*.html")) + sorted((html / "book").glob("skymask_costs.html"))
    if not pages:
        print(f"no chapter pages under {html / 'book'}: build the book first")
        return 2
    bad = 0
    for page in pages:
        cells, wide = overflowing(page, browser)
        print(f"{page.name}: {cells} code cells, {len(wide)} scroll sideways {wide if wide else ''}")
        bad += len(wide)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
