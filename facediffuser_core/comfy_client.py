"""A small client for ComfyUI's HTTP API (standard library only), used by the evaluation command.

``POST /upload/image`` for reference photos, ``POST /prompt`` to queue an API-format workflow,
``GET /history/<id>`` until it has finished, ``GET /view`` for the saved images.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Optional

__all__ = ["JobError", "ServerUnavailable", "ComfyClient"]


class JobError(Exception):
    """A job that ComfyUI refused or that failed while running (the server itself is fine)."""


class ServerUnavailable(Exception):
    """The server cannot be reached, or is not a ComfyUI with the Face-diffuser nodes."""


def _first_line(text: str, limit: int = 500) -> str:
    text = text.strip()
    return (text.splitlines()[0] if text else "")[:limit]


class ComfyClient:
    """One ComfyUI server, ``host:port`` or an ``http(s)://`` URL."""

    def __init__(self, server: str, timeout: float = 60.0, poll_interval: float = 0.5) -> None:
        self.url = (server if "://" in server else f"http://{server}").rstrip("/")
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.client_id = uuid.uuid4().hex

    def __str__(self) -> str:
        return self.url

    def _request(self, path: str, data: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError) as error:
            raise ServerUnavailable(f"{self.url} cannot be reached ({getattr(error, 'reason', error)})") from None

    def _json(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        return json.loads(self._request(path, data, {"Content-Type": "application/json"} if data is not None else None))

    def check(self) -> None:
        """Raise :class:`ServerUnavailable` unless the server answers and has the Face-diffuser nodes."""
        try:
            info = self._json("/object_info/FaceDiffuserSampler")
        except urllib.error.HTTPError as error:
            raise ServerUnavailable(f"{self.url} answered HTTP {error.code}: is it a ComfyUI server?") from None
        if "FaceDiffuserSampler" not in info:
            raise ServerUnavailable(f"{self.url} has no Face-diffuser nodes: install the pack in its custom_nodes folder")

    def upload(self, name: str, data: bytes, subfolder: str) -> str:
        """Upload an image into ComfyUI's input folder; returns the value for a LoadImage node."""
        boundary = uuid.uuid4().hex
        fields = [
            (f'name="image"; filename="{name}"', "image/png", data),
            ('name="subfolder"', None, subfolder.encode()),
            ('name="overwrite"', None, b"true"),
        ]
        body = b""
        for disposition, kind, value in fields:
            body += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
            body += (f"Content-Type: {kind}\r\n" if kind else "").encode() + b"\r\n" + value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        answer = json.loads(self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def queue(self, graph: dict) -> str:
        """Queue an API-format workflow; returns its prompt id. A workflow ComfyUI rejects is a :class:`JobError`."""
        try:
            return self._json("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as error:
            detail = _first_line(error.read().decode(errors="replace"), 2000)
            raise JobError(f"{self.url} rejected the workflow (HTTP {error.code}): {detail}") from None

    def wait(self, prompt_id: str, timeout: float) -> dict:
        """The ``/history`` entry of a prompt once it has finished successfully."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self._json(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "success":
                    return entry
                raise JobError(f"{self.url} failed the job: {self._error_message(entry)}")
            time.sleep(self.poll_interval)
        raise JobError(f"{self.url} did not finish the job within {timeout:.0f} s")

    @staticmethod
    def _error_message(entry: dict) -> str:
        for event, data in entry.get("status", {}).get("messages", []):
            if event == "execution_error":
                return f"{data.get('node_type')}: {_first_line(str(data.get('exception_message', '')))}"
            if event == "execution_interrupted":
                return "interrupted"
        return entry.get("status", {}).get("status_str", "unknown error")

    def download(self, image: dict) -> bytes:
        """The bytes of an image listed in a history entry's outputs."""
        query = urllib.parse.urlencode({key: image.get(key, "") for key in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")
