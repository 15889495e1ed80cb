"""The ComfyUI job machinery without ComfyUI: the graph builder (checked against the shipped API
workflows, which the integration suite runs in a real ComfyUI), the websocket reader against a raw
socket server, and the client (events, errors, cancelling, a lost final event) against the fake
server of tests/fake_comfy.py."""

from __future__ import annotations

import copy

import json
import re
import socket
import threading
import time

import pytest

from facediffuser_core.commands.comfy_client import ComfyClient, Generation, JobError, ServerUnavailable, WebSocket, build_graph, fill_template
from facediffuser_core.errors import FaceDiffuserError
from facediffuser_core.faces.detection import DEFAULT_CROP_SIZE, DEFAULT_MARGIN, IF_NO_FACE
from fake_comfy import FakeComfy, server_frame, websocket_accept
from workflow_format import API_WORKFLOWS, DEPRECATED_NODES

GENERATE_CROP = {"face_index": 0, "margin": DEFAULT_MARGIN, "size": DEFAULT_CROP_SIZE, "if_no_face": IF_NO_FACE[0]}  # reference_png's defaults


def single_photo_people(graph: dict, link: list):
    """The photo links of a chain of Face-diffuser Subject nodes that each take one IMAGE input and no
    mask, in marker order; None for any other chain. Such a chain into ``subjects`` computes what
    those photos batched into ``images`` compute, bit for bit (combine_embeddings gives a lone photo's
    embedding as it is, in either mode: tests/core/test_subjects.py, one photo per subject)."""
    links = []
    while link is not None:
        node = graph[link[0]]
        if node["class_type"] != "FaceDiffuserSubject" or set(node["inputs"]) - {"previous_subjects"} != {"images", "combine"}:
            return None
        links.insert(0, node["inputs"]["images"])
        link = node["inputs"].get("previous_subjects")
    return links


def canonical(graph: dict, value):
    """A link as the tree of what computes it (node ids and titles left out; a Face
    Crop with generate's settings as the photo it crops, since generate uploads that crop; a chain of
    one-photo Subject nodes into ``subjects`` as those photos batched into ``images``)."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        return value
    node = graph[value[0]]
    if node["class_type"] == "FaceDiffuserFaceCrop":  # generate uploads its photos cropped just so (reference_png)
        assert value[1] == 0 and {k: v for k, v in node["inputs"].items() if k != "images"} == GENERATE_CROP
        return canonical(graph, node["inputs"]["images"])
    inputs = {name: canonical(graph, v) for name, v in node["inputs"].items()}
    people = single_photo_people(graph, node["inputs"]["subjects"]) if "subjects" in node["inputs"] else None
    photos = [canonical(graph, link) for link in people or []]
    if photos and not any(photo[0] == "batch" for photo in photos):  # one photo per Subject node
        del inputs["subjects"]
        inputs["images"] = batched(photos)
    return (node["class_type"], tuple(sorted(inputs.items())), value[1])


def batched(parts: list):
    """What batching ``parts`` (canonical links) in order gives: a part alone, or the flat list of them."""
    if len(parts) == 1:
        return parts[0]
    return ("batch", tuple(item for part in parts for item in (part[1] if part[0] == "batch" else [part])))


def subject_chain(graph: dict, link: list) -> list[dict]:
    """The Face-diffuser Subject nodes chained into ``link`` (a ``subjects`` input), in marker order."""
    chain = []
    while link is not None:
        node = graph[link[0]]
        assert node["class_type"] == "FaceDiffuserSubject" and link[1] == 0
        chain.insert(0, node)
        link = node["inputs"].get("previous_subjects")
    return chain


def photo_names(graph: dict, subject: dict) -> list[str]:
    """A Subject node's photos, each straight from a LoadImage into its own photo input, in input order."""
    names = [name for name in ("images", "images_2", "images_3", "images_4") if name in subject["inputs"]]
    assert all(graph[subject["inputs"][name][0]]["class_type"] == "LoadImage" for name in names)
    return [graph[subject["inputs"][name][0]]["inputs"]["image"] for name in names]


def check_no_deprecated_node(graph: dict) -> None:
    used = {node["class_type"] for node in graph.values()}
    assert not used & DEPRECATED_NODES, f"build_graph used {sorted(used & DEPRECATED_NODES)}, which ComfyUI 0.33's web UI shows as [DEPR]"


def outputs(graph: dict) -> list:
    return sorted(repr(canonical(graph, [key, 0])) for key, node in graph.items() if node["class_type"] in ("SaveImage", "PreviewImage"))


@pytest.mark.parametrize("name,faces", [("facediffuser_one_subject.json", (("face_1.png",),)), ("facediffuser_two_subjects.json", (("face_1.png",), ("face_2.png",)))])
def test_built_graphs_compute_what_the_shipped_workflows_compute(name, faces):
    shipped = json.loads((API_WORKFLOWS / name).read_text())
    prompt = next(n["inputs"]["prompt"] for n in shipped.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    built = build_graph(Generation(prompt, faces, seed=42))
    check_no_deprecated_node(built.nodes)
    assert outputs(built.nodes) == outputs(shipped)
    assert built.nodes[built.sampler]["class_type"] == "FaceDiffuserSampler"
    assert built.nodes[built.images]["class_type"] == "SaveImage" and built.nodes[built.masks]["class_type"] == "PreviewImage"
    assert all(node["_meta"]["title"] for node in built.nodes.values())


def test_built_graphs_chain_one_subject_node_per_face_for_up_to_four_faces_in_marker_order():
    job = Generation("a <|image|> b <|image|> c <|image|> d <|image|>", (("1.png",), ("2.png",), ("3.png",), ("4.png",)), negative="blurry",
                     seed=9, steps=7, cfg=3.5, start_merge=0.2, final=0.8, width=96, height=64, batch=3, sampler="euler",
                     scheduler="karras", sdm="s.safetensors", tdm="t.safetensors", filename_prefix="out/x", subject_mask=False)  # fmt: skip
    built = build_graph(job)
    nodes = built.nodes
    check_no_deprecated_node(nodes)
    encode = next(n for n in nodes.values() if n["class_type"] == "FaceDiffuserSubjectEncode")
    assert "images" not in encode["inputs"] and "masks" not in encode["inputs"]
    chain = subject_chain(nodes, encode["inputs"]["subjects"])
    assert [photo_names(nodes, subject) for subject in chain] == [["1.png"], ["2.png"], ["3.png"], ["4.png"]]
    assert [subject["_meta"]["title"] for subject in chain] == [f"Person of the {n} <|image|>" for n in ("1st", "2nd", "3rd", "4th")]
    assert len([n for n in nodes.values() if n["class_type"] == "FaceDiffuserSubject"]) == 4 and all("mask" not in s["inputs"] for s in chain)
    sampler = nodes[built.sampler]["inputs"]
    assert {k: sampler[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "start_merge", "final", "denoise")} == {
        "seed": 9, "steps": 7, "cfg": 3.5, "sampler_name": "euler", "scheduler": "karras", "start_merge": 0.2, "final": 0.8, "denoise": 1.0,
    }  # fmt: skip
    assert nodes[sampler["negative"][0]]["inputs"]["text"] == "blurry"
    assert nodes[sampler["latent_image"][0]]["inputs"] == {"width": 96, "height": 64, "batch_size": 3}
    loader = next(n for n in nodes.values() if n["class_type"] == "FaceDiffuserLoader")["inputs"]
    assert (loader["sdm_name"], loader["tdm_name"]) == ("s.safetensors", "t.safetensors")
    assert nodes[built.images]["inputs"]["filename_prefix"] == "out/x"
    assert built.masks is None and not any(n["class_type"] in ("MaskToImage", "PreviewImage") for n in nodes.values())
    with pytest.raises(FaceDiffuserError, match="takes 1 to 4 faces, got 5"):
        build_graph(Generation("p", (("a.png",),) * 5))
    with pytest.raises(FaceDiffuserError, match="every face .* needs at least one photo"):
        build_graph(Generation("p", (("a.png",), ())))
    with pytest.raises(FaceDiffuserError, match=r"face 2 has 5 photos; a Face-diffuser Subject node takes at most 4 \(images, images_2, images_3, images_4\)"):
        build_graph(Generation("p", (("a.png",), ("b.png",) * 5)))


def test_several_photos_of_a_person_go_through_chained_subject_nodes():
    shipped = json.loads((API_WORKFLOWS / "facediffuser_two_photos.json").read_text())
    encode = next(n for n in shipped.values() if n["class_type"] == "FaceDiffuserSubjectEncode")["inputs"]
    (subject,) = [n["inputs"] for n in shipped.values() if n["class_type"] == "FaceDiffuserSubject"]
    crops = [shipped[subject[name][0]] for name in ("images", "images_2")]  # the GUI crops each photo; generate uploads crops
    assert [crop["class_type"] for crop in crops] == ["FaceDiffuserFaceCrop"] * 2
    photos = tuple(shipped[crop["inputs"]["images"][0]]["inputs"]["image"] for crop in crops)
    built = build_graph(Generation(encode["prompt"], (photos,), seed=42, combine=subject["combine"]))
    nodes = built.nodes
    check_no_deprecated_node(nodes)
    (built_subject,) = [n["inputs"] for n in nodes.values() if n["class_type"] == "FaceDiffuserSubject"]
    # as the shipped workflow: the photos in images and images_2, each its own (cropped) photo
    assert {name: canonical(nodes, built_subject[name]) for name in ("images", "images_2")} == {name: canonical(shipped, subject[name]) for name in ("images", "images_2")}
    assert built_subject["combine"] == subject["combine"] and "previous_subjects" not in built_subject
    built_encode = next(n for n in nodes.values() if n["class_type"] == "FaceDiffuserSubjectEncode")["inputs"]
    assert "images" not in built_encode and nodes[built_encode["subjects"][0]]["class_type"] == "FaceDiffuserSubject"
    sampler = lambda graph: next(n for n in graph.values() if n["class_type"] == "FaceDiffuserSampler")["inputs"]  # noqa: E731
    without_references = lambda graph: {k: canonical(graph, v) for k, v in sampler(graph).items() if k not in ("text", "subject")}  # noqa: E731
    assert without_references(nodes) == without_references(shipped)


def test_subject_nodes_chain_in_marker_order_with_each_persons_photos():
    job = Generation("a <|image|> and b <|image|> and c <|image|>", (("a1.png", "a2.png", "a3.png"), ("b.png",), ("c1.png", "c2.png")), combine="norm average")
    nodes = build_graph(job).nodes
    check_no_deprecated_node(nodes)
    encode = next(n for n in nodes.values() if n["class_type"] == "FaceDiffuserSubjectEncode")["inputs"]
    chain = subject_chain(nodes, encode["subjects"])
    assert all(subject["inputs"]["combine"] == "norm average" for subject in chain)
    assert [photo_names(nodes, subject) for subject in chain] == [["a1.png", "a2.png", "a3.png"], ["b.png"], ["c1.png", "c2.png"]]


def test_filled_templates_keep_their_own_settings():
    template = json.loads((API_WORKFLOWS / "facediffuser_one_subject.json").read_text())
    filled = fill_template(template, Generation("a man <|image|> at sea", (("me.png",),), seed=3, steps=4, start_merge=0.1, sampler="euler"))
    sampler = filled.nodes[filled.sampler]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["start_merge"], sampler["sampler_name"]) == (3, 4, 0.3, "ddim")
    assert filled.nodes[filled.masks]["class_type"] == "PreviewImage" and filled.nodes["2"]["inputs"]["image"] == "me.png"
    assert fill_template(template, Generation("p <|image|>", (("x.png",),), subject_mask=False)).masks is None
    with pytest.raises(FaceDiffuserError, match=r"the workflow loads the photos of 1 person\(s\) but the job has 2 faces"):
        fill_template(template, Generation("p", (("x.png",), ("y.png",))))
    two = json.loads((API_WORKFLOWS / "facediffuser_two_subjects.json").read_text())  # counted through its Subject nodes
    with pytest.raises(FaceDiffuserError, match=r"the workflow loads the photos of 2 person\(s\) but the job has 1 faces"):
        fill_template(two, Generation("p", (("x.png",),)))
    with pytest.raises(FaceDiffuserError, match="a workflow template takes one photo per face"):
        fill_template(template, Generation("p", (("x.png", "y.png"),)))
    photos = json.loads((API_WORKFLOWS / "facediffuser_two_photos.json").read_text())  # one Subject node with two photos
    with pytest.raises(FaceDiffuserError, match="the person of marker 1 has 2 Load Image nodes; a workflow template takes one photo per face"):
        fill_template(photos, Generation("p", (("x.png",),)))


def test_a_templates_face_detailer_details_the_jobs_people():
    """The Face Detailer takes the Subject chain that Subject Encode takes, so the job's faces reach both;
    a detailer with people of its own would detail the template's faces, and is refused."""
    template = json.loads((API_WORKFLOWS / "facediffuser_face_detailer.json").read_text())
    filled = fill_template(template, Generation("a man <|image|> and a man <|image|>", (("first.png",), ("second.png",)))).nodes
    (detailer,) = [n["inputs"] for n in filled.values() if n["class_type"] == "FaceDiffuserFaceDetailer"]
    people, link = [], detailer["subjects"]
    while link is not None:
        people.insert(0, filled[filled[link[0]]["inputs"]["images"][0]]["inputs"]["image"])
        link = filled[link[0]]["inputs"].get("previous_subjects")
    assert people == ["first.png", "second.png"]
    own = copy.deepcopy(template)
    (key,) = [k for k, n in own.items() if n["class_type"] == "FaceDiffuserFaceDetailer"]
    last = own[key]["inputs"]["subjects"][0]
    own[key]["inputs"]["subjects"] = own[last]["inputs"]["previous_subjects"]  # the first person only
    with pytest.raises(FaceDiffuserError, match=f"node {key} \\(Face-diffuser Face Detailer\\) takes other people than Subject Encode"):
        fill_template(own, Generation("a man <|image|> and a man <|image|>", (("a.png",), ("b.png",))))


def test_a_templates_face_crops_are_bypassed_since_the_job_brings_crops():
    """The shipped workflows crop their photos (Face Crop); a filled template takes the job's crops
    straight from its Load Image nodes, in marker order, and keeps every other node."""
    template = json.loads((API_WORKFLOWS / "facediffuser_two_subjects.json").read_text())
    crops = {key: node["inputs"]["images"] for key, node in template.items() if node["class_type"] == "FaceDiffuserFaceCrop"}
    assert len(crops) == 2  # one per face
    filled = fill_template(template, Generation("a man <|image|> and a man <|image|>", (("first.png",), ("second.png",)))).nodes
    assert set(filled) == set(template) - set(crops)
    (encode,) = [node["inputs"] for node in filled.values() if node["class_type"] == "FaceDiffuserSubjectEncode"]
    second = encode["subjects"][0]  # the people: one Subject node per marker, the last one into subjects
    first = filled[second]["inputs"]["previous_subjects"][0]
    assert "previous_subjects" not in filled[first]["inputs"]
    assert [filled[filled[key]["inputs"]["images"][0]]["inputs"]["image"] for key in (first, second)] == ["first.png", "second.png"]
    assert [filled[key]["inputs"]["images"] for key in (first, second)] == [crops[template[key]["inputs"]["images"][0]] for key in (first, second)]
    previewed = copy.deepcopy(template)
    crop = next(iter(crops))
    previewed["99"] = {"class_type": "PreviewImage", "inputs": {"images": [crop, 2]}}
    with pytest.raises(FaceDiffuserError, match=f"node {crop} \\(Face-diffuser Face Crop\\) feeds its face_mask or preview on"):
        fill_template(previewed, Generation("a man <|image|> and a man <|image|>", (("a.png",), ("b.png",))))


# --- the websocket ----------------------------------------------------------------------------


class RawServer:
    """A one-connection TCP server that answers the websocket handshake, then runs ``script(conn)``."""

    def __init__(self, script, answer_handshake: bool = True) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.script, self.answer_handshake = script, answer_handshake
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1).decode()
            if not self.answer_handshake:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            head = f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n"
            try:
                self.script(conn, head.encode())
            except BaseException as error:  # reported by the test
                self.error.append(error)


def read_client_frame(conn: socket.socket) -> tuple[int, bytes, bool]:
    """(opcode, unmasked payload, was it masked) of a short frame from the client."""
    head = conn.recv(2)
    length = head[1] & 0x7F
    mask = conn.recv(4) if head[1] & 0x80 else b""
    payload = b""
    while len(payload) < length:
        payload += conn.recv(length - len(payload))
    return head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if mask else payload, bool(mask)


def test_websocket_reads_fragments_long_frames_and_split_packets_and_answers_pings():
    big = bytes(range(256)) * 300  # 76800 bytes: the 64-bit length form
    medium = b"m" * 300  # the 16-bit length form
    pongs = []
    go_on = threading.Event()

    def script(conn, head):
        frame = server_frame(9, b"are you there")  # a ping, in the same packet as the handshake answer
        conn.sendall(head + frame + server_frame(1, b'{"a":', fin=False) + server_frame(0, b" 1}"))
        pongs.append(read_client_frame(conn))
        conn.sendall(server_frame(2, big) + server_frame(1, medium))
        split = server_frame(1, b'{"late": true}')
        conn.sendall(split[:1])  # half a header, then a pause longer than the client's wait
        go_on.wait(10)
        conn.sendall(split[1:] + server_frame(8, b"\x03\xe8"))
        time.sleep(0.5)

    server = RawServer(script)
    ws = WebSocket(f"http://127.0.0.1:{server.port}/ws?clientId=abc", timeout=10)
    assert ws.receive(5) == (1, b'{"a": 1}')
    assert ws.receive(5) == (2, big)
    assert ws.receive(5) == (1, medium)
    assert ws.receive(0.3) is None  # nothing whole yet: the partial frame is kept
    go_on.set()
    assert ws.receive(5) == (1, b'{"late": true}')
    with pytest.raises(ConnectionError, match="closed"):
        ws.receive(5)
    ws.close()
    server.thread.join(10)
    assert not server.error and pongs == [(0xA, b"are you there", True)]  # masked, as a client must


def test_websocket_refused():
    server = RawServer(None, answer_handshake=False)
    with pytest.raises(ConnectionError, match=r"no websocket at .* \(answer: HTTP/1.1 404 Not Found\)"):
        WebSocket(f"http://127.0.0.1:{server.port}/ws", timeout=10)


# --- the client against the fake server -------------------------------------------------------


@pytest.fixture
def fake():
    server = FakeComfy(b"image-bytes", mask=b"mask-bytes")
    yield server
    server.shutdown()


def graph_for(prompt: str, **settings) -> Generation:
    return build_graph(Generation(prompt, (("face.png",),), **settings))


def test_run_passes_the_job_events_and_returns_its_outputs(fake):
    graph = graph_for("a man <|image|>", steps=3, batch=2)
    events = []
    client = ComfyClient(fake.address)
    client.check()
    entry = client.run(graph.nodes, timeout=30, on_event=lambda kind, data: events.append((kind, data.get("node"), data.get("value"))))
    assert [e for e in events if e[0] == "progress"] == [("progress", graph.sampler, value) for value in (1, 2, 3)]
    assert [e[1] for e in events if e[0] == "executing"] == list(graph.nodes)
    assert client.images(entry, graph.images) == [b"image-bytes"] * 2 and client.images(entry, graph.masks) == [b"mask-bytes"] * 2
    assert client.running is None and not fake.cancelled


def test_a_rejected_workflow_names_the_node_and_the_problem(fake):
    graph = graph_for("a man <|image|>, invalid")
    with pytest.raises(JobError) as caught:
        ComfyClient(fake.address).run(graph.nodes, timeout=30)
    assert str(caught.value) == (
        f"http://{fake.address} rejected the workflow (HTTP 400): Prompt outputs failed validation; FaceDiffuserSampler "
        f"(node {graph.sampler}, 'Face-diffuser Sampler'): Value not in list: sampler_name: 'nope' not in (list of length 40)"
    )


def test_a_failed_node_is_one_line_naming_it(fake):
    fake.fail["broken"] = 1
    graph = graph_for("a man <|image|>, broken")
    with pytest.raises(JobError) as caught:
        ComfyClient(fake.address).run(graph.nodes, timeout=30)
    assert str(caught.value) == f"http://{fake.address} failed the job: FaceDiffuserSampler (node {graph.sampler}, 'Face-diffuser Sampler'): fake failure (broken)"


def test_a_job_past_its_time_limit_is_taken_off_the_server(fake):
    client = ComfyClient(fake.address, heartbeat=0.2)
    with pytest.raises(JobError, match="did not finish the job within the time limit"):
        client.run(graph_for("a man <|image|>, hang").nodes, timeout=1)
    prompt_id = f"p0-{fake.server_address[1]}"
    assert fake.cancelled == [("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})]
    assert client.running is None


def test_a_missed_final_event_is_caught_up_from_the_history(fake):
    send = fake.send_event
    fake.send_event = lambda client_id, kind, data: None if kind == "executing" and data["node"] is None else send(client_id, kind, data)
    graph = graph_for("a man <|image|>")
    started = time.monotonic()
    entry = ComfyClient(fake.address, heartbeat=0.3).run(graph.nodes, timeout=30)
    assert entry["status"]["status_str"] == "success" and time.monotonic() - started < 10


def test_a_server_that_goes_away_during_the_job(fake):
    errors = []

    def wait() -> None:
        try:
            ComfyClient(fake.address).run(graph_for("a man <|image|>, hang").nodes, 30)
        except ServerUnavailable as error:
            errors.append(str(error))

    thread = threading.Thread(target=wait)
    thread.start()
    deadline = time.monotonic() + 10
    while not fake.queued and time.monotonic() < deadline:
        time.sleep(0.05)
    fake.drop_connections()
    thread.join(30)
    assert len(errors) == 1 and errors[0].startswith(f"http://{fake.address} went away during the job")


def test_unreachable_and_foreign_servers():
    with pytest.raises(ServerUnavailable, match=r"http://127.0.0.1:1 cannot be reached"):
        ComfyClient("127.0.0.1:1", timeout=5).check()
    with pytest.raises(ServerUnavailable, match=r"http://127.0.0.1:1 cannot be reached"):
        ComfyClient("127.0.0.1:1", timeout=5).run({}, timeout=5)


def test_uploads_are_named_by_content(fake):
    client = ComfyClient(fake.address)
    first = client.upload("my photo (1)", b"\x89PNG one", "faces")
    assert re.fullmatch(r"faces/my-photo-1_[0-9a-f]{10}\.png", first)
    assert client.upload("my photo (1)", b"\x89PNG one", "faces") == first
    assert client.upload("my photo (1)", b"\x89PNG two", "faces") != first
