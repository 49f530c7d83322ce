"""The real viewer stack for the viewer tests, all on loopback and offline:

* :func:`start_orthanc_dicomweb`: Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``);
* :class:`OhifServer`: the prebuilt OHIF viewer (npm ``@ohif/app``, its ``dist/`` folder, pinned by
  ``tests/viewer/package-lock.json``) served as a single-page app (unknown paths fall back to
  ``index.html``) with a generated ``app-config.js`` whose only data source is Orthanc's DICOMweb,
  reached through ``/dicom-web`` on the same origin (a small reverse proxy: no CORS);
* :func:`launch_chromium`: the Debian ``chromium`` driven by Playwright (never a downloaded browser).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from app.node.net import free_tcp_port
from peers import HOST, PROJECT_ROOT, Orthanc, start_dicomweb_archive

#: screenshots, the report PDF and load times for the CI log (``build/viewer`` unless overridden)
ARTEFACTS = Path(os.environ.get("PARASPINAL_VIEWER_ARTEFACTS", PROJECT_ROOT / "build" / "viewer"))
OHIF_DIST = PROJECT_ROOT / "tests" / "viewer" / "node_modules" / "@ohif" / "app" / "dist"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def start_orthanc_dicomweb(workdir: Path, timeout_s: float = 60.0) -> Orthanc:
    """Orthanc on free loopback ports with the DICOMweb plugin at ``/dicom-web/`` as OHIF reads it
    (full metadata, WADO-URI); no DICOM peers (the tests upload over REST)."""
    return start_dicomweb_archive(workdir, timeout_s=timeout_s, viewer=True)


def app_config(dicomweb_root: str = "/dicom-web") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source (Orthanc), no study list detours, no
    start-up dialog, no service worker."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc on loopback", "name": "orthanc",
            "wadoUriRoot": dicomweb_root, "qidoRoot": dicomweb_root, "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True, "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True,
        "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": False,
        "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc", "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class OhifServer:
    """OHIF's ``dist/`` on ``http://127.0.0.1:<port>/`` with SPA fallback, the generated
    ``app-config.js`` and ``/dicom-web/...`` proxied to Orthanc (same origin)."""

    def __init__(self, orthanc_http_port: int, dist: Path = OHIF_DIST) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"OHIF dist not found at {dist}: run `npm ci --prefix tests/viewer`")
        self.dist = dist.resolve()
        self.port = free_tcp_port()
        self.upstream = f"http://{HOST}:{orthanc_http_port}"
        config = app_config().encode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # the test reads OHIF's state, not an access log
                pass

            def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("accept", "content-type", "range")}
                request = urllib.request.Request(server.upstream + self.path, data=body, method=self.command,
                                                 headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        payload, status, ctype = response.read(), response.status, response.headers.get(
                            "Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as error:
                    payload, status, ctype = error.read(), error.code, error.headers.get("Content-Type", "text/plain")
                if "json" in ctype:
                    # Orthanc writes absolute BulkDataURIs to itself: make them same-origin (relative).
                    payload = payload.replace(server.upstream.encode(), b"")
                self._send(status, payload, ctype)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/") or path.startswith("/wado"):
                    return self._proxy()
                if path == "/app-config.js":
                    return self._send(200, config, "application/javascript")
                if path in ("/sw.js", "/init-service-worker.js"):
                    return self._send(200, b"", "application/javascript")
                target = (server.dist / path.lstrip("/")).resolve()
                if server.dist not in target.parents or not target.is_file():
                    target = server.dist / "index.html"  # single-page app: the router reads the path
                ctype = {".js": "application/javascript", ".css": "text/css", ".html": "text/html",
                         ".wasm": "application/wasm", ".json": "application/json", ".svg": "image/svg+xml",
                         ".png": "image/png", ".woff2": "font/woff2"}.get(target.suffix, "application/octet-stream")
                self._send(200, target.read_bytes(), ctype)

            do_HEAD = do_GET

            def do_POST(self) -> None:  # noqa: N802
                self._proxy()

        self.httpd = http.server.ThreadingHTTPServer((HOST, self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def browser_unavailable_reason() -> str | None:
    """Why the real browser cannot start here (``None`` when it starts): the Debian chromium is
    missing or does not launch headless (e.g. a sandbox without the kernel features it needs).
    The viewer tests skip for this reason only; a missing OHIF, Orthanc or DICOMweb plugin fails."""
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (Debian package chromium; .ci/run installs it)"
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as playwright:
            launch_chromium(playwright).close()
    except Exception as exc:  # noqa: BLE001 (any launch failure is the reason to report)
        return f"{CHROMIUM} does not start headless: {str(exc).splitlines()[0][:300]}"
    return None


def launch_chromium(playwright):
    """The system chromium, headless, offline-friendly (Playwright must never download a browser)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
