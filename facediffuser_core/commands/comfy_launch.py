"""Find the ComfyUI this pack is installed in and run it headless for one command.

:func:`find_comfyui` looks at ``--comfyui``, then ``COMFYUI_PATH``, then the pack's own place
(``ComfyUI/custom_nodes/<pack>/facediffuser_core``, also when the pack folder is a symlink).
:func:`device_args` adds ``--cpu`` where torch finds no GPU and the user chose no device.
:class:`LocalComfyUI` starts ``main.py`` with this Python on 127.0.0.1 and a free port, in a process
group of its own (a new session on POSIX, a new process group on Windows), waits until it answers, and
stops it with its whole process tree again (psutil, which ComfyUI requires), on errors and Ctrl-C too.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import psutil

from ..errors import FaceDiffuserError
from ..weights.model_folders import PACK
from .comfy_client import ComfyClient, ServerUnavailable

__all__ = ["find_comfyui", "user_folder", "free_port", "accelerator_available", "device_args", "split_command", "start_options", "process_tree", "end_process_tree", "LocalComfyUI"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h
CREATE_NEW_PROCESS_GROUP = 0x200  # subprocess.CREATE_NEW_PROCESS_GROUP, which only Windows' Python defines
# ComfyUI's options that choose the device (comfy/cli_args.py, where the VRAM modes from --gpu-only
# to --novram are mutually exclusive with --cpu): a user who gives one has chosen
DEVICE_OPTIONS = frozenset({
    "--cpu", "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram",
    "--directml", "--cuda-device", "--default-device", "--oneapi-device-selector",
})  # fmt: skip


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def _pack_candidates(pack: Path, cwd: Optional[str]) -> list[Path]:
    """Where ComfyUI would be if the pack sits in its custom_nodes: two folders above the pack as it
    was imported, as it resolves, and as the shell's working directory spells it (``$PWD`` keeps a
    symlinked pack folder's name: ``cd ComfyUI/custom_nodes/<pack> && python -m facediffuser_core``)."""
    candidates = [pack.parent.parent, pack.resolve().parent.parent]
    if cwd:
        real = pack.resolve()
        logical = Path(cwd)
        for folder in [logical, *logical.parents]:
            if folder.resolve() == real:
                candidates.append(folder.parent.parent)
                break
    return candidates


def find_comfyui(explicit: Optional[Path] = None, environ: Mapping[str, str] = os.environ, pack: Path = PACK) -> Path:
    """The ComfyUI folder (with ``main.py``) to start: ``explicit`` (``--comfyui``), else
    ``COMFYUI_PATH``, else the ComfyUI whose ``custom_nodes`` holds this pack."""
    for path, source in ((explicit, "--comfyui"), (environ.get("COMFYUI_PATH"), "COMFYUI_PATH")):
        if path:
            if not _is_comfyui(Path(path)):
                raise FaceDiffuserError(f"{source} {path} is not a ComfyUI folder (no main.py and comfy/ in it)")
            return Path(path)
    for candidate in _pack_candidates(pack, environ.get("PWD")):
        if _is_comfyui(candidate):
            return candidate
    user = user_folder(pack, environ.get("PWD"))
    if user is not None:
        raise FaceDiffuserError(
            f"this pack is in {user}, a ComfyUI user folder without ComfyUI's code (the desktop app's): use the "
            f"app's server with --server 127.0.0.1:8000 while it is open, or pass --comfyui PATH (a folder with main.py) "
            f'with --comfyui-args="--base-directory {user}"'
        )
    raise FaceDiffuserError(
        f"no ComfyUI to start: this pack ({pack}) is not inside a ComfyUI/custom_nodes folder; pass "
        "--comfyui /path/to/ComfyUI or set COMFYUI_PATH, or use a running one with --server HOST:PORT"
    )


def split_command(text: str, platform: str = sys.platform) -> list[str]:
    """A command line typed by the user (``--comfyui-args``) as arguments: POSIX shell rules, except on
    Windows, where a backslash is a path separator, not an escape, and double quotes group."""
    if platform != "win32":
        return shlex.split(text)
    return [arg[1:-1] if len(arg) > 1 and arg[0] == arg[-1] == '"' else arg for arg in shlex.split(text, posix=False)]


def user_folder(pack: Path = PACK, cwd: Optional[str] = None) -> Optional[Path]:
    """The ComfyUI user folder the pack is installed in where that folder holds no ComfyUI code: the
    desktop app's (``custom_nodes``, ``models``, ``input``, ``output`` there; ``main.py`` inside the
    app, which starts it with ``--base-directory`` that folder). None elsewhere."""
    for candidate in _pack_candidates(pack, cwd):
        if (candidate / "custom_nodes").is_dir() and (candidate / "models").is_dir() and not _is_comfyui(candidate):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerator_available() -> bool:
    """Whether torch (imported here: the launcher itself does not need it) finds a CUDA, MPS or XPU
    device; a CUDA build of torch on a machine without the NVIDIA driver finds none."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def device_args(comfyui_args: Sequence[str]) -> list[str]:
    """The arguments to add to the user's ``comfyui_args`` for the ComfyUI to start: ``["--cpu"]``
    when torch finds no GPU (:func:`accelerator_available`) and ``comfyui_args`` chooses no device
    (none of :data:`DEVICE_OPTIONS`, also as ``--option=value``), else ``[]``: the user's choice wins,
    and a ComfyUI without a GPU would otherwise die at import."""
    if any(arg.split("=", 1)[0] in DEVICE_OPTIONS for arg in comfyui_args):
        return []
    return [] if accelerator_available() else ["--cpu"]


def _stop_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` (Linux) asking the kernel to send the child SIGTERM when this thread's process
    dies, even of SIGKILL, where no ``finally`` can stop it. prctl is looked up here, before the fork."""
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def request() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return request


def start_options(platform: str = sys.platform) -> dict[str, Any]:
    """``Popen`` options that put the server in a process group of its own, so that the Ctrl-C of the
    console reaches this command alone, which then stops the server: a new process group on Windows,
    a new session elsewhere, and on Linux the parent-death guard (:func:`_stop_with_parent`)."""
    if platform == "win32":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True, "preexec_fn": _stop_with_parent() if platform.startswith("linux") else None}


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants (empty when it has ended)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def end_process_tree(pid: int, grace: float) -> None:
    """Ask ``pid`` and its descendants to exit (SIGTERM; on Windows TerminateProcess, which is final),
    wait up to ``grace`` seconds, then kill what is left, descendants started meanwhile included. Where
    the platform has process groups (``os.killpg``), the group of ``pid`` is killed last too: it also
    holds descendants whose parent died before them. A Ctrl-C during the wait only cuts it short."""
    tree = process_tree(pid)
    for process in tree:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        psutil.wait_procs(tree, timeout=grace)
    except KeyboardInterrupt:
        pass
    for process in {*tree, *process_tree(pid)}:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    killpg, kill_signal = getattr(os, "killpg", None), getattr(signal, "SIGKILL", None)
    if killpg and kill_signal:
        try:
            killpg(pid, kill_signal)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group


class LocalComfyUI:
    """``with LocalComfyUI(path, args) as server:`` ComfyUI running headless; ``server`` is its
    ``127.0.0.1:port``. Its output goes to a log file in the temporary folder whose last lines are
    quoted if it fails to start; the file is removed after a run that ends well or by Ctrl-C and kept
    after an error. On Linux it also ends when the thread that started it does (enter it from one
    that outlives it)."""

    def __init__(self, path: Path, args: Sequence[str] = (), startup_timeout: float = 600.0) -> None:
        self.path, self.args, self.startup_timeout = Path(path), list(args), startup_timeout
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None
        self.log = Path(tempfile.gettempdir()) / f"facediffuser-comfyui-{os.getpid()}-{self.port}.log"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch", *self.args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **start_options(),  # its own process group: Ctrl-C is ours to pass on
            )  # fmt: skip
        try:
            self._wait_until_up()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self.server

    def __exit__(self, exc_type: Optional[type] = None, *exc_info) -> None:
        self.stop()
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.log.unlink(missing_ok=True)  # kept after an error: ComfyUI's traceback is there

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_until_up(self) -> None:
        client = ComfyClient(self.server, timeout=5)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerUnavailable(f"ComfyUI in {self.path} exited with code {self.process.returncode} while starting ({self.log}):\n{self.log_tail()}")
            try:
                client.ping()
            except ServerUnavailable:
                time.sleep(0.5)
                continue
            client.check()  # it answers: does it have the pack's nodes?
            return
        raise ServerUnavailable(f"ComfyUI in {self.path} did not answer within {self.startup_timeout:.0f} s ({self.log}):\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """Stop ComfyUI and its children (:func:`end_process_tree`: ``grace`` seconds to exit, then
        killed). A second Ctrl-C while it waits only cuts the wait short."""
        if self.process is None:
            return
        try:
            end_process_tree(self.process.pid, grace)
        finally:
            self.process.wait()
