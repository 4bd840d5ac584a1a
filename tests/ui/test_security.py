"""Issue 15, security: the standalone app over real HTTP, as a hostile page and a hostile form would use it.

One `python -m astolfo_merge app` for the module, in a working directory that also holds files that
are none of the app's business (a "private" folder beside the models folder, a file under the cwd).
The page is driven the way its own script does it: /config, then /run/predict by the button's
elem_id with the form's values. Also: the recipe-file bounds in the CLI and the tab, the bind warning.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from astolfo_merge.io.paths import RECIPE_MAX_BYTES, Folders, PathRefused, within
from astolfo_merge.ui.state import MODES

from browser_helpers import free_port, stop, wait_http
from conftest import ROOT, cli
from test_tab import run_app_command

EVIL = "http://evil.example"
PRIVATE = "TOP-SECRET-MARKER"
FIFO_SECONDS = 20   # a FIFO that blocked the server thread would run into this


@pytest.fixture(scope="module")
def site(demo_dir, tmp_path_factory):
    """Folders of one user: models (linked in, as users do), recipes, a LoRA folder, and private things beside them."""
    home = tmp_path_factory.mktemp("site")
    models, private = home / "models", home / "private"
    (models / "recipes").mkdir(parents=True)
    (models / "Lora").mkdir()
    private.mkdir()
    for f in demo_dir.iterdir():
        os.symlink(f, models / f.name)
    shutil.copy(demo_dir / "sd1-c.safetensors", private / "real.safetensors")   # a checkpoint outside the folder
    (private / "private.json").write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"],
                                                      "method": "weighted_sum", "note": PRIVATE}))
    (home / "secret.txt").write_text(PRIVATE)                                      # under the app's cwd
    recipes = models / "recipes"
    (recipes / "good.json").write_text(json.dumps({"pool": ["sd1-a.safetensors", "sd1-b.safetensors"],
                                                   "method": "weighted_sum"}))
    os.mkfifo(recipes / "fifo.json")
    os.symlink("/dev/zero", recipes / "zero.json")            # a link the owner made: followed, then refused as a device
    (recipes / "big.json").write_bytes(b" " * (RECIPE_MAX_BYTES + 1))
    return {"home": home, "models": models, "private": private, "recipes": recipes}


@pytest.fixture(scope="module")
def app(site):
    port = free_port()
    env = {**os.environ, "HOME": str(site["home"]), "ASTOLFO_MERGE_CACHE_DIR": str(site["home"] / "cache"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "astolfo_merge", "app", "--models-dir", str(site["models"]),
                             "--port", str(port)], cwd=site["home"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc)
        yield Page(url, port)
    finally:
        stop(proc)


class Page:
    """The tab as its page script talks to it: component ids from /config, events by their button's elem_id."""

    def __init__(self, url, port):
        self.url, self.port = url, port
        self.own = {"Origin": url}                       # what the browser sends from the app's own page
        self.http = httpx.Client(base_url=url, timeout=FIFO_SECONDS)
        config = self.http.get("/config").json()
        self.props = {c["id"]: c.get("props", {}) for c in config["components"]}
        self.ids = {p["elem_id"]: i for i, p in self.props.items() if p.get("elem_id")}
        self.elem_of = {i: e for e, i in self.ids.items()}
        self.deps = config["dependencies"]

    def event(self, elem_id, trigger="click") -> int:
        target = self.ids[elem_id]
        for n, dep in enumerate(self.deps):
            for t in dep["targets"]:
                if t == target and dep.get("trigger") == trigger or t == [target, trigger]:   # gradio 3.x / 4.x
                    return n
        raise KeyError(f"no {trigger} event on #{elem_id}")

    def predict(self, elem_id, values=None, headers=None, trigger="click"):
        """POST /run/predict for the event of `elem_id`; inputs from the widgets' defaults, `values` by elem_id."""
        n = self.event(elem_id, trigger)
        values = values or {}
        data = [values.get(self.elem_of.get(i), self.props[i].get("value")) for i in self.deps[n]["inputs"]]
        return self.http.post("/run/predict", json={"fn_index": n, "data": data, "session_hash": uuid.uuid4().hex},
                              headers=self.own if headers is None else headers)

    def outputs(self, elem_id, values=None, trigger="click") -> dict:
        r = self.predict(elem_id, values, trigger=trigger)
        assert r.status_code == 200, r.text
        return dict(zip((self.elem_of.get(i) for i in self.deps[self.event(elem_id, trigger)]["outputs"]), r.json()["data"]))

    def message(self, elem_id, values) -> str:
        return self.outputs(elem_id, values)["astolfo_merge_message"]


def no_cors(response):
    return not any(k.lower().startswith("access-control-") for k in response.headers)


def ws_handshake(port, origin=None, host=None) -> str:
    """Status line of a WebSocket handshake on gradio's queue (3.x /queue/join)."""
    lines = ["GET /queue/join HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if origin:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return s.recv(4096).decode("latin-1").split("\r\n", 1)[0]


# -- no cross-origin access ------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [("POST", "/run/predict"), ("POST", "/api/predict"), ("GET", "/config"),
                                         ("POST", "/upload"), ("POST", "/reset"), ("GET", "/file=x")])
def test_a_foreign_origin_is_refused_with_no_cors_header(app, method, path):
    body = {"fn_index": app.event("astolfo_merge_check"), "data": [], "session_hash": "x"}
    r = app.http.request(method, path, json=body, headers={"Origin": EVIL})
    assert r.status_code == 403 and no_cors(r), (r.status_code, r.headers)
    assert "cross-origin" in r.text
    preflight = app.http.options(path, headers={"Origin": EVIL, "Access-Control-Request-Method": method,
                                                "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 403 and no_cors(preflight)


def test_the_queue_websocket_refuses_a_foreign_origin_and_a_foreign_host(app):
    assert " 403 " in ws_handshake(app.port, origin=EVIL)
    assert " 403 " in ws_handshake(app.port, origin="null")
    assert " 403 " in ws_handshake(app.port, origin=f"http://rebound.example:{app.port}", host=f"rebound.example:{app.port}")
    assert " 101 " in ws_handshake(app.port, origin=app.url)


def test_the_apps_own_page_keeps_working_without_any_cors_header(app):
    got = app.outputs("astolfo_merge_check", {"astolfo_merge_pool": ["sd1-a.safetensors", "sd1-b.safetensors"]})
    assert got["astolfo_merge_message"].startswith("**Plan:**")
    r = app.predict("astolfo_merge_check", {"astolfo_merge_pool": ["sd1-a.safetensors", "sd1-b.safetensors"]})
    assert no_cors(r) and r.headers["x-frame-options"] == "SAMEORIGIN"
    local = app.http.get("/config", headers={"Host": f"localhost:{app.port}", "Origin": f"http://localhost:{app.port}"})
    assert local.status_code == 200 and no_cors(local)


def test_a_dns_rebinding_host_and_requests_marked_cross_site_are_refused(app):
    rebound = f"rebound.example:{app.port}"
    r = app.http.post("/run/predict", json={}, headers={"Host": rebound, "Origin": f"http://{rebound}"})
    assert r.status_code == 403 and "host name" in r.text
    for site in ("cross-site", "same-site"):   # e.g. an <img> or <script> tag of another page, or the WebUI's port
        r = app.http.get("/config", headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "script"})
        assert r.status_code == 403 and no_cors(r)
    opened = app.http.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                                        "Sec-Fetch-Dest": "document"})
    assert opened.status_code == 200, "a link to the app from another site still opens it"


# -- /file= serves only what the app made ----------------------------------------------------------

def test_file_serves_what_the_app_made_and_nothing_else(app, site):
    got = app.outputs("astolfo_merge_save_recipe", {"astolfo_merge_recipe_name": "served",
                                                    "astolfo_merge_pool": ["sd1-a.safetensors", "sd1-b.safetensors"]})
    download = got["astolfo_merge_recipe_file"]["name"]
    assert not download.startswith(str(site["models"])), "the page gets a copy in the app's own folder"
    r = app.http.get(f"/file={download}", headers=app.own)
    assert r.status_code == 200 and r.json()["pool"] == ["sd1-a.safetensors", "sd1-b.safetensors"] and no_cors(r)
    assert app.http.get(f"/file={download}", headers={"Origin": EVIL}).status_code == 403

    models = site["models"]
    refused = [models / "sd1-a.safetensors", "models/sd1-a.safetensors", models / "recipes" / "served.json",
               models / "recipes", site["private"] / "private.json", "/etc/passwd", site["home"] / "secret.txt",
               "secret.txt", "%2e%2e%2f" * 12 + "etc/passwd", f"{os.path.dirname(download)}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
               "https://example.com/x"]
    for target in refused:
        for route in ("/file=", "/file/"):
            r = app.http.get(f"{route}{target}", headers=app.own, follow_redirects=False)
            assert r.status_code == 403 and PRIVATE not in r.text and "root:" not in r.text, (route, target, r.status_code)


# -- every path a handler takes is confined --------------------------------------------------------

def pool_values(*names):
    return {"astolfo_merge_pool": list(names)}


def same_but_names(a: str, name_a: str, b: str, name_b: str) -> bool:
    return a.replace(repr(name_a), "NAME") == b.replace(repr(name_b), "NAME")


def outside_names(site, leaf):
    """The same outside file named three ways: absolute, `../` from the models folder, and through `recipes/..`."""
    return [str(site["private"] / leaf), f"../private/{leaf}", f"recipes/../../private/{leaf}"]


@pytest.mark.parametrize("field", ["pool", "base", "take", "lora"])
def test_a_file_outside_the_folders_is_refused_with_one_message_whether_or_not_it_exists(app, site, field):
    def form(name):
        values = pool_values("sd1-a.safetensors", "sd1-b.safetensors")
        if field == "pool":
            values["astolfo_merge_pool"].append(name)
            values["astolfo_merge_method"] = "n_average"
        elif field == "base":
            values["astolfo_merge_base"] = name
        elif field == "take":
            values.update({"astolfo_merge_comp_vae_mode": MODES["take"], "astolfo_merge_comp_vae_take": name})
        else:
            values["astolfo_merge_lora_0_file"] = name
        return values

    for real, missing in zip(outside_names(site, "real.safetensors"), outside_names(site, "missing.safetensors")):
        for button in ("astolfo_merge_check", "astolfo_merge_merge"):
            said_real, said_missing = app.message(button, form(real)), app.message(button, form(missing))
            assert "not a file in" in said_real and "Plan" not in said_real, said_real
            assert same_but_names(said_real, real, said_missing, missing), (said_real, said_missing)
    assert sorted(os.listdir(site["private"])) == ["private.json", "real.safetensors"]


def test_paths_that_resolve_inside_the_models_folder_are_fine(app, site):
    inside = [str(site["models"] / "sd1-b.safetensors"), "../models/sd1-b.safetensors", "recipes/../sd1-b.safetensors"]
    for name in inside:
        said = app.message("astolfo_merge_check", pool_values("sd1-a.safetensors", name))
        assert said.startswith("**Plan:**"), (name, said)


def test_a_page_cannot_load_a_recipe_from_outside_the_recipes_folder(app, site):
    """The second half of the chained attack: Load saved recipe sent a private file's contents back."""
    real, missing = str(site["private"] / "private.json"), str(site["private"] / "missing.json")
    for a, b in ((real, missing), ("../../private/private.json", "../../private/missing.json")):
        got_a = app.outputs("astolfo_merge_load_saved", {"astolfo_merge_saved_recipes": a})
        got_b = app.outputs("astolfo_merge_load_saved", {"astolfo_merge_saved_recipes": b})
        assert "not a file in the recipes folder" in got_a["astolfo_merge_message"]
        assert same_but_names(got_a["astolfo_merge_message"], a, got_b["astolfo_merge_message"], b)
        assert PRIVATE not in json.dumps(got_a)
    got = app.outputs("astolfo_merge_load_saved", {"astolfo_merge_saved_recipes": "good.json"})
    assert got["astolfo_merge_message"] == "Loaded recipe `good.json`."


def test_output_names_stay_in_the_output_folder(app, site):
    for name in ("../private/escaped", str(site["private"] / "escaped")):
        said = app.message("astolfo_merge_merge", {**pool_values("sd1-a.safetensors", "sd1-b.safetensors"),
                                                   "astolfo_merge_output_name": name})
        assert "Error" in said and "Started" not in said, said
    assert not [p for p in os.listdir(site["private"]) if "escaped" in p]
    assert not [p for p in os.listdir(site["home"]) if "escaped" in p]


def test_confinement_follows_the_owners_links_but_not_dotdot_through_them(tmp_path, demo_dir):
    """Unit level: a linked-in file is inside; `linked_folder/../x` is where the kernel goes, outside."""
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    models.mkdir()
    os.symlink(demo_dir / "sd1-a.safetensors", models / "linked.safetensors")
    os.symlink(elsewhere, models / "linked_folder")
    shutil.copy(demo_dir / "sd1-b.safetensors", tmp_path / "elsewhere" / "x.safetensors")
    assert within(str(models / "linked.safetensors"), [str(models)])
    assert within(str(models / "linked_folder" / "x.safetensors"), [str(models)])
    assert not within(str(models / "linked_folder" / ".." / "x.safetensors"), [str(models)])

    from astolfo_merge.ui.host import StandaloneHost
    folders = Folders(StandaloneHost(str(models)))
    assert folders.model("linked.safetensors", "pool[0]").endswith("linked.safetensors")
    with pytest.raises(PathRefused):
        folders.model("linked_folder/../x.safetensors", "pool[0]")


# -- recipe files are read with bounds ---------------------------------------------------------------

BOUNDS = [("fifo.json", "not a regular file (a FIFO)"), ("zero.json", "not a regular file (a character device)"),
          ("big.json", "a recipe may be at most 4 MiB")]


@pytest.mark.parametrize("name,needle", BOUNDS)
def test_the_tab_refuses_a_fifo_a_device_and_an_oversized_recipe_at_once(app, name, needle):
    started = time.monotonic()
    said = app.outputs("astolfo_merge_load_saved", {"astolfo_merge_saved_recipes": name})["astolfo_merge_message"]
    assert needle in said and "Recipe file" in said, said   # the tab names the field it came from
    assert time.monotonic() - started < FIFO_SECONDS / 2


@pytest.mark.parametrize("name,needle", BOUNDS[::2] + [("/dev/zero", "not a regular file (a character device)")])
def test_the_cli_refuses_a_fifo_a_device_and_an_oversized_recipe_with_exit_2(site, tmp_path, name, needle):
    rc, _out, err = cli("merge", site["recipes"] / name, "--models-dir", site["models"], cwd=tmp_path)
    assert rc == 2 and needle in err and "Traceback" not in err, err


# -- binding ----------------------------------------------------------------------------------------

def test_binding_beyond_loopback_says_what_it_exposes(models, monkeypatch, capsys):
    served, _ = run_app_command(monkeypatch, ["app", "--models-dir", str(models), "--host", "0.0.0.0"])
    assert served[0][1]["server_name"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and "without a password" in err and str(models) in err
    served, _ = run_app_command(monkeypatch, ["app", "--models-dir", str(models)])
    assert served[0][1]["server_name"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
