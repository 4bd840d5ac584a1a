"""AstolfoMerge inside a real WebUI — AUTOMATIC1111 v1.10.1 or Forge Classic: the AstolfoMerge tab
merges in Chromium, the WebUI's own API lists the new checkpoint with its hash, and the "[Merger] …"
XYZ axes are offered and run.

Optional: runs only when these environment variables point at a prepared WebUI (CI skips it):

- ``A1111_DIR`` (or ``WEBUI_DIR``): a WebUI checkout whose ``repositories/`` already hold
  stable-diffusion-stability-ai, generative-models, k-diffusion (A1111) and an (empty is fine)
  stable-diffusion-webui-assets folder, because the WebUI is started with
  ``--skip-prepare-environment`` (nothing is cloned or installed);
- ``A1111_PYTHON`` (or ``WEBUI_PYTHON``): the interpreter of the WebUI's own environment (torch,
  gradio 3.41.2 and the rest of its requirements, plus scipy and matplotlib for our install.py);
  default ``venv/bin/python`` in the checkout, else in its parent folder (where the A1111 setup
  and ../shared/hosts/setup-forge-classic.sh put it), else this interpreter.

Which WebUI it is comes from its files (``webui_kind``; ``WEBUI_KIND`` = a1111 | forge-classic |
forge-neo overrides): Forge has ``modules_forge/``, Classic keeps its X/Y/Z plot in
``extensions-builtin/xyz/lib_xyz``. The launch flags follow ../shared/design/HOSTS.md. Forge keeps
the weights in its model patcher, so there the glue refuses a live merge ("not supported on this
host"): the tests that need one assert that refusal, and that the `[Merger]` XYZ cells fall back to
files, instead.

Examples: ``A1111_DIR=/work/webui/a1111 .venv/bin/python -m pytest tests/ui/test_webui_e2e.py``;
``A1111_DIR=/work/webui/forge-classic/forge A1111_SD1_MODELS=/work/webui/models .venv/bin/python -m
pytest tests/ui/test_webui_e2e.py`` (Forge Classic, its venv found at ../venv).

The live-merge tests (`[Merger]` XYZ cells merged into the loaded model, LoRA after a live merge)
also need real-size models the WebUI can load and generate with:

- ``A1111_SD1_MODELS``: a folder with two full-size SD1 checkpoints ``rand_A.safetensors`` and
  ``rand_B.safetensors`` (../shared/hosts/make-sd1-random.py writes them), linked into the models folder;
- ``HF_HOME``: a Hugging Face cache holding ``openai/clip-vit-large-patch14``'s tokenizer and config
  (passed through to the WebUI, which builds its SD1 text encoder from them; weights come from the file).

The WebUI runs CPU-only and offline on a fresh ``--data-dir`` (config, caches, the extension) and
``--ckpt-dir`` (the session's tiny demo checkpoints), on a free 127.0.0.1 port, with
``--skip-load-model-at-start`` (A1111; Forge Classic has no such flag and tries to load one at
start, which fails harmlessly on a tiny file): our 1/64-scale checkpoints can be listed, hashed and
merged but not loaded into the WebUI's model (A1111.md §10.3). The extension
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
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
from browser_helpers import CHROMIUM, free_port, launch, pick as _pick, progress as merge_status, sha256

SCREENSHOT = ROOT / "test-artifacts" / "webui_merger_tab.png"
A1111_DIR = os.environ.get("WEBUI_DIR") or os.environ.get("A1111_DIR", "")
SD1_MODELS = os.environ.get("WEBUI_SD1_MODELS") or os.environ.get("A1111_SD1_MODELS", "")
LIVE_ARTIFACT = ROOT / "test-artifacts" / "webui_live_merge.json"
START_TIMEOUT_S = 300          # the WebUI imports torch, gradio, ldm and sgm: ~20 s idle, minutes when busy
AXES = ("[Merger] alpha", "[Merger] recipe")
EXTENSION_SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                        "test-artifacts", "tests", "bench", "tools", "*.safetensors")

pytestmark = [
    pytest.mark.webui, pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(not A1111_DIR, reason="set A1111_DIR to a prepared AUTOMATIC1111 / Forge WebUI checkout"),
]


def webui_kind(folder) -> str:
    """"a1111", "forge-classic" or "forge-neo", by the checkout's files ($WEBUI_KIND overrides)."""
    if os.environ.get("WEBUI_KIND"):
        return os.environ["WEBUI_KIND"]
    folder = pathlib.Path(folder)
    if not (folder / "modules_forge").is_dir():
        return "a1111"
    return "forge-classic" if (folder / "extensions-builtin" / "xyz" / "lib_xyz").is_dir() else "forge-neo"


KIND = webui_kind(A1111_DIR) if A1111_DIR else "a1111"
FORGE = KIND.startswith("forge")
# HOSTS.md "Running each host here": the CPU flag and the checks each launcher has.
COMMON_FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--api"]
HOST_FLAGS = {      # Neo refuses flags it does not know (no --no-download-sd-model, --disable-nan-check, --ckpt-dir)
    "a1111": ["--use-cpu", "all", "--no-half", "--skip-load-model-at-start", "--do-not-download-clip",
              "--no-download-sd-model", "--disable-nan-check"],
    "forge-classic": ["--skip-python-version-check", "--always-cpu", "--no-half",   # --use-cpu is parsed, unused
                      "--no-download-sd-model", "--disable-nan-check"],
    "forge-neo": ["--skip-python-version-check", "--cpu", "--disable-gpu-warning"],
}
NOT_SUPPORTED = "not supported on this host"
FORGE_NO_LIVE = ("Forge keeps the weights in its model patcher: merging into the loaded model is "
                 f"{NOT_SUPPORTED} (live_webui.FORGE_REASON); the test_on_forge_* tests check that instead")


def webui_python() -> str:
    for var in ("WEBUI_PYTHON", "A1111_PYTHON"):
        if os.environ.get(var):
            return os.environ[var]
    # beside the checkout: /work/webui/{a1111,venv} (the A1111 setup), setup-forge-classic.sh: DEST/{forge,venv}
    for venv in (pathlib.Path(A1111_DIR, "venv"), pathlib.Path(A1111_DIR).parent / "venv"):
        if (venv / "bin" / "python").exists():
            return str(venv / "bin" / "python")
    return sys.executable


def get_json(url, data=None, timeout=10):
    if isinstance(data, dict):
        data = json.dumps(data).encode()
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

    def our_errors(self, since: int = 0) -> list:
        """Tracebacks and "*** …" reports in the WebUI's log (from offset `since`) that involve
        AstolfoMerge. Others are expected: each page load makes the WebUI try to load a model, which
        fails offline (no CLIP tokenizer) and would fail anyway on our 1/64-scale checkpoints."""
        blocks = re.split(r"\n(?=Traceback|\*\*\* )", self.log_since(since))
        return [block for block in blocks if block.startswith(("Traceback", "*** ")) and "astolfo" in block.lower()]

    def log_since(self, offset: int) -> str:
        return self.log.read_text(errors="replace")[offset:]

    def log_size(self) -> int:
        return len(self.log.read_text(errors="replace"))

    def sd_models(self) -> dict:
        """/sdapi/v1/sd-models as {file name: entry} (a title gains " [shorthash]" once the hash is known)."""
        return {os.path.basename(entry["filename"]): entry for entry in self.api("/sdapi/v1/sd-models")}


@pytest.fixture(scope="module")
def webui(demo_dir, tmp_path_factory):
    """The WebUI with our extension over a models folder holding the session's demo checkpoints."""
    webui_dir = pathlib.Path(A1111_DIR)
    if not (webui_dir / "launch.py").is_file() or not (webui_dir / "modules" / "sd_models.py").is_file():
        pytest.fail(f"A1111_DIR={A1111_DIR} is not a WebUI checkout (no launch.py / modules/)")
    if KIND not in HOST_FLAGS:
        pytest.fail(f"WEBUI_KIND={KIND!r}: expected one of {sorted(HOST_FLAGS)}")
    base = tmp_path_factory.mktemp("webui")
    data, models, home = base / "data", base / "models", base / "home"
    if KIND == "forge-neo":      # no --ckpt-dir there (only extra --ckpt-dirs): its own models/Stable-diffusion
        models = data / "models" / "Stable-diffusion"
    for folder in (data / "extensions", models, home):
        folder.mkdir(parents=True)
    shutil.copytree(ROOT, data / "extensions" / "astolfo-merge", ignore=EXTENSION_SKIP)
    for f in demo_dir.iterdir():
        shutil.copy(f, models / f.name)
    if SD1_MODELS:      # full-size checkpoints for the live-merge tests: linked, never copied (2.1 GB each)
        for name in ("rand_A.safetensors", "rand_B.safetensors"):
            os.symlink(pathlib.Path(SD1_MODELS, name).resolve(), models / name)
        from astolfo_merge.features.lora_synth import write_synthetic_lora
        (data / "models" / "Lora").mkdir(parents=True)
        write_synthetic_lora(data / "models" / "Lora" / "merger_test.safetensors", "sd1", scale=1, rank=4, alpha=4.0,
                             seed=7, dtype=torch.float16)
    port = free_port()
    env = {**os.environ, "HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ASTOLFO_MERGE_CACHE_DIR": str(home / "cache")}
    for leaked in ("PYTHONPATH", "VIRTUAL_ENV", "COMMANDLINE_ARGS"):
        env.pop(leaked, None)
    log = base / "webui.log"
    args = [webui_python(), "launch.py", *COMMON_FLAGS, *HOST_FLAGS[KIND], "--data-dir", str(data), "--port", str(port)]
    if KIND == "forge-neo":
        # gradio 4 serves only allowed paths, and Neo allows just the data dir: with a --data-dir outside the
        # checkout its own script.js and style.css answer 403 and the page has no gradioApp()
        args += ["--gradio-allowed-path", str(webui_dir)]
    else:
        args += ["--ckpt-dir", str(models)]
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


def open_merger_tab(page):
    """Click our tab's button (role "button" under gradio 3.41, "tab" under 4.x: Forge Neo)."""
    page.locator("button").filter(has_text=re.compile(r"^\s*AstolfoMerge\s*$")).first.click()


def quicksettings_checkpoints(page) -> list:
    """The titles the WebUI's own "Stable Diffusion checkpoint" dropdown offers right now."""
    dropdown = page.locator("#setting_sd_model_checkpoint input").first
    dropdown.click()
    options = page.locator("#setting_sd_model_checkpoint ul.options li").all_inner_texts()
    dropdown.press("Escape")
    return [text.strip() for text in options]


def test_a_merge_in_the_merger_tab_is_listed_by_the_webui_with_its_hash(webui, page):
    page.goto(webui.url)
    open_merger_tab(page)      # beside the built-in "Checkpoint Merger"
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


def setting_values(webui) -> dict:
    """What the Settings page shows for each setting (its component `setting_<key>` in /config)."""
    shown = {}
    for component in get_json(webui.url + "/config")["components"]:
        elem_id = component.get("props", {}).get("elem_id") or ""
        if elem_id.startswith("setting_"):
            shown[elem_id[len("setting_"):]] = component["props"].get("value")
    return shown


def test_the_merger_settings_are_in_the_webui_options(webui):
    expected = {"astolfo_merge_memory_gb": 1.5, "astolfo_merge_precision": "fp64", "astolfo_merge_device": "cpu"}
    shown = setting_values(webui)
    assert {key: shown.get(key) for key in expected} == expected, "the Settings page should show our options"
    options = webui.api("/sdapi/v1/options")
    if FORGE:
        # Forge's built-in ControlNet imports modules.api.api while the built-in extensions load, which
        # fixes the API's options model (GET /sdapi/v1/options) before any extension in extensions/ adds an
        # option: that GET omits them all (ControlNet's own on_ui_settings options too); POST sets them.
        assert "control_net_models_path" in shown and "control_net_models_path" not in options
        webui.api("/sdapi/v1/options", data={"astolfo_merge_memory_gb": 1.5})
        return
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


def xyz_script_args(x_type, x_values, x_dropdown, include_lone_images=False) -> list:
    """The X/Y/Z plot's run() arguments for an X axis alone: x_type, x_values, x_values_dropdown, y…, z…,
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size,
    csv_mode (xyz_grid.py v1.10.1 and Classic's); Neo has row_count (0: automatic) before margin_size."""
    rows = [0] if KIND == "forge-neo" else []
    return [x_type, x_values, x_dropdown, 0, "", [], 0, "", [], True, include_lone_images, False, False,
            False, False, False, *rows, 0, False]


def test_an_xyz_run_naming_an_unknown_merger_recipe_is_refused_before_any_merge(webui):
    x_type = xyz_axis_index(webui, "[Merger] recipe")
    script_args = xyz_script_args(x_type, "", ["no-such-recipe"])
    before = sorted(p.name for p in webui.models.iterdir())
    body = json.dumps({"prompt": "x", "steps": 1, "width": 64, "height": 64, "script_name": "x/y/z plot",
                       "script_args": script_args}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(webui.url + "/sdapi/v1/txt2img", data=body, timeout=120)
    answer = refused.value.read().decode(errors="replace")
    refusal = json.loads(answer)
    assert refusal["error"] == "RecipeError", answer          # raised by the axis' confirm, not by a merge
    said = refusal.get("errors") or refusal.get("message", "")    # A1111 / Forge Classic: errors; Neo: message
    assert "'no-such-recipe' not found" in said, answer
    assert sorted(p.name for p in webui.models.iterdir()) == before



# -- live merge: [Merger] XYZ cells in the loaded model, LoRA after a live merge ----------------------

LIVE_OPTION, FILE_CHOICE = "astolfo_merge_xyz_target", "file (cached in _merger_trials)"
ALPHAS = (0.2, 0.5, 0.8)
GEN = {"prompt": "a cat", "negative_prompt": "", "steps": 3, "width": 256, "height": 256, "seed": 1234,
       "sampler_name": "Euler", "cfg_scale": 7, "send_images": True, "save_images": False}


@pytest.fixture(scope="module")
def sd1(webui):
    """The WebUI with rand_A loaded (full size, fp32 on CPU) and the XYZ template rand_A/rand_B weighted_sum."""
    if not SD1_MODELS:
        pytest.skip("set A1111_SD1_MODELS to a folder with full-size rand_A/rand_B (make-sd1-random.py) and HF_HOME")
    load_checkpoint(webui, "rand_A.safetensors")
    from astolfo_merge.core.recipe import parse_recipe
    recipes = webui.data / "astolfo_merge" / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    doc = {"pool": ["rand_A.safetensors", "rand_B.safetensors"], "method": "weighted_sum"}
    (recipes / "xyz-template.json").write_text(parse_recipe(doc).to_json())
    return webui


def load_checkpoint(webui, name):
    get_json(webui.url + "/sdapi/v1/options", data={"sd_model_checkpoint": name}, timeout=900)   # loads it
    info = webui.api("/astolfo-merge/v1/loaded-model")
    if FORGE:           # the route names no file there: the host's own setting says what it loaded
        assert not info["supported"] and NOT_SUPPORTED in info["reason"], info
        selected = webui.api("/sdapi/v1/options")["sd_model_checkpoint"]
        assert selected.startswith(name), f"{selected}\n{webui.log_tail()}"
        return
    assert info["supported"] and info["checkpoint"].endswith(name), f"{info}\n{webui.log_tail()}"


def loaded_digests(webui) -> dict:
    return get_json(webui.url + "/astolfo-merge/v1/loaded-model?digests=true", timeout=600)["digests"]


def file_digests(path) -> dict:
    """sha256 of each tensor of a checkpoint as the WebUI holds it with --no-half (fp32; integers int64)."""
    from safetensors import safe_open

    from astolfo_merge.features.live import tensor_digest
    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            out[key] = tensor_digest(f.get_tensor(key))
    return out


def warm_page_cache(*paths):
    """Read the inputs once, so both grids compare merge work, not which one read the disk first."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def folder_state(folder) -> dict:
    """Every file under `folder` (links not followed) with its size and mtime: what a merge would change."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def pixels(b64: str) -> bytes:
    import base64
    import io

    from PIL import Image
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def generate(webui, prompt="a cat", **extra) -> tuple:
    """(pixels of each image, infotexts) of one txt2img call."""
    answer = get_json(webui.url + "/sdapi/v1/txt2img", data={**GEN, "prompt": prompt, **extra}, timeout=1800)
    return [pixels(i) for i in answer["images"]], json.loads(answer["info"])["infotexts"]


def alpha_grid(webui) -> tuple:
    """An XYZ grid over `[Merger] alpha` = ALPHAS: (cell pixels, cell infotexts, wall seconds)."""
    x_type = xyz_axis_index(webui, "[Merger] alpha")
    script_args = xyz_script_args(x_type, ", ".join(map(str, ALPHAS)), [], include_lone_images=True)
    started = time.monotonic()
    images, infos = generate(webui, script_name="x/y/z plot", script_args=script_args)
    return images[-len(ALPHAS):], infos[-len(ALPHAS):], time.monotonic() - started


def file_target_grid(webui) -> tuple:
    """The alpha grid with the file target chosen (the loaded model again afterwards): (cell pixels,
    wall seconds, the WebUI's log of the grid)."""
    webui.api("/sdapi/v1/options", data={LIVE_OPTION: FILE_CHOICE})
    offset = webui.log_size()
    try:
        images, _infos, wall = alpha_grid(webui)
    finally:
        webui.api("/sdapi/v1/options", data={LIVE_OPTION: "loaded model"})
    return images, wall, webui.log_since(offset)


LIVE_CELL = re.compile(r"\[Merger\] cell merged into the loaded model in ([\d.]+) s \((\d+) keys merged")
FILE_CELL = re.compile(r"\[Merger\] cell merged (_merger_trials/)?\S+ in ([\d.]+) s")
LOADED = re.compile(r"(?:Weights|Model) loaded in ([\d.]+)s")


@pytest.mark.skipif(FORGE, reason=FORGE_NO_LIVE)
def test_an_xyz_grid_merges_into_the_loaded_model_without_files_and_restores_it(sd1):
    webui = sd1
    webui.api("/sdapi/v1/options", data={LIVE_OPTION: "loaded model"})
    warm_page_cache(webui.models / "rand_A.safetensors", webui.models / "rand_B.safetensors")
    before, offset = folder_state(webui.models), webui.log_size()
    live_images, live_infos, live_wall = alpha_grid(webui)
    log = webui.log_since(offset)
    assert folder_state(webui.models) == before, "a live grid must not write into the models folder"
    assert not (webui.models / "_merger_trials").exists()
    live_cells = [float(m.group(1)) for m in LIVE_CELL.finditer(log)]
    assert len(live_cells) == len(ALPHAS), log[-3000:]
    assert len(set(live_images)) == len(ALPHAS), "each alpha should give another image"
    marks = [re.search(r"Model: rand_A (\[Merger\] [0-9a-f]{10})", info) for info in live_infos]
    assert all(marks) and len({m.group(1) for m in marks}) == len(ALPHAS), live_infos
    # after the grid the loaded model is its checkpoint again, byte for byte (as loaded: fp32)
    assert webui.api("/astolfo-merge/v1/loaded-model")["label"] == ""
    assert loaded_digests(webui) == file_digests(pathlib.Path(SD1_MODELS, "rand_A.safetensors"))

    # the same grid with a file per cell: merge + write (+ hash) + the WebUI's load
    file_images, file_wall, log = file_target_grid(webui)
    merges = [float(m.group(2)) for m in FILE_CELL.finditer(log)]
    loads = [float(m.group(1)) for m in LOADED.finditer(log)][:len(ALPHAS)]
    assert len(merges) == len(loads) == len(ALPHAS), log[-3000:]
    file_cells = [m + lo for m, lo in zip(merges, loads)]
    trials = sorted((webui.models / "_merger_trials").glob("*.safetensors"))
    written = sum(p.stat().st_size for p in trials)
    numbers = {"live_cell_s": live_cells, "file_cell_merge_s": merges, "file_cell_load_s": loads,
               "file_cell_s": file_cells, "live_grid_wall_s": round(live_wall, 1), "file_grid_wall_s": round(file_wall, 1),
               "file_grid_bytes_written": written, "live_grid_bytes_written": 0}
    LIVE_ARTIFACT.parent.mkdir(exist_ok=True)
    LIVE_ARTIFACT.write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers))
    for path in trials:
        path.unlink()
    webui.api("/sdapi/v1/refresh-checkpoints", data=b"{}")
    assert file_images == live_images, "a live cell must hold exactly what loading its merged file gives"
    # each live cell's merge within a third of a file-based cell (merge + write + hash + load; their mean:
    # one file cell swings by a third with the machine's load)
    assert max(live_cells) <= sum(file_cells) / len(file_cells) / 3, numbers


@pytest.mark.skipif(FORGE, reason=FORGE_NO_LIVE)
def test_the_webui_lora_applies_once_on_top_of_a_live_merge(sd1, page):
    """networks.py backs up a layer's weights the first time a LoRA touches it; after a live merge that
    backup must neither bring the checkpoint back (undo) nor count the LoRA twice (double)."""
    webui = sd1
    load_checkpoint(webui, "rand_A.safetensors")
    lora = "a cat <lora:merger_test:1>"          # one step per image: the weights, not the sampler, are tested
    plain_lora, _ = generate(webui, lora, steps=1)                    # backup of rand_A's weights taken here
    generate(webui, steps=1)                                        # LoRA off: restored from the backup, kept
    merge_in_tab(webui, page, alpha=0.5)
    merged = loaded_digests(webui)
    assert webui.api("/astolfo-merge/v1/loaded-model")["label"].startswith("[Merger]")
    with_lora, infos = generate(webui, lora, steps=1)
    assert "merger_test" in infos[0] and "[Merger]" in infos[0], infos[0]
    assert with_lora != plain_lora, "the LoRA must apply on the merge, not on the backed-up checkpoint"
    lora_digests = loaded_digests(webui)
    assert lora_digests != merged
    generate(webui, steps=1)                                        # LoRA off again: the merge, not the file
    assert loaded_digests(webui) == merged
    # the reference: the same merge saved to a file, loaded by the WebUI, the same LoRA on top
    click_live(page, "Save loaded merge", "live-saved.safetensors")
    assert (webui.models / "live-saved.safetensors").is_file()
    click_live(page, "Restore")
    assert loaded_digests(webui) == file_digests(pathlib.Path(SD1_MODELS, "rand_A.safetensors"))
    load_checkpoint(webui, "live-saved.safetensors")
    reference, _ = generate(webui, lora, steps=1)
    assert reference == with_lora, "LoRA on the live merge must equal LoRA on the saved merge, loaded"
    load_checkpoint(webui, "rand_A.safetensors")
    (webui.models / "live-saved.safetensors").unlink()
    webui.api("/sdapi/v1/refresh-checkpoints", data=b"{}")


FALLBACK_NOTE = "[Merger] cells merge to files: merging into the loaded model is " + NOT_SUPPORTED
REUSED_CELL = re.compile(r"\[Merger\] cell reused (_merger_trials/)?\S+ in ([\d.]+) s")


@pytest.mark.skipif(not FORGE, reason="A1111 merges [Merger] cells into the loaded model (the live grid test)")
def test_on_forge_an_xyz_grid_with_the_default_target_merges_file_cells_and_says_why(sd1):
    """Forge: the default target "loaded model" cannot be had, so each cell is a file (said once in
    the console), the WebUI loads it per cell; the same grid again reuses the cached files, same pixels."""
    webui = sd1
    webui.api("/sdapi/v1/options", data={LIVE_OPTION: "loaded model"})       # the default, unchanged
    before, offset = folder_state(webui.models), webui.log_size()
    images, infos, wall = alpha_grid(webui)
    log = webui.log_since(offset)
    assert log.count(FALLBACK_NOTE) == 1, log[-3000:]
    assert not LIVE_CELL.search(log), log[-3000:]
    merges = [float(m.group(2)) for m in FILE_CELL.finditer(log)]
    loads = [float(m.group(1)) for m in LOADED.finditer(log)]
    trials = sorted((webui.models / "_merger_trials").glob("*.safetensors"))
    assert len(merges) == len(trials) == len(ALPHAS), log[-3000:]
    assert len(loads) >= len(ALPHAS), f"the WebUI should load each cell's file:\n{log[-3000:]}"
    added = set(folder_state(webui.models)) - set(before)
    assert added == {os.path.relpath(p, webui.models) for p in trials}, added
    assert len(set(images)) == len(ALPHAS), "each alpha should give another image"
    for info in infos:      # each cell's image names its merged file as the model
        assert any(f"Model: {p.stem}" in info for p in trials), info
    assert not webui.our_errors(offset), webui.our_errors(offset)

    # the same grid with the file target chosen: every cell reuses its file, the same pixels
    again, wall_again, log_again = file_target_grid(webui)
    reused = [float(m.group(2)) for m in REUSED_CELL.finditer(log_again)]
    assert len(reused) == len(ALPHAS) and not FILE_CELL.search(log_again), log_again[-3000:]
    assert FALLBACK_NOTE not in log_again
    written = sum(p.stat().st_size for p in trials)
    numbers = {"host": KIND, "file_cell_merge_s": merges, "file_cell_load_s": loads[:len(ALPHAS)],
               "file_cell_s": [m + lo for m, lo in zip(merges, loads)], "file_grid_wall_s": round(wall, 1),
               "reused_grid_wall_s": round(wall_again, 1), "reused_cell_s": reused,
               "file_grid_bytes_written": written}
    LIVE_ARTIFACT.parent.mkdir(exist_ok=True)
    LIVE_ARTIFACT.with_name(f"webui_file_cells_{KIND}.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers))
    for path in trials:
        path.unlink()
    webui.api("/sdapi/v1/refresh-checkpoints", data=b"{}")
    assert again == images, "a cached cell file must give the pixels its first merge gave"


@pytest.mark.skipif(not FORGE, reason="A1111 merges into the loaded model (the LoRA-after-live-merge test)")
def test_on_forge_the_tab_says_merging_into_the_loaded_model_is_not_supported_on_this_host(sd1, page):
    webui = sd1
    load_checkpoint(webui, "rand_A.safetensors")
    before, offset = folder_state(webui.models), webui.log_size()
    open_tab_with_weighted_sum(webui, page, alpha=0.5)
    last_job = merge_status(page)                       # the tab shows the last job (a file merge) or idle
    message = page.locator("#astolfo_merge_message").first
    page.locator("#astolfo_merge_target label", has_text="the loaded model").click()
    page.locator("#astolfo_merge_merge").click()
    wait_until(lambda: NOT_SUPPORTED in message.inner_text(), 120, f"Merge should answer {NOT_SUPPORTED!r}")
    text = message.inner_text()
    assert "Error" in text and "model patcher" in text, text
    assert merge_status(page) == last_job, "no merge job may start"
    for button in ("Save loaded merge", "Restore"):
        # another answer between two refusals (the same text twice would not show a change)
        click_live(page, "Empty the trials folder", expect=("The trials folder", "Deleted"))
        answer = click_live(page, button, "live-saved.safetensors" if button.startswith("Save") else None,
                            expect=("Error",))
        assert NOT_SUPPORTED in answer, answer
    assert folder_state(webui.models) == before, "a refused live merge must write nothing"
    info = webui.api("/astolfo-merge/v1/loaded-model")
    assert info == {"supported": False, "reason": info["reason"]} and "model patcher" in info["reason"], info
    assert not [e for e in page.errors if "astolfo" in e.lower()], page.errors
    assert not webui.our_errors(offset), webui.our_errors(offset)


def open_tab_with_weighted_sum(webui, page, alpha):
    """The tab with weighted_sum of rand_A and rand_B at `alpha` and no base, by clicks."""
    page.goto(webui.url)
    open_merger_tab(page)
    page.wait_for_selector("#astolfo_merge_pool label >> text=rand_B.safetensors")
    page.locator("#astolfo_merge_method input").first.click()
    page.locator("ul.options li", has_text="weighted_sum").first.click()
    _pick(page, "rand_A.safetensors", root="gradioApp()")
    _pick(page, "rand_B.safetensors", root="gradioApp()")
    page.locator("#astolfo_merge_base input").first.click()          # the preset base may be another file's
    page.locator("ul.options li", has_text="(none)").first.click()
    slider = page.locator("#astolfo_merge_param_slider0 input[type=number]")
    slider.fill(str(alpha))
    slider.press("Enter")


def merge_in_tab(webui, page, alpha):
    """weighted_sum of rand_A and rand_B at `alpha`, Merge into "the loaded model", by clicks."""
    open_tab_with_weighted_sum(webui, page, alpha)
    page.locator("#astolfo_merge_target label", has_text="the loaded model").click()
    # The tab shows the last job of this WebUI (e.g. an XYZ grid's file cell, done) until the new one
    # starts, and a live merge can be over between two polls: wait for a new summary.
    summary_box, message = page.locator("#astolfo_merge_summary").first, page.locator("#astolfo_merge_message").first
    before = summary_box.inner_text()
    page.locator("#astolfo_merge_merge").click()

    def new_job_finished():
        if message.inner_text().strip().startswith("Error"):
            raise AssertionError(f"Merge was refused: {message.inner_text()}")
        status = finished(merge_status(page))
        return status if status and summary_box.inner_text() != before else None
    final = wait_until(new_job_finished, 600, "the live merge should finish")
    summary = summary_box.inner_text()
    assert final["status"] == "done" and "into the loaded model" in summary, f"{final}\n{summary}\n{webui.log_tail()}"


def click_live(page, button, file_name=None, expect=("Saved", "Restored")):
    """A button of the "Loaded model and XYZ trials" box; waits for its message (which must start
    with one of `expect`)."""
    box = page.locator("#astolfo_merge_live_box")
    if not page.locator("#astolfo_merge_save_live").is_visible():
        box.locator("button, .label-wrap").first.click()
    if file_name:
        field = page.locator("#astolfo_merge_output_name textarea, #astolfo_merge_output_name input").first
        field.fill(file_name)
    message = page.locator("#astolfo_merge_message").first
    before = message.inner_text()
    page.locator({"Save loaded merge": "#astolfo_merge_save_live", "Restore": "#astolfo_merge_restore_live",
                  "Empty the trials folder": "#astolfo_merge_empty_trials"}[button]).click()
    # not gradio's "queue …" / "processing …"
    answers = ("Saved", "Restored", "Error", "The loaded model", "The trials folder", "Deleted")
    wait_until(lambda: message.inner_text() != before and message.inner_text().strip().startswith(answers), 600,
               f"{button} should answer")
    text = message.inner_text().strip()
    assert text.startswith(expect), text
    return text
