"""What both browser tests (standalone tab, real WebUI) do with the AstolfoMerge tab in Chromium."""
import hashlib
import pathlib
import socket
import subprocess
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def launch(playwright):
    """Debian's chromium (never a downloaded browser), with the flags this closed network needs."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def pick(page, name, root="document"):
    """Tick a model and wait for the tab to take it into the pool (at human speed).
    `root` is the JS expression of the page root (`gradioApp()` inside the WebUI)."""
    page.locator("#astolfo_merge_pool label", has_text=name).click()
    page.wait_for_function(f"{root}.querySelector('#astolfo_merge_pool_summary').innerText.includes('{name}')")


def progress(page) -> dict:
    """The job's state as the progress bar shows it: status, keys done, keys total."""
    el = page.locator("#astolfo_merge_progress .astolfo-progress")
    return {"status": el.get_attribute("data-status"), "done": int(el.get_attribute("data-done") or 0),
            "total": int(el.get_attribute("data-total") or 0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def wait_http(url, proc, timeout=60):
    """Wait until the app started as `proc` answers `url` with 200 (raises with its output if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def stop(proc, timeout=15):
    """End an app subprocess a test started: terminate, then kill if it does not go."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
