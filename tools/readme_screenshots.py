"""Regenerate the README's screenshots (``make screenshots``): run the real-viewer test, which saves
OHIF screenshots and the report PDF under ``build/viewer/``, then write small copies to
``docs/screenshots/``: OHIF with the SEG overlay, OHIF with the SR outlines and values, OHIF showing
the PDF, and the PDF's first two pages rendered by poppler's ``pdftoppm``.

Each PNG is scaled (OHIF 1200 px wide, PDF pages 800 px) and palettised (256 / 128 colours) to stay < 300 KB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = ROOT / "build" / "viewer"
DOCS = ROOT / "docs" / "screenshots"
MAX_WIDTH = 1200
MAX_BYTES = 300_000


def small_png(source: Path, target: Path, max_width: int = MAX_WIDTH, colors: int = 256) -> int:
    """Write ``source`` scaled to ``max_width`` px and palettised (``colors``) to ``target``; returns its
    size in bytes."""
    image = Image.open(source).convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    env = {**os.environ, "PARASPINAL_VIEWER_ARTEFACTS": str(ARTEFACTS)}
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/viewer"], cwd=ROOT, env=env)
    if test.returncode != 0:
        print("the viewer test failed: screenshots not updated", file=sys.stderr)
        return test.returncode
    DOCS.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in ("ohif_seg.png", "ohif_sr.png", "ohif_pdf.png"):
        sizes[name] = small_png(ARTEFACTS / name, DOCS / name)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["pdftoppm", "-png", "-r", "110", "-f", "1", "-l", "2", str(ARTEFACTS / "report.pdf"),
                        f"{tmp}/page"], check=True)
        for i, page in enumerate(sorted(Path(tmp).glob("page*.png")), start=1):
            sizes[f"report_page{i}.png"] = small_png(page, DOCS / f"report_page{i}.png", max_width=800, colors=128)
    for name, size in sizes.items():
        print(f"docs/screenshots/{name}: {size / 1000:.0f} KB")
    too_big = [name for name, size in sizes.items() if size > MAX_BYTES]
    if too_big:
        print(f"over {MAX_BYTES // 1000} KB: {', '.join(too_big)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
