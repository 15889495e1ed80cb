"""Run a command and report the peak memory of it and every process it starts (servers included).

    python .ci/peak_memory.py LABEL -- COMMAND [ARGS...]

Samples every 0.2 s the command's process tree (Linux /proc): the peak of its summed anonymous memory
(RssAnon + RssShmem: what needs RAM or swap) and of its summed resident set size (RSS, which also
counts the pages of memory-mapped files such as model files, page cache the kernel can reclaim).
Shared pages count once per process, so both figures are upper bounds. Every 2 s it also samples the
whole machine's used memory (MemTotal - MemAvailable, /proc/meminfo) and reports its peak above the
level at the start: what the run costs the machine (the per-process figures name the culprit; this one
also counts whatever else runs meanwhile). Prints one line at the end (with the wall-clock time of the
peak and the three largest processes then) and appends it to $PEAK_MEMORY_LOG when set (CI prints
those lines last). Exits with the command's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def memory(pid: int) -> tuple[int, int]:
    """(anonymous, resident) bytes of one process, from /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("RssAnon", 0) + fields.get("RssShmem", 0), fields.get("VmRSS", 0)


def machine_used() -> int:
    """MemTotal - MemAvailable of the whole machine in bytes (0 without /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {key: int(value.split()[0]) * 1024 for key, _, value in (line.partition(":") for line in meminfo)}
    except OSError:
        return 0
    return fields.get("MemTotal", 0) - fields.get("MemAvailable", 0)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def process_name(pid: int) -> str:
    """What a process is, for the report: pytest (the suite itself), ComfyUI (a server: its main.py),
    else its command name (chromium, ...)."""
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"pytest" in arguments:
        return "pytest"
    if any(Path(argument.decode(errors="replace")).name == "main.py" for argument in arguments[1:3]):
        return "ComfyUI"
    return Path(f"/proc/{pid}/comm").read_text().strip()


def tree_memory(root: int) -> tuple[int, int, str]:
    """(summed anonymous bytes, summed RSS bytes, the three largest processes as
    'name pid N.N GB, ...') of ``root`` and its descendants."""
    anonymous, resident, sizes = 0, 0, []
    for pid in descendants(root):
        try:
            anon, rss = memory(pid)
            sizes.append((anon, f"{process_name(pid)} {pid} {anon / GIB:.1f} GB"))
        except OSError:
            continue
        anonymous += anon
        resident += rss
    largest = ", ".join(name for _, name in sorted(sizes, reverse=True)[:3])
    return anonymous, resident, largest


def main() -> int:
    label, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        sys.exit(__doc__)
    start_level = machine_used()
    child = subprocess.Popen(command)
    peak = {"anonymous": 0, "largest": "", "resident": 0, "at": "", "machine": 0, "machine_at": ""}
    started = time.monotonic()

    def sample() -> None:
        count = 0
        while child.poll() is None:
            anonymous, resident, largest = tree_memory(child.pid)
            if anonymous > peak["anonymous"]:
                peak.update(anonymous=anonymous, largest=largest, at=time.strftime("%H:%M:%S"))
            peak["resident"] = max(peak["resident"], resident)
            if count % 10 == 0:  # every 2 s
                used = machine_used() - start_level
                if used > peak["machine"]:
                    peak.update(machine=used, machine_at=time.strftime("%H:%M:%S"))
            count += 1
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = child.wait()
    sampler.join()
    line = (
        f"{label}: peak memory {peak['anonymous'] / GIB:.1f} GB at {peak['at']} (largest processes then: {peak['largest']}); "
        f"peak RSS with mapped files {peak['resident'] / GIB:.1f} GB; machine's used memory (MemTotal - MemAvailable) "
        f"peak {peak['machine'] / GIB:.1f} GiB above its start level at {peak['machine_at'] or '-'}; "
        f"{(time.monotonic() - started) / 60:.1f} min, exit {code}"
    )
    print(line, flush=True)
    if os.environ.get("PEAK_MEMORY_LOG"):
        with open(os.environ["PEAK_MEMORY_LOG"], "a") as log:
            log.write(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
