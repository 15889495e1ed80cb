"""A fake Hugging Face Hub on 127.0.0.1: the part of the HTTP protocol huggingface_hub's
``get_hf_file_metadata`` and a plain ranged ``GET`` use (huggingface_hub 0.36 to 2.x), for ``HF_ENDPOINT``.

``HEAD`` and ``GET /{repo}/resolve/{revision}/{path}`` answer with ``X-Repo-Commit``, ``ETag`` and
``X-Linked-Etag`` (the SHA-256, as the hub reports LFS files), ``X-Linked-Size`` and ``Content-Length``;
``GET`` honours ``Range: bytes=N-`` with a 206. Any other path is a plain web file (``/{key}``), as
the FaceNet release file is. A file is given as bytes or as a path (streamed from disk, for the
SD1.5-sized files of the integration suite). Every request is logged as (method, path, Range), and
the Authorization header of each path's last request is kept.
Faults, by path: ``cut[path] = N`` sends the first N bytes of the next GET and drops the connection;
``served[path] = bytes`` serves other bytes than the advertised size and SHA-256 describe;
``hold[path] = N`` sends the first N bytes of the next GET and then waits until ``release`` is set.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional, Union

Content = Union[bytes, Path]

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SDM_KEY, TDM_KEY, FASTCOMPOSER_KEY = "CodeGoat24/Face-diffuser/SDM/pytorch_model.bin", "CodeGoat24/Face-diffuser/TDM/pytorch_model.bin", "mit-han-lab/fastcomposer/pytorch_model.bin"
FACENET_KEY = "releases/v2.2.9/20180402-114759-vggface2.pt"  # a plain web file
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ("model.safetensors", "config.json", "vocab.json", "merges.txt")


class FakeHub:
    """``FakeHub({"CodeGoat24/Face-diffuser/SDM/pytorch_model.bin": data})``; ``.endpoint`` for HF_ENDPOINT."""

    def __init__(self, files: dict[str, Content]) -> None:
        self.files = dict(files)
        self._sha: dict[tuple[str, int], str] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self.authorization: dict[str, Optional[str]] = {}  # path -> the Authorization header of its last request
        self.cut: dict[str, int] = {}
        self.served: dict[str, bytes] = {}
        self.hold: dict[str, int] = {}
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, key: str) -> str:
        """The address of a plain web file."""
        return f"{self.endpoint}/{key}"

    def byte_requests(self, method: str = "GET") -> list[tuple[str, str, Optional[str]]]:
        """The ``method`` requests for files: not the hub's API calls (``/api/...``: huggingface_hub 2.x
        asks for ``/api/agent-harnesses`` before its first file request)."""
        return [request for request in self.requests if request[0] == method and not request[1].startswith("/api/")]

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Range")))
        self.authorization[handler.path] = handler.headers.get("Authorization")
        match = re.fullmatch(r"/(.+?/.+?)/resolve/[^/]+/(.+)", handler.path)
        key = f"{match.group(1)}/{match.group(2)}" if match else handler.path[1:]
        if key not in self.files:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        advertised = self.files[key]
        data = self.served.get(key, advertised)
        sha = self._sha256(key, advertised)
        size = _size(data)
        start = int(re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", "bytes=0-")).group(1)) if body else 0
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{sha}"')
        handler.send_header("X-Linked-Etag", f'"{sha}"')
        handler.send_header("X-Linked-Size", str(_size(advertised)))
        handler.send_header("Content-Length", str(size - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        if not body:
            return
        end = size
        if key in self.cut:
            end = start + self.cut.pop(key)
            handler.close_connection = True
        held = key in self.hold
        if held:
            end = start + self.hold.pop(key)
        for chunk in _chunks(data, start, end):
            handler.wfile.write(chunk)
        handler.wfile.flush()
        if held:
            self.release.wait(60)
            handler.close_connection = True

    def _sha256(self, key: str, content: Content) -> str:
        if (key, _size(content)) not in self._sha:
            digest = hashlib.sha256()
            for chunk in _chunks(content, 0, _size(content)):
                digest.update(chunk)
            self._sha[key, _size(content)] = digest.hexdigest()
        return self._sha[key, _size(content)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _size(content: Content) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _chunks(content: Content, start: int, end: int, chunk: int = 2**22) -> Iterator[bytes]:
    """Bytes ``start:end`` of ``content``, a piece at a time."""
    if isinstance(content, bytes):
        yield content[start:end]
        return
    with open(content, "rb") as source:
        source.seek(start)
        while start < end and (piece := source.read(min(chunk, end - start))):
            start += len(piece)
            yield piece


def official_hub(official: dict[str, Path], facenet: Path, clip_folder: Path) -> FakeHub:
    """The official models' places, served with the suite's stand-ins: the tiny SDM and TDM
    ({"SDM": path, "TDM": path}; the SDM's bytes as FastComposer's model), a tiny CLIP folder as CLIP
    ViT-L/14's repository and random FaceNet weights as the FaceNet release file."""
    sdm, tdm = official["SDM"].read_bytes(), official["TDM"].read_bytes()
    clip = {f"{CLIP_REPO}/{name}": (clip_folder / name).read_bytes() for name in CLIP_FILES}
    return FakeHub({SDM_KEY: sdm, TDM_KEY: tdm, FASTCOMPOSER_KEY: sdm, FACENET_KEY: facenet.read_bytes(), **clip})


def download_env(hub: FakeHub) -> dict[str, str]:
    """The environment under which ``download`` fetches everything from ``hub``."""
    return {"HF_ENDPOINT": hub.endpoint, "FACEDIFFUSER_FACENET_URL": hub.url(FACENET_KEY), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
