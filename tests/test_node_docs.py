"""Every node has a help page under web/docs/ (ComfyUI's node help panel shows it; the browser suite
checks that it opens), and the pack declares the web directory that serves them."""

import re

from workflow_format import REPO

DOCS = REPO / "web" / "docs"


def node_ids() -> set[str]:
    return {m for path in (REPO / "nodes").glob("*.py") for m in re.findall(r'node_id="(\w+)"', path.read_text())}


def test_pack_serves_its_web_directory():
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', (REPO / "__init__.py").read_text(), re.M)


def test_one_help_page_per_node():
    ids = node_ids()
    assert {"FaceDiffuserLoader", "FaceDiffuserSubjectEncode", "FaceDiffuserGuider", "FaceDiffuserSampler"} <= ids
    assert {path.stem for path in DOCS.glob("*.md")} == ids


def test_help_pages_start_with_the_node_title_and_describe_inputs_and_outputs():
    for path in DOCS.glob("*.md"):
        text = path.read_text()
        assert re.match(r"# (Face-diffuser|FastComposer) \S", text), path.name
        assert "## Inputs" in text and "## Outputs" in text, path.name
