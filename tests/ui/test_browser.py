"""The standalone AstolfoMerge tab driven in real Chromium: merge, compare with the CLI, cancel.

Starts `python -m astolfo_merge app` in a subprocess on a free 127.0.0.1 port over a temp folder
of tiny demo-style checkpoints. The app runs with a pause per key (its `--throttle`, RunOptions.throttle)
so progress and cancel are observable on models this small.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from astolfo_merge.io.header import read_header

ROOT = pathlib.Path(__file__).resolve().parents[2]
from browser_helpers import CHROMIUM, free_port, launch, pick, progress, sha256, stop, wait_http

ARTIFACTS = ROOT / "test-artifacts"
THROTTLE = "0.004"   # the app's --throttle: seconds per key
SCREENSHOT = ARTIFACTS / "merger_tab.png"

pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def app(request, tmp_path):
    """The app on a fresh models folder; the tiny checkpoints are linked in while it imports (saves ~8 s)."""
    models = tmp_path / "models"
    models.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "ASTOLFO_MERGE_CACHE_DIR": str(home / "cache"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "astolfo_merge", "app", "--models-dir", str(models),
                             "--port", str(port), "--throttle", THROTTLE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        demo_dir = request.getfixturevalue("demo_dir")
        for f in demo_dir.iterdir():
            os.symlink(f, models / f.name)
        # The test calls ready() once its browser is up: both start at the same time.
        yield {"url": url, "models": models, "env": env, "ready": lambda: wait_http(url, proc)}
    finally:
        stop(proc)


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(20_000)
        yield pg
        browser.close()


def watch(page, until, timeout=30.0, on_step=None) -> list:
    """Progress observations every 100 ms until `until(observation)` holds."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        obs = progress(page)
        seen.append(obs)
        if on_step:
            on_step(obs)
        if until(obs):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"progress never reached the expected state; last seen {seen[-5:]}")


def output_name(page) -> str:
    return page.locator("#astolfo_merge_output_name textarea, #astolfo_merge_output_name input").first.input_value()


def test_merge_in_the_browser_matches_the_cli_and_cancel_leaves_no_file(app, page, tmp_path):
    models = app["models"]
    app["ready"]()
    page.goto(app["url"])
    page.locator("#astolfo_merge_refresh").click()   # the files may have been linked after the tab was built
    page.wait_for_selector("#astolfo_merge_pool label >> text=sdxl-b.safetensors")

    # 1. two demo models, weighted_sum, alpha 0.3.
    page.locator("#astolfo_merge_method input").first.click()
    page.locator("ul.options li", has_text="weighted_sum").first.click()
    pick(page, "sd1-a.safetensors")
    pick(page, "sd1-b.safetensors")
    alpha = page.locator("#astolfo_merge_param_slider0 input[type=number]")
    alpha.fill("0.3")
    alpha.press("Enter")
    page.wait_for_function("document.querySelector('#astolfo_merge_param_slider0 input[type=range]').value === '0.3'")
    name = output_name(page)
    assert name.startswith("merge-2x-weighted_sum-sd1-a-")

    # 2. the tab saves its recipe; the CLI merges that file while the tab merges (compared at the end).
    page.locator("#astolfo_merge_recipe").locator("button, .label-wrap").first.click()
    page.locator("#astolfo_merge_recipe_name textarea, #astolfo_merge_recipe_name input").first.fill("browser")
    page.locator("#astolfo_merge_save_recipe").click()
    saved = models / "recipes" / "browser.json"
    deadline = time.monotonic() + 20
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    recipe = json.loads(saved.read_text())
    assert recipe["method"] == "weighted_sum" and recipe["params"]["alpha"] == pytest.approx(0.3)
    assert recipe["pool"] == ["sd1-a.safetensors", "sd1-b.safetensors"] and recipe["output"] == name
    cli_dir = tmp_path / "cli_models"
    cli_dir.mkdir()
    for f in recipe["pool"] + ([recipe["base"]] if recipe.get("base") else []):
        os.symlink(models / f, cli_dir / f)
    cli = subprocess.Popen([sys.executable, "-m", "astolfo_merge", "merge", str(saved), "--models-dir", str(cli_dir), "-q"],
                           cwd=ROOT, env=app["env"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)

    # 3. Merge: the bar runs to the end, the file exists, shows up in the pool, the summary has its hash.
    page.locator("#astolfo_merge_merge").click()
    seen = watch(page, lambda o: o["status"] in ("done", "failed", "cancelled"))
    assert seen[-1]["status"] == "done", page.locator("#astolfo_merge_log textarea").input_value()
    assert seen[-1]["done"] == seen[-1]["total"] == 1131
    assert any(0 < o["done"] < o["total"] for o in seen), "the bar should move through intermediate states"
    out = models / name
    assert out.is_file()
    assert json.loads(read_header(out).metadata["astolfo_merge_recipe"]) == recipe
    page.wait_for_function("document.querySelector('#astolfo_merge_summary').innerText.includes('sha256')")
    assert sha256(out) in page.locator("#astolfo_merge_summary").first.inner_text()
    assert page.locator("#astolfo_merge_pool label", has_text=name).count() == 1, "new file must be selectable"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # 4. a second merge, followed through a page reload, cancelled midway, leaves no file (nor a temp file).
    page.locator("#astolfo_merge_select_none").click()
    page.wait_for_function("document.querySelector('#astolfo_merge_pool_summary').innerText.includes('No model')")
    pick(page, "sdxl-a.safetensors")
    pick(page, "sdxl-b.safetensors")
    second = output_name(page)
    assert "sdxl-a" in second
    page.locator("#astolfo_merge_merge").click()
    watch(page, lambda o: o["status"] == "running" and o["done"] > 0)
    page.reload()                                     # a reloaded page re-attaches to the running merge
    page.wait_for_selector("#astolfo_merge_progress")
    watch(page, lambda o: o["status"] == "running" and o["done"] > 0)
    page.locator("#astolfo_merge_cancel").click()
    seen = watch(page, lambda o: o["status"] in ("done", "failed", "cancelled"))
    assert seen[-1]["status"] == "cancelled"
    assert 0 < seen[-1]["done"] < seen[-1]["total"]
    assert not (models / second).exists()
    assert not [p for p in os.listdir(models) if p.endswith(".partial")]

    # 5. the CLI's file for the same recipe is byte for byte the tab's.
    cli_output, _ = cli.communicate(timeout=60)
    assert cli.returncode == 0, cli_output
    assert sha256(cli_dir / name) == sha256(out)


def test_a_partial_model_the_method_lock_and_repair_in_the_browser(app, page, make_checkpoint):
    """The events behind HOSTS.md's Forge Classic findings: the pool note follows the base, the method
    greys out when every component is taken, Repair presets a base and its file joins the pool."""
    from astolfo_merge.io import arch
    models = app["models"]
    drop = [k for k in arch.layout("sdxl", 64) if k.startswith("first_stage_model.")]
    make_checkpoint("sdxl-novae.safetensors", "sdxl", variant=5, drop=drop, folder=models)
    app["ready"]()
    page.goto(app["url"])
    page.locator("#astolfo_merge_refresh").click()
    page.wait_for_selector("#astolfo_merge_pool label >> text=sdxl-novae.safetensors")
    pick(page, "sdxl-a.safetensors")
    pick(page, "sdxl-novae.safetensors")
    summary = "document.querySelector('#astolfo_merge_pool_summary').innerText"
    page.wait_for_function(f"{summary}.includes('filled from the base sdxl-base.safetensors')")
    page.locator("#astolfo_merge_base input").first.click()
    page.locator("ul.options li", has_text="(none)").first.click()
    page.wait_for_function(f"{summary}.includes('pick a Base model to fill it')")

    page.locator("#astolfo_merge_components").locator("button, .label-wrap").first.click()
    slider = page.locator("#astolfo_merge_param_slider0 input[type=number]")
    assert slider.is_enabled()
    for comp in ("unet", "te0", "te1", "vae"):
        page.locator(f"#astolfo_merge_comp_{comp}_mode label", has_text="Keep base").click()
    page.wait_for_function("document.querySelector('#astolfo_merge_param_slider0 input[type=number]').disabled")
    assert "not used" in page.locator("#astolfo_merge_method_help").first.inner_text()
    page.locator("#astolfo_merge_comp_unet_mode label", has_text="Main method").click()
    page.wait_for_function("!document.querySelector('#astolfo_merge_param_slider0 input[type=number]').disabled")

    page.locator("button", has_text="Repair").first.click()
    page.locator("#astolfo_merge_repair_model input").first.click()
    page.locator("ul.options li", has_text="sdxl-novae.safetensors").first.click()
    page.wait_for_function("document.querySelector('#astolfo_merge_repair_base input').value === 'sdxl-base.safetensors'")
    page.locator("#astolfo_merge_repair_dry_run").click()
    result = "document.querySelector('#astolfo_merge_repair_result textarea').value"
    page.wait_for_function(f"{result}.includes('fill from base: VAE 248')")
    page.locator("#astolfo_merge_repair_run").click()
    page.wait_for_function(f"{result}.startsWith('wrote')", timeout=60_000)
    assert (models / "sdxl-novae-repaired.safetensors").is_file()
    page.locator("button", has_text="Merge").first.click()
    page.wait_for_selector("#astolfo_merge_pool label >> text=sdxl-novae-repaired.safetensors")
