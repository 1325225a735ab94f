"""A Hugging Face Hub on loopback: the few endpoints ``datasets`` uses to fetch a dataset repo.

Serves one dataset repository at several commits, with branches and tags naming commits
(``revision`` API, ``resolve`` downloads, ``tree`` listings, ``paths-info``), so a test can
fetch a split online into a fresh Hugging Face cache, then read it offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from tests.support.fixtures import DATASET_SCHEMA


@dataclass
class HubRepo:
    """One dataset repository: commit -> {path: bytes}, and refs (branches, tags) -> commit."""

    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def add_commit(self, sha: str, splits: Mapping[str, Sequence[dict[str, Any]]]) -> None:
        """A commit holding ``data/{split}-00000-of-00001.parquet`` for each split."""
        files: dict[str, bytes] = {}
        for split, rows in splits.items():
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(list(rows), schema=DATASET_SCHEMA), buffer)
            files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
        self.commits[sha] = files

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names (a commit, branch or tag), or None."""
        revision = unquote(revision)
        return revision if revision in self.commits else self.refs.get(revision)


def _etag(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    repo: HubRepo

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the repo keeps the request log."""

    def _send(
        self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _not_found(self, code: str, sha: str | None = None) -> None:
        headers = {"X-Error-Code": code, "Content-Type": "application/json"}
        if sha is not None:
            headers["X-Repo-Commit"] = sha
        self._send(404, b'{"error": "not found"}', headers)

    def do_HEAD(self) -> None:
        """Metadata of a download."""
        self._get()

    def do_GET(self) -> None:
        """Downloads and API reads."""
        self._get()

    def _get(self) -> None:
        url = urlparse(self.path)
        self.repo.requests.append(f"{self.command} {url.path}")
        resolve = f"/datasets/{self.repo.repo_id}/resolve/"
        api = f"/api/datasets/{self.repo.repo_id}"
        if url.path.startswith(resolve):
            revision, _, path = url.path[len(resolve) :].partition("/")
            self._download(revision, unquote(path))
        elif url.path == api:
            self._info("main")
        elif url.path.startswith(api + "/revision/"):
            self._info(url.path[len(api + "/revision/") :])
        elif url.path.startswith(api + "/tree/"):
            revision, _, path = url.path[len(api + "/tree/") :].partition("/")
            recursive = parse_qs(url.query).get("recursive", ["false"])[0] == "true"
            self._tree(revision, unquote(path).strip("/"), recursive)
        else:
            self._not_found("RepoNotFound")

    def do_POST(self) -> None:
        """``paths-info``: which of some paths exist at a revision."""
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        url = urlparse(self.path)
        self.repo.requests.append(f"POST {url.path}")
        prefix = f"/api/datasets/{self.repo.repo_id}/paths-info/"
        sha = self.repo.resolve(url.path[len(prefix) :]) if url.path.startswith(prefix) else None
        if sha is None:
            self._not_found("RevisionNotFound")
            return
        try:
            paths = json.loads(body).get("paths", [])
        except ValueError:
            paths = parse_qs(body.decode()).get("paths", [])
        files = self.repo.commits[sha]
        found: list[dict[str, Any]] = []
        for path in paths:
            if path in files:
                found.append(_file_entry(path, files[path]))
            elif any(name.startswith(path.rstrip("/") + "/") for name in files):
                found.append(_dir_entry(path))
        self._json(found)

    def _download(self, revision: str, path: str) -> None:
        sha = self.repo.resolve(revision)
        if sha is None:
            self._not_found("RevisionNotFound")
            return
        data = self.repo.commits[sha].get(path)
        if data is None:
            self._not_found("EntryNotFound", sha)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_etag(data)}"'}
        self._send(200, data, headers | {"Content-Type": "application/octet-stream"})

    def _info(self, revision: str) -> None:
        sha = self.repo.resolve(revision)
        if sha is None:
            self._not_found("RevisionNotFound")
            return
        siblings = [{"rfilename": name} for name in self.repo.commits[sha]]
        self._json({"id": self.repo.repo_id, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, revision: str, folder: str, recursive: bool) -> None:
        sha = self.repo.resolve(revision)
        if sha is None:
            self._not_found("RevisionNotFound")
            return
        entries: dict[str, dict[str, Any]] = {}
        for name, data in self.repo.commits[sha].items():
            if folder and not name.startswith(folder + "/"):
                continue
            parts = name[len(folder) + 1 :].split("/") if folder else name.split("/")
            base = f"{folder}/" if folder else ""
            for depth in range(1, len(parts)):
                directory = base + "/".join(parts[:depth])
                entries.setdefault(directory, _dir_entry(directory))
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[name] = _file_entry(name, data)
        self._json(list(entries.values()))


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": _etag(data), "size": len(data), "path": path}


def _dir_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": "0" * 40, "size": 0, "path": path}


@contextmanager
def fake_hub(repo: HubRepo) -> Iterator[str]:
    """Serve ``repo`` on a loopback port; yield the endpoint for ``HF_ENDPOINT``."""
    handler = type("Handler", (_Handler,), {"repo": repo})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
