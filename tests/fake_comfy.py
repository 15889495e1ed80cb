"""A small fake ComfyUI server on 127.0.0.1 for the command tests that need no real one: real HTTP and
a real websocket, just enough of ComfyUI's API (/object_info, /upload/image, /prompt, /ws, /history,
/view, /queue, /interrupt).

A queued graph "runs" at once: the websocket gets ``executing`` for each node, a ``progress`` event
per sampler step, then ``executing`` with no node (after its history entry is stored, as ComfyUI
does). Its SaveImage lists ``batch_size`` images (``/view`` answers ``image``) and a PreviewImage as
many masks (``/view`` answers ``mask``). Behaviour by a word in the prompt: a key of ``fail`` fails
that many times (an execution_error of the sampler), ``invalid`` is refused with HTTP 400 the way
ComfyUI's validation answers, ``hang`` never finishes while ``hang`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A websocket frame as a server sends it (unmasked)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([length])
    elif length < 1 << 16:
        head += bytes([126]) + length.to_bytes(2, "big")
    else:
        head += bytes([127]) + length.to_bytes(8, "big")
    return head + payload


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()


class FakeComfy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image: bytes, fail: Optional[dict[str, int]] = None, mask: bytes = b"", port: int = 0, has_pack: bool = True) -> None:
        super().__init__(("127.0.0.1", port), FakeHandler)
        self.image, self.mask, self.fail = image, mask, dict(fail or {})
        self.hang, self.has_pack = True, has_pack
        self.models = ["facediffuser_sdm.safetensors", "facediffuser_tdm.safetensors"]  # GET /models/facediffuser
        self.queued: list[dict] = []
        self.uploads: list[tuple[str, str]] = []
        self.cancelled: list[tuple[str, dict]] = []  # (path, body) of /queue and /interrupt calls
        self.history: dict[str, dict] = {}
        self.sockets: dict[str, tuple] = {}  # client id -> (wfile, write lock, connection)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def send_event(self, client_id: str, kind: str, data: dict) -> None:
        websocket = self.sockets.get(client_id)
        if websocket is not None:
            wfile, lock, _ = websocket
            with lock:
                wfile.write(server_frame(1, json.dumps({"type": kind, "data": data}).encode()))

    def drop_connections(self) -> None:
        """Cut every websocket, as a server that dies does."""
        for _, _, connection in list(self.sockets.values()):
            connection.shutdown(socket.SHUT_RDWR)

    def run_job(self, prompt_id: str, graph: dict, client_id: str) -> None:
        """The websocket events of a run and its history entry (stored before the final event)."""
        prompt = next(n["inputs"]["prompt"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
        if "hang" in prompt and self.hang:
            return
        for node_id, node in graph.items():
            self.send_event(client_id, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            if node["class_type"] == "FaceDiffuserSampler":
                steps = node["inputs"]["steps"]
                for value in range(1, steps + 1):
                    self.send_event(client_id, "progress", {"value": value, "max": steps, "prompt_id": prompt_id, "node": node_id})
        with self.lock:
            self.history[prompt_id] = self.finish_job(prompt_id, graph, prompt)
        self.send_event(client_id, "executing", {"node": None, "prompt_id": prompt_id})

    def finish_job(self, prompt_id: str, graph: dict, prompt: str) -> dict:
        key = next((k for k in self.fail if k in prompt and self.fail[k] > 0), None)
        if key is not None:
            self.fail[key] -= 1
            sampler = next(k for k, n in graph.items() if n["class_type"] == "FaceDiffuserSampler")
            message = ["execution_error", {"prompt_id": prompt_id, "node_id": sampler, "node_type": "FaceDiffuserSampler", "exception_message": f"fake failure ({key})\ntraceback"}]
            return {"status": {"status_str": "error", "completed": False, "messages": [message]}, "outputs": {}}
        count = next((n["inputs"]["batch_size"] for n in graph.values() if n["class_type"] == "EmptyLatentImage"), 1)  # --into: one picture
        outputs = {}
        for node_id, node in graph.items():
            if node["class_type"] in ("SaveImage", "PreviewImage"):
                prefix = node["inputs"].get("filename_prefix", "preview")
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                images = [{"filename": f"{Path(prefix).name}_{i:05d}_.png", "subfolder": str(Path(prefix).parent).strip("."), "type": kind} for i in range(count)]
                outputs[node_id] = {"images": images}
        return {"status": {"status_str": "success", "completed": True, "messages": []}, "outputs": outputs}


class FakeHandler(BaseHTTPRequestHandler):
    server: FakeComfy

    def log_message(self, *args) -> None:
        pass

    def answer(self, body, kind: str = "application/json", status: int = 200) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(path.query)
        if path.path == "/object_info/FaceDiffuserSampler":
            self.answer({"FaceDiffuserSampler": {}} if self.server.has_pack else {})
        elif path.path == "/system_stats":
            self.answer({"system": {}})
        elif path.path == "/models/facediffuser":
            self.answer(self.server.models)
        elif path.path == "/ws":
            self.websocket(query["clientId"][0])
        elif path.path.startswith("/history/"):
            prompt_id = path.path.rsplit("/", 1)[1]
            with self.server.lock:
                entry = self.server.history.get(prompt_id)
            self.answer({prompt_id: entry} if entry else {})
        elif path.path == "/view":
            self.answer(self.server.image if query["type"][0] == "output" else self.server.mask, "image/png")
        else:
            self.send_error(404)

    def websocket(self, client_id: str) -> None:
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket_accept(self.headers["Sec-WebSocket-Key"]))
        self.end_headers()
        self.server.sockets[client_id] = (self.wfile, threading.Lock(), self.connection)
        self.server.send_event(client_id, "status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id})
        while self.rfile.read(1):  # until the client closes the connection
            pass
        self.server.sockets.pop(client_id, None)
        self.close_connection = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/upload/image":
            name = re.search(rb'filename="([^"]+)"', body).group(1).decode()
            subfolder = re.search(rb'name="subfolder"\r\n\r\n([^\r]*)\r\n', body).group(1).decode()
            assert body.count(b"\x89PNG") == 1
            with self.server.lock:
                self.server.uploads.append((subfolder, name))
            self.answer({"name": name, "subfolder": subfolder, "type": "input"})
        elif self.path == "/prompt":
            request = json.loads(body)
            graph = request["prompt"]
            prompt = next(n["inputs"]["prompt"] for n in graph.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
            if "invalid" in prompt:
                sampler = next(k for k, n in graph.items() if n["class_type"] == "FaceDiffuserSampler")
                error = {"type": "value_not_in_list", "message": "Value not in list", "details": "sampler_name: 'nope' not in (list of length 40)", "extra_info": {}}
                self.answer({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                             "node_errors": {sampler: {"errors": [error], "dependent_outputs": [], "class_type": "FaceDiffuserSampler"}}}, status=400)  # fmt: skip
                return
            with self.server.lock:
                prompt_id = f"p{len(self.server.queued)}-{self.server.server_address[1]}"
                self.server.queued.append(graph)
            self.answer({"prompt_id": prompt_id, "number": 0, "node_errors": {}})
            time.sleep(0.1)  # a job takes a moment, so that several servers get work
            self.server.run_job(prompt_id, graph, request.get("client_id", ""))
        elif self.path in ("/queue", "/interrupt"):
            with self.server.lock:
                self.server.cancelled.append((self.path, json.loads(body)))
            self.answer({})
        else:
            self.send_error(404)
