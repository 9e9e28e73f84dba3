"""The report page on the shared ants/bees photos: one real run, its report.html, a screenshot.

    python benchmarks/report_page.py [--strategy=full] [--output=BENCHMARKS.md]

Runs ``scripts/train.py`` on ``../shared/data/hymenoptera/train`` with the shared ImageNet
MobileNet(alpha=0.25) weights at 224² (its defaults otherwise: a test split of 20 % held out, never
trained or early-stopped on), opens the run's ``report.html`` in headless Chromium (Debian's
``chromium``) for ``benchmarks/report_ants_bees.jpg``, and writes what the report found — test
accuracy, calibration before/after the temperature, TTA's gain, the audit's leaks, duplicates and
suspected mislabels, skipped and converted files — to the ``report_ants_bees`` section of
BENCHMARKS.md. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_DATA, DEFAULT_WEIGHTS, REPO, machine, write_section

SCREENSHOT = REPO / "benchmarks" / "report_ants_bees.jpg"


def run(strategy: str, workdir: Path) -> Path:
    run_dir = workdir / "run"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--data={DEFAULT_DATA}",
        "--backbone=MobileNet",
        "--backbone_kwargs=alpha=0.25",
        f"--weights={DEFAULT_WEIGHTS}",
        "--image_size=224",
        f"--strategy={strategy}",
        f"--output_dir={run_dir}",
        f"--base_dir={workdir / 'saved_models'}",
    ]
    subprocess.run(cmd, check=True, cwd=workdir)
    return run_dir


def screenshot(page: Path, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: no screenshot (apt-get install chromium)")
        return
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            "--window-size=1200,3000",
            f"--screenshot={out.with_suffix('.png')}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image  # a JPEG: a fifth of the PNG's size, for the repository

    png = out.with_suffix(".png")
    Image.open(png).convert("RGB").save(out, quality=80, optimize=True)
    png.unlink()


def summary(metrics: dict, audit: dict) -> str:
    cal = metrics.get("calibration") or {}
    lines = [
        f"Test accuracy {metrics['accuracy']:.3f} on {metrics['num_examples']} held-out photos "
        f"(MobileNet alpha=0.25, 224², strategy {metrics['run']['strategy']}).",
    ]
    if cal:
        lines.append(
            f"Calibration: temperature {cal['temperature']:.2f} fit on {cal['fit_on']}; test ECE "
            f"{cal['test_ece_before']:.3f} → {cal['test_ece_after']:.3f} (validation "
            f"{cal['validation_ece_before']:.3f} → {cal['validation_ece_after']:.3f})."
        )
    else:
        lines.append(f"Calibration: {metrics.get('calibration_note')}")
    data = metrics.get("data") or {}
    for kind in ("skipped", "notes"):
        for item in data.get(kind) or []:
            label = "skipped" if kind == "skipped" else "converted"
            lines.append(f"{label}: `{item['path']}` ({item['reason']}).")
    lines.append(
        f"Audit: {audit['leak_count']} near-duplicate pairs across splits, "
        f"{audit['duplicate_count']} within a split, {audit['mislabel_count']} suspected "
        "mislabels:"
    )
    for m in audit.get("mislabels", []):
        lines.append(
            f"- `{m['split']}: {m['item']}` labelled {m['label']}, the probe says "
            f"{m['predicted']} (p={m['confidence']:.2f})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="full")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlkeras-report-") as tmp:
        run_dir = run(args.strategy, Path(tmp))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        audit = json.loads((run_dir / "audit.json").read_text())
        screenshot(run_dir / "report.html", SCREENSHOT)
        tta = None
        page = (run_dir / "report.html").read_text()
        if "test accuracy with tta" in page:
            tta = page.split('<section id="tta">', 1)[1].split("</section>", 1)[0]
    info = machine()
    text = (
        "## The report on ants/bees (`benchmarks/report_page.py`)\n\n"
        + summary(metrics, audit)
        + ("\n\nTTA (from the report): " + _text(tta) if tta else "")
        + f"\n\nScreenshot: `benchmarks/report_ants_bees.jpg`. Machine: {info['cpu']}, "
        f"{info['cores']} cores. Re-measure: `python benchmarks/report_page.py`.\n"
    )
    print(text)
    if args.output:
        write_section(args.output, "report_ants_bees", text)


def _text(fragment: str) -> str:
    """A section's table as one line of text."""
    import re

    cells = re.findall(r"<td>(.*?)</td>", fragment)
    return "; ".join(f"{a} {b}" for a, b in zip(cells[::2], cells[1::2], strict=False))


if __name__ == "__main__":
    main()
