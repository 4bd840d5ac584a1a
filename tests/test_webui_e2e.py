"""AstolfoMerge inside a real AUTOMATIC1111 WebUI (v1.10.1): the AstolfoMerge tab merges in Chromium, the
WebUI's own API lists the new checkpoint with its hash, and the "[Merger] …" XYZ axes are offered.

Optional: runs only when these environment variables point at a prepared WebUI (CI skips it):

- ``A1111_DIR``: a WebUI checkout whose ``repositories/`` already hold stable-diffusion-stability-ai,
  generative-models, k-diffusion and an (empty is fine) stable-diffusion-webui-assets folder,
  because the WebUI is started with ``--skip-prepare-environment`` (nothing is cloned or installed);
- ``A1111_PYTHON``: the interpreter of the WebUI's own environment (torch, gradio 3.41.2 and the
  rest of its requirements_versions.txt, plus scipy and matplotlib for our install.py);
  default ``$A1111_DIR/venv/bin/python`` if it exists, else this interpreter.

Example: ``A1111_DIR=/work/webui A1111_PYTHON=/work/webui-venv/bin/python
.venv/bin/python -m pytest tests/test_webui_e2e.py``.

The WebUI runs CPU-only and offline on a fresh ``--data-dir`` (config, caches, the extension) and
``--ckpt-dir`` (the session's tiny demo checkpoints), on a free 127.0.0.1 port, with
``--skip-load-model-at-start``: our 1/64-scale checkpoints can be listed, hashed and merged but not
loaded into the WebUI's model, so image generation is out of scope (A1111.md §10.3). The extension
is copied (not linked) into ``<data-dir>/extensions/astolfo-merge`` so the WebUI does not try to read
git remotes of this checkout.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
from browser_helpers import CHROMIUM, free_port, sha256, launch, pick as _pick, progress as merge_status
SCREENSHOT = ROOT / "test-artifacts" / "webui_merger_tab.png"
A1111_DIR = os.environ.get("A1111_DIR", "")
START_TIMEOUT_S = 300          # the WebUI imports torch, gradio, ldm and sgm: ~20 s idle, minutes when busy
AXES = ("[Merger] alpha", "[Merger] recipe")
EXTENSION_SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                        "test-artifacts", "tests", "bench", "tools", "*.safetensors")

pytestmark = [
    pytest.mark.webui, pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not A1111_DIR, reason="set A1111_DIR to a prepared AUTOMATIC1111 WebUI checkout"),
]


def webui_python() -> str:
    if os.environ.get("A1111_PYTHON"):
        return os.environ["A1111_PYTHON"]
    own_venv = pathlib.Path(A1111_DIR, "venv", "bin", "python")
    return str(own_venv) if own_venv.exists() else sys.executable


def get_json(url, data=None, timeout=10):
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class WebUI:
    """A started WebUI: its base url, folders and log (read on failure)."""

    def __init__(self, url, models, data, log):
        self.url, self.models, self.data, self.log = url, models, data, log

    def api(self, route, data=None):
        return get_json(self.url + route, data)

    def log_tail(self, chars=4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def our_errors(self) -> list:
        """Tracebacks and "*** …" reports in the WebUI's log that involve AstolfoMerge. Others are
        expected: each page load makes the WebUI try to load a model, which fails offline (no CLIP
        tokenizer) and would fail anyway on our 1/64-scale checkpoints."""
        blocks = re.split(r"\n(?=Traceback|\*\*\* )", self.log.read_text(errors="replace"))
        return [block for block in blocks if block.startswith(("Traceback", "*** ")) and "astolfo" in block.lower()]

    def sd_models(self) -> dict:
        """/sdapi/v1/sd-models as {file name: entry} (a title gains " [shorthash]" once the hash is known)."""
        return {os.path.basename(entry["filename"]): entry for entry in self.api("/sdapi/v1/sd-models")}


@pytest.fixture(scope="module")
def webui(demo_dir, tmp_path_factory):
    """The WebUI with our extension over a models folder holding the session's demo checkpoints."""
    webui_dir = pathlib.Path(A1111_DIR)
    if not (webui_dir / "launch.py").is_file() or not (webui_dir / "modules" / "sd_models.py").is_file():
        pytest.fail(f"A1111_DIR={A1111_DIR} is not an AUTOMATIC1111 WebUI checkout (no launch.py / modules/)")
    base = tmp_path_factory.mktemp("webui")
    data, models, home = base / "data", base / "models", base / "home"
    for folder in (data / "extensions", models, home):
        folder.mkdir(parents=True)
    shutil.copytree(ROOT, data / "extensions" / "astolfo-merge", ignore=EXTENSION_SKIP)
    for f in demo_dir.iterdir():
        shutil.copy(f, models / f.name)
    port = free_port()
    env = {**os.environ, "HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ASTOLFO_MERGE_CACHE_DIR": str(home / "cache")}
    for leaked in ("PYTHONPATH", "VIRTUAL_ENV", "COMMANDLINE_ARGS"):
        env.pop(leaked, None)
    log = base / "webui.log"
    args = [webui_python(), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--skip-version-check", "--use-cpu", "all", "--no-half", "--no-download-sd-model",
            "--skip-load-model-at-start", "--do-not-download-clip", "--disable-nan-check", "--api",
            "--data-dir", str(data), "--ckpt-dir", str(models), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=webui_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = WebUI(f"http://127.0.0.1:{port}", models, data, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the WebUI exited with {proc.returncode} while starting:\n{server.log_tail()}")
            try:
                server.sd_models()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the WebUI did not answer in {START_TIMEOUT_S} s:\n{server.log_tail()}")
                time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)   # the group of the process this fixture started
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def page():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        pg = browser.new_page(viewport={"width": 1500, "height": 1100})
        pg.set_default_timeout(30_000)
        pg.errors = []
        pg.on("pageerror", lambda error: pg.errors.append(f"{error}\n{getattr(error, 'stack', '')}"))
        yield pg
        browser.close()


def finished(status: dict):
    return status if status["status"] in ("done", "failed", "cancelled") else None


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout} s")


def quicksettings_checkpoints(page) -> list:
    """The titles the WebUI's own "Stable Diffusion checkpoint" dropdown offers right now."""
    dropdown = page.locator("#setting_sd_model_checkpoint input").first
    dropdown.click()
    options = page.locator("#setting_sd_model_checkpoint ul.options li").all_inner_texts()
    dropdown.press("Escape")
    return [text.strip() for text in options]


def test_a_merge_in_the_merger_tab_is_listed_by_the_webui_with_its_hash(webui, page):
    page.goto(webui.url)
    page.get_by_role("button", name="AstolfoMerge", exact=True).click()   # beside the built-in "Checkpoint Merger"
    page.wait_for_selector("#astolfo_merge_pool label >> text=sd1-b.safetensors")

    page.locator("#astolfo_merge_method input").first.click()
    page.locator("ul.options li", has_text="weighted_sum").first.click()
    _pick(page, "sd1-a.safetensors", root="gradioApp()")
    _pick(page, "sd1-b.safetensors", root="gradioApp()")
    alpha = page.locator("#astolfo_merge_param_slider0 input[type=number]")
    alpha.fill("0.3")
    alpha.press("Enter")
    page.wait_for_function(
        "gradioApp().querySelector('#astolfo_merge_param_slider0 input[type=range]').value === '0.3'")
    name = page.locator("#astolfo_merge_output_name textarea, #astolfo_merge_output_name input").first.input_value()
    assert name.endswith(".safetensors") and "sd1-a" in name
    assert name not in webui.sd_models()

    page.locator("#astolfo_merge_merge").click()
    final = wait_until(lambda: finished(merge_status(page)), 120, "the merge should finish")
    log = page.locator("#astolfo_merge_log textarea").input_value()
    assert final["status"] == "done", f"{final}\n{log}\n{webui.log_tail()}"
    out = webui.models / name
    assert out.is_file()

    # The glue lists the checkpoints itself after the merge (no refresh-checkpoints call needed) and
    # writes the file's sha256 into the WebUI's hash cache, so the API reports it without re-hashing.
    listed = wait_until(lambda: webui.sd_models().get(name), 20,
                        f"GET /sdapi/v1/sd-models should list {name} after the merge; tab log:\n{log}")
    assert pathlib.Path(listed["filename"]).resolve() == out.resolve()
    assert listed["sha256"] == sha256(out), f"the WebUI's hash cache should hold the merge's sha256: {listed}"
    assert listed["hash"] == sha256(out)[:10]
    assert listed["title"] == f"{name} [{sha256(out)[:10]}]"

    # The page side refreshes the WebUI's quicksettings checkpoint dropdown once the merge is done.
    titles = wait_until(lambda: [t for t in quicksettings_checkpoints(page) if name in t], 20,
                        f"the quicksettings checkpoint dropdown should offer {name}")
    assert titles
    page.wait_for_function("gradioApp().querySelector('#astolfo_merge_summary').innerText.includes('sha256')")
    assert sha256(out) in page.locator("#astolfo_merge_summary").first.inner_text()
    assert not [e for e in page.errors if "astolfo" in e.lower()], page.errors
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert not webui.our_errors(), webui.our_errors()


def test_a_refresh_through_the_api_keeps_the_merged_checkpoint_and_its_hash(webui):
    merged = [p for p in webui.models.iterdir() if p.name.startswith("merge-")]
    if not merged:
        pytest.skip("needs the merge of the test before")
    webui.api("/sdapi/v1/refresh-checkpoints", data=b"{}")
    listed = webui.sd_models()
    for path in merged:
        assert listed[path.name]["sha256"] == sha256(path)


def test_the_xyz_plot_offers_each_merger_axis_once_on_txt2img_and_img2img(webui):
    config = get_json(webui.url + "/config")
    offered = {}
    for component in config["components"]:
        props = component.get("props", {})
        elem_id = props.get("elem_id") or ""
        if elem_id.startswith("script_") and elem_id.endswith(("_xyz_plot_x_type", "_xyz_plot_y_type",
                                                                 "_xyz_plot_z_type")):
            offered[elem_id] = [c[0] if isinstance(c, (list, tuple)) else c for c in props.get("choices", [])]
    expected = {f"script_{tab}_xyz_plot_{axis}_type" for tab in ("txt2img", "img2img") for axis in "xyz"}
    assert expected <= set(offered), f"xyz plot type dropdowns missing: {expected - set(offered)}"
    for elem_id in expected:
        choices = offered[elem_id]
        assert "Checkpoint name" in choices, elem_id
        for label in AXES:
            assert choices.count(label) == 1, f"{elem_id} should offer {label!r} once: {choices}"


def test_the_merger_settings_are_in_the_webui_options(webui):
    options = webui.api("/sdapi/v1/options")
    assert options["astolfo_merge_memory_gb"] == pytest.approx(1.5)
    assert options["astolfo_merge_precision"] == "fp64"
    assert options["astolfo_merge_device"] == "cpu"


def xyz_axis_index(webui, label, tab="txt2img") -> int:
    """Index of an axis in the xyz script's type dropdown (the script's `run` receives this index)."""
    for component in get_json(webui.url + "/config")["components"]:
        props = component.get("props", {})
        if props.get("elem_id") == f"script_{tab}_xyz_plot_x_type":
            return [c[0] if isinstance(c, (list, tuple)) else c for c in props["choices"]].index(label)
    raise AssertionError(f"no xyz plot on {tab}")


def test_an_xyz_run_naming_an_unknown_merger_recipe_is_refused_before_any_merge(webui):
    # x/y/z plot's run(): x_type, x_values, x_values_dropdown, y…, z…, draw_legend, include_lone_images,
    # include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode (xyz_grid.py v1.10.1).
    x_type = xyz_axis_index(webui, "[Merger] recipe")
    script_args = [x_type, "", ["no-such-recipe"], 0, "", [], 0, "", [], True, False, False, False,
                   False, False, False, 0, False]
    before = sorted(p.name for p in webui.models.iterdir())
    body = json.dumps({"prompt": "x", "steps": 1, "width": 64, "height": 64, "script_name": "x/y/z plot",
                       "script_args": script_args}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(webui.url + "/sdapi/v1/txt2img", data=body, timeout=120)
    answer = refused.value.read().decode(errors="replace")
    refusal = json.loads(answer)
    assert refusal["error"] == "RecipeError", answer          # raised by the axis' confirm, not by a merge
    assert "'no-such-recipe' not found" in refusal["errors"], answer
    assert sorted(p.name for p in webui.models.iterdir()) == before
