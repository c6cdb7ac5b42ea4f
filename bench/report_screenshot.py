"""Write a run folder's report and photograph report.html in headless Chromium.

    python bench/report_screenshot.py RUN_DIR [--out report.png] [--width 1280] [--height 4000]

Prints how long write_report took, the report sizes and the screenshot path. Needs
/usr/bin/chromium (Debian: apt-get install -y chromium). The page loads from disk with
networking off, which also checks that the report needs no server and no outside asset.
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from mapd.report import write_report

CHROMIUM = "/usr/bin/chromium"


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    """Save a PNG of ``page`` rendered by headless Chromium in a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="mapd-chromium-") as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()

    start = time.perf_counter()
    page = write_report(args.run_dir)
    seconds = time.perf_counter() - start
    markdown = args.run_dir / "report.md"
    print(f"write_report: {seconds:.2f} s; report.html {page.stat().st_size / 1024:.0f} KiB, "
          f"report.md {markdown.stat().st_size / 1024:.1f} KiB")
    screenshot(page, args.out, args.width, args.height)
    print(f"screenshot: {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {args.width}x{args.height})")


if __name__ == "__main__":
    main()
