"""A real ComfyUI server in a subprocess (``--cpu`` on 127.0.0.1) and a small HTTP/websocket client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import requests
import websocket

PACK_NAME = "ComfyUI-FaceDiffuser"
REPO = Path(__file__).resolve().parents[2]
# What every ComfyUI the suites start runs with. The UNets keep the test files' fp16 weights (ComfyUI
# computes in float32 on a CPU all the same: the results are bit-identical, the memory half).
SERVER_ARGS = ["--fp16-unet"]
# glibc keeps freed small-to-medium blocks in the heap, and a ComfyUI that loads several SD1.5-sized
# models in turn grows by each (about 14 GB after five workflows on 0.33): allocations above 64 KiB
# are mapped on their own instead and go back to the system when freed (children inherit it).
LOW_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class PromptRejected(Exception):
    """POST /prompt answered 400 (validation failed); ``body`` is ComfyUI's JSON answer."""

    def __init__(self, body: dict) -> None:
        super().__init__(json.dumps(body)[:2000])
        self.body = body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_directory(base: Path, models: dict[str, Path], inputs: list[Path], other_models: dict[str, Path] | None = None) -> Path:
    """A ComfyUI ``--base-directory`` with the pack linked into custom_nodes, ``models`` linked into
    models/facediffuser (name -> file or folder), ``other_models`` into models/ (``checkpoints/x``
    -> file) and ``inputs`` copied into input/."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    folder = base / "models" / "facediffuser"
    folder.mkdir(parents=True, exist_ok=True)
    links = {folder / name: target for name, target in models.items()}
    links.update({base / "models" / name: target for name, target in (other_models or {}).items()})
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target)
    (base / "input").mkdir(exist_ok=True)
    for path in inputs:
        shutil.copy(path, base / "input" / path.name)
    return base


@dataclass
class ComfyServer:
    comfy_path: Path
    base: Path
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: Optional[subprocess.Popen] = None
    suite_settings: bool = True  # SERVER_ARGS and LOW_MEMORY_ENV; False: ComfyUI as a user starts it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "comfyui.log"

    def start(self, timeout: float = 600) -> "ComfyServer":
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--disable-auto-launch", *(SERVER_ARGS if self.suite_settings else []), *self.extra_args,
        ]  # fmt: skip
        env = {**os.environ, **(LOW_MEMORY_ENV if self.suite_settings else {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def free(self, timeout: float = 60) -> None:
        """Unload every model and drop the cached node outputs (POST /free, as the web UI's "Unload
        models" does), and wait until the server's memory stops falling."""
        assert self.post("/free", {"unload_models": True, "free_memory": True}).ok
        time.sleep(2.0)  # its prompt worker takes the request between prompts
        deadline, last = time.monotonic() + timeout, self.rss()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.rss()
            if now > last - 2**24:  # less than 16 MiB freed in the last second
                return
            last = now

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str, **params) -> Any:
        response = requests.get(self.url + path, params=params, timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=60)

    def post_files(self, path: str, files: dict) -> requests.Response:
        """A multipart POST, as the web UI uploads images (``files``: name -> (filename, bytes, type))."""
        return requests.post(self.url + path, files=files, timeout=60)

    def queue(self, prompt: dict, client_id: Optional[str] = None, extra_data: Optional[dict] = None) -> str:
        body: dict = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if extra_data:
            body["extra_data"] = extra_data
        response = self.post("/prompt", body)
        if response.status_code == 400:
            raise PromptRejected(response.json())
        response.raise_for_status()
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """The /history entry of a finished prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.1)  # most test prompts take a few seconds: a finer poll wastes less of each
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def connect(self, client_id: str) -> websocket.WebSocket:
        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=900)
        return ws

    def view(self, image: dict) -> bytes:
        response = requests.get(self.url + "/view", params=image, timeout=60)
        response.raise_for_status()
        return response.content


def status_message(entry: dict, event: str) -> Optional[dict]:
    """The data of the first ``event`` (e.g. ``execution_error``) in a history entry's messages."""
    for name, data in entry["status"].get("messages", []):
        if name == event:
            return data
    return None
