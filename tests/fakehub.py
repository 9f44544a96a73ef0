"""A stand-in for the Hugging Face Hub: the few endpoints ``huggingface_hub``'s
``snapshot_download`` calls, serving model folders from disk, on a loopback port.

Point ``HF_ENDPOINT`` at ``FakeHub.url``. Served: the revision info
(``/api/models/REPO/revision/REV``: ``id``, ``sha``, ``siblings``), the file tree
(``/api/models/REPO/tree/REV``), and each file (``HEAD``/``GET /REPO/resolve/REV/FILE``,
with the headers the client reads: ``X-Repo-Commit``, ``ETag``, ``Content-Length``). An
unknown repo is a 404 with ``X-Error-Code: RepoNotFound``, as the Hub answers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        """Repo id -> the folder whose files it serves."""
        self.requests: list[str] = []
        """``METHOD PATH`` of each request, in order."""
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def commit(self, repo: str) -> str:
        """The repo's one revision: a hash of its files, 40 hex digits as a git commit."""
        digest = hashlib.sha1(repo.encode())
        for f in self._files(repo):
            digest.update(f.name.encode() + f.read_bytes())
        return digest.hexdigest()

    def _files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].iterdir() if p.is_file())

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(f"{h.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if repo not in self.repos:
                return self._not_found(h)
            files = self._files(repo)
            if kind == "revision":
                info = {
                    "id": repo,
                    "sha": self.commit(repo),
                    "siblings": [{"rfilename": f.name} for f in files],
                }
                return self._json(h, info, body)
            if kind == "tree":
                tree = [
                    {
                        "type": "file",
                        "path": f.name,
                        "size": f.stat().st_size,
                        "oid": hashlib.sha1(f.read_bytes()).hexdigest(),
                    }
                    for f in files
                ]
                return self._json(h, tree, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._not_found(h)
            f = self.repos[repo] / name
            if not f.is_file():
                h.send_response(404)
                h.send_header("X-Error-Code", "EntryNotFound")
                h.send_header("X-Repo-Commit", self.commit(repo))
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            data = f.read_bytes()
            h.send_response(200)
            h.send_header("X-Repo-Commit", self.commit(repo))
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if body:
                h.wfile.write(data)
            return None
        return self._not_found(h)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        data = json.dumps(value).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def _not_found(h: BaseHTTPRequestHandler) -> None:
        h.send_response(404)
        h.send_header("X-Error-Code", "RepoNotFound")
        h.send_header("Content-Length", "0")
        h.end_headers()
