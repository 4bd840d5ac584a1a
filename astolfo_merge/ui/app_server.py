"""The standalone app's web server: one origin, and only the app's own files.

gradio's `launch()` builds a FastAPI app that answers any web page (`Access-Control-Allow-Origin: *`)
and serves, under `/file=`, anything in the working directory. A page open in the same browser could
then drive the tab and read what it sends back. So the app does not call `launch()`: it mounts the
page with gradio's public `mount_gradio_app` and serves it through `RequestGuard`, a plain ASGI layer
in front of everything (HTTP and WebSocket alike) that

- answers only to the host names the app was bound for (a DNS-rebinding page uses its own name);
- refuses (403) requests whose `Origin` is not the app's own, and requests a browser marks as coming
  from another site (`Sec-Fetch-Site`), except opening the page itself;
- strips every `Access-Control-*` header from responses (gradio's permissive CORS included), and
  forbids framing the page on another site;
- serves `/file=` only from the app's own files folder (paths.app_files_dir): never models, recipes,
  the working directory or anything else; gradio's allowed / blocked paths say the same behind it.

Inside the WebUI the WebUI owns the server; there the tab's handlers still confine every path
(paths.py).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket

from ..errors import AstolfoError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
FILE_ROUTE = re.compile(r"^(?:/gradio_api)?/file(?:=|/)(.*)$", re.S)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def machine_names() -> set:
    names = {"localhost"}
    for get in (socket.gethostname, socket.getfqdn):
        try:
            name = get().lower()
        except OSError:
            continue
        names |= {name, f"{name}.local"}
    return names


def allowed_host_names(bind: str):
    """Host names requests may carry; None for a wildcard bind (then: IP literals and this machine's names)."""
    bind = bind.strip("[]").lower()
    if bind in WILDCARD_HOSTS:
        return None
    return LOOPBACK_NAMES | {bind}


def exposure_warning(bind: str, port: int, models_dir: str) -> str | None:
    """What binding beyond loopback exposes (None for a loopback bind)."""
    if is_loopback(bind):
        return None
    who = "every machine that can reach this one" if bind.strip("[]") in WILDCARD_HOSTS else f"anyone who can reach {bind}"
    return (f"warning: --host {bind} serves the Merger tab to {who} on port {port}, without a password: they can "
            f"merge and inspect every checkpoint in {models_dir}, write new files there and read its recipes. "
            f"Keep the default 127.0.0.1 unless you mean that (an SSH tunnel to 127.0.0.1 is safer).")


def _hostname(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: see the module doc. `files_dirs`: the only folders `/file=` may serve from."""

    def __init__(self, app, host_names, files_dirs):
        self.app = app
        self.host_names = None if host_names is None else frozenset(host_names)
        self.wildcard_names = machine_names() if host_names is None else frozenset()
        self.files_dirs = [os.path.realpath(d) for d in files_dirs]

    def host_allowed(self, name: str) -> bool:
        if self.host_names is not None:
            return name in self.host_names
        if name in self.wildcard_names:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def refusal(self, scope, headers: dict) -> str | None:
        """Why this request is refused, or None."""
        host = headers.get("host", "")
        if not self.host_allowed(_hostname(host)):
            return f"this app does not answer to the host name {host!r}"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
            return f"cross-origin request refused (Origin {origin!r})"
        site = headers.get("sec-fetch-site", "")
        if site in ("cross-site", "same-site"):
            opening_the_page = (scope["type"] == "http" and scope.get("method") in ("GET", "HEAD")
                                and headers.get("sec-fetch-mode") == "navigate"
                                and headers.get("sec-fetch-dest") == "document")
            if not opening_the_page:
                return f"request from another site refused (Sec-Fetch-Site {site})"
        match = FILE_ROUTE.match(scope.get("path", ""))
        if match and not self.own_file(match.group(1)):
            return "this app serves only the files it made (plots, downloads)"
        return None

    def own_file(self, target: str) -> bool:
        from ..io.paths import is_inside
        if not target or "://" in target:
            return False
        real = os.path.realpath(target)
        return any(is_inside(real, d) and real != d for d in self.files_dirs)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)   # lifespan: gradio's queue starts there
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self.refusal(scope, headers)
        if problem is not None:
            return await self.refuse(scope, receive, send, problem)

        async def send_guarded(message):
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if scope["type"] == "http":
                    kept.append((b"x-frame-options", b"SAMEORIGIN"))
                message = {**message, "headers": kept}
            await send(message)

        return await self.app(scope, receive, send_guarded)

    async def refuse(self, scope, receive, send, problem: str):
        if scope["type"] == "websocket":
            await receive()                                   # websocket.connect
            await send({"type": "websocket.close", "code": 1008})   # before accept: the server answers 403
            return
        body = f"Forbidden: {problem}\n".encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()),
                                (b"x-frame-options", b"SAMEORIGIN")]})
        await send({"type": "http.response.body", "body": body})


# -- serving -----------------------------------------------------------------------------------------

def _accepted(fn, **options) -> dict:
    from .compat import _accepted as accepted
    names, var_kw = accepted(fn)
    return options if var_kw else {k: v for k, v in options.items() if k in names}


def private_folders(folders, files_dir) -> list:
    """`folders` gradio must never serve, less any that hold the app's files folder (it would block those too)."""
    from ..io.paths import is_inside
    files = os.path.realpath(files_dir)
    out = []
    for folder in folders:
        if folder:
            real = os.path.realpath(folder)
            if not is_inside(files, real) and not is_inside(real, files):
                out.append(os.path.abspath(folder))
    return list(dict.fromkeys(out))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]") or "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        raise AstolfoError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (is another app using the port? "
                           f"pass --port)") from None
    sock.set_inheritable(True)
    return sock


def build_server_app(page, bind: str, port: int, files_dir: str, private_dirs):
    """The guarded ASGI app serving `page` (a gr.Blocks with its queue enabled)."""
    import gradio as gr
    from fastapi import FastAPI

    allowed, blocked = [files_dir], private_folders(private_dirs, files_dir)
    for name, value in (("allowed_paths", allowed), ("blocked_paths", blocked)):
        if hasattr(page, name):
            setattr(page, name, list(value))
    if hasattr(page, "show_api"):
        page.show_api = False
    api_host = "127.0.0.1" if bind in ("", "0.0.0.0") else "[::1]" if bind == "::" else \
        (f"[{bind.strip('[]')}]" if ":" in bind else bind)
    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    # gradio 3.x's queue calls its own /api/predict over HTTP (gradio_api_url); 4.x takes the paths here.
    extra = _accepted(gr.mount_gradio_app, gradio_api_url=f"http://{api_host}:{port}/",
                      allowed_paths=allowed, blocked_paths=blocked)
    app = gr.mount_gradio_app(outer, page, path="/", **extra)
    return RequestGuard(app, allowed_host_names(bind), [files_dir])


def serve(page, server_name: str, server_port: int, files_dir: str, private_dirs=()) -> None:
    """Serve `page` on server_name:server_port until Ctrl+C / SIGTERM (blocks)."""
    import uvicorn

    sock = bind_socket(server_name, server_port)
    app = build_server_app(page, server_name, server_port, files_dir, private_dirs)
    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            **_accepted(uvicorn.Config, ws_max_size=64 * 1024 * 1024, timeout_graceful_shutdown=5))
    uvicorn.Server(config).run(sockets=[sock])
