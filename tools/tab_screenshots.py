"""Screenshots of the standalone tab for the README (headless Debian chromium, never a downloaded one).

    .venv/bin/python -m astolfo_merge app --demo --models-dir /tmp/uxdemo --port 7871 &
    .venv/bin/python tools/tab_screenshots.py http://127.0.0.1:7871 /tmp/uxdemo docs/img

Writes merge.png (a 3-model average, planned and merged), repair.png (a pruned SDXL file without its
VAE, with the base the tab preset and the dry run) and analysis.png (distances of three models).
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from astolfo_merge.features.demo import DEMO_SCALE, write_synthetic  # noqa: E402
from astolfo_merge.io import arch  # noqa: E402

from browser_helpers import launch, pick  # noqa: E402

NOVAE = "demo-sdxl-novae.safetensors"


def shrink(path):
    """A 256-colour palette PNG: a UI screenshot stays legible at about half the bytes."""
    from PIL import Image
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def choose(page, elem_id, option):
    page.locator(f"#{elem_id} input").first.click()
    page.locator("ul.options li", has_text=option).first.click()


def main(url, models, out):
    models, out = pathlib.Path(models), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if list(models.glob("merge-*.safetensors")) or list(models.glob("*-repaired.safetensors")):
        sys.exit(f"{models} holds earlier merges: start the app on a fresh demo folder")
    if not (models / NOVAE).exists():
        drop = [k for k in arch.layout("sdxl", DEMO_SCALE) if k.startswith("first_stage_model.")]
        write_synthetic(models / NOVAE, "sdxl", DEMO_SCALE, variant=16, drop=drop)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.locator("#astolfo_merge_refresh").click()
        page.wait_for_selector(f"#astolfo_merge_pool label >> text={NOVAE}")
        choose(page, "astolfo_merge_method", "n_average")
        for name in ("demo-sdxl-anime.safetensors", "demo-sdxl-photo.safetensors", NOVAE):
            pick(page, name)
        page.locator("#astolfo_merge_check").click()
        page.wait_for_function("document.querySelector('#astolfo_merge_message').innerText.includes('Predicted peak')")
        page.locator("#astolfo_merge_merge").click()
        page.wait_for_function("document.querySelector('#astolfo_merge_progress .astolfo-progress').dataset.status === 'done'"
                               " && document.querySelector('#astolfo_merge_summary').innerText.includes('sha256')")
        page.wait_for_timeout(2000)     # the page's "processing" overlays fade out
        page.screenshot(path=str(out / "merge.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 1250},
                        full_page=True)

        page.locator("button", has_text="Repair").first.click()
        choose(page, "astolfo_merge_repair_model", NOVAE)
        page.wait_for_function("document.querySelector('#astolfo_merge_repair_base input').value.includes('base')")
        page.locator("#astolfo_merge_repair_dry_run").click()
        page.wait_for_function("document.querySelector('#astolfo_merge_repair_result textarea').value.includes('dry run')")
        page.wait_for_timeout(1000)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(out / "repair.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 1300},
                        full_page=True)

        page.locator("button", has_text="Analysis").first.click()
        for name in ("demo-sdxl-anime", "demo-sdxl-photo", "demo-sdxl-vpred"):
            choose(page, "astolfo_merge_analysis_models", name)
        choose(page, "astolfo_merge_analysis_base", "demo-sdxl-base")
        page.locator("#astolfo_merge_analysis_run").click()
        page.wait_for_selector("#astolfo_merge_analysis_image img")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "analysis.png"))
        browser.close()
    for name in ("merge.png", "repair.png", "analysis.png"):
        shrink(out / name)


if __name__ == "__main__":
    main(*sys.argv[1:4])
