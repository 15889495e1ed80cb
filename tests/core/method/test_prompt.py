"""``<|image|>`` prompt parsing against the official FastComposer tokenization, with the real
CLIP BPE vocabulary that open-clip-torch ships."""

from __future__ import annotations

import re

import numpy as np
import torch

import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from eval_models import write_clip_tokenizer
from facediffuser_core.errors import PromptError
from facediffuser_core.method.prompt import CHUNK_TOKENS, MARKER, MAX_SUBJECTS, Tokenize, parse_prompt


@pytest.fixture(scope="module")
def simple_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def official_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    """The official special tokenizer: a CLIPTokenizer with ``<|image|>`` added as a special token."""
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path_factory.mktemp("clip_vocab"))))
    tokenizer.add_tokens([MARKER], special_tokens=True)
    return tokenizer


def official_parse(tokenizer: CLIPTokenizer, caption: str) -> tuple[list[int], list[int]]:
    """FastComposer's ``_tokenize_and_mask_noun_phrases_ends`` walk.

    Returns the clean ids without BOS/EOS and, per marker, the marked index in ``[BOS] + clean ids``.
    """
    image_token_id = tokenizer.convert_tokens_to_ids(MARKER)
    clean_ids: list[int] = []
    positions: list[int] = []
    clean_index = 0
    for token_id in tokenizer.encode(caption):
        if token_id == image_token_id:
            positions.append(clean_index - 1)
        else:
            clean_ids.append(token_id)
            clean_index += 1
    assert clean_ids[0] == tokenizer.bos_token_id and clean_ids[-1] == tokenizer.eos_token_id
    return clean_ids[1:-1], positions


@pytest.fixture(params=["open_clip", "transformers"])
def tokenize(request: pytest.FixtureRequest, simple_tokenizer: SimpleTokenizer, official_tokenizer: CLIPTokenizer) -> Tokenize:
    """Both kinds of tokenizer callable parse_prompt must accept."""
    if request.param == "open_clip":
        return simple_tokenizer.encode
    return lambda text: official_tokenizer.encode(text, add_special_tokens=False)


PROMPTS = [
    "a man <|image|> at a cafe",
    "a man <|image|>, smiling",
    "a man <|image|>'s hat on a table",
    "a man <|image|>",
    "a man<|image|> at a cafe",
    "a tyrannosaurus <|image|> eating lunch",
    "a photo of a pikachu-like <|image|> creature",
    "A MAN <|image|> AND A WOMAN <|image|> AT A CAFE",
    "   a    man <|image|>    and  a   woman <|image|>   ",
    "a man <|image|>\nand a woman <|image|>.",
    "hello!!! a man <|image|>: smiling, and a woman <|image|>; laughing.",
    "a man <|image|>, a woman <|image|> and a child <|image|> on a beach",
    "a man <|image|> a woman <|image|> a girl <|image|> and a boy <|image|> on a bench",
    "a 3d man <|image|> next to a café owner <|image|>",
    "a portrait of (a man:1.2) <|image|> in the rain",
]


def test_oracle_tokenizers_agree(simple_tokenizer: SimpleTokenizer, official_tokenizer: CLIPTokenizer) -> None:
    """The generated vocab files reproduce open_clip's tokenization, so the oracle is the real CLIP BPE."""
    for prompt in PROMPTS:
        clean = prompt.replace(MARKER, "")
        assert official_tokenizer.encode(clean, add_special_tokens=False) == simple_tokenizer.encode(clean)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_official_tokenization(prompt: str, tokenize: Tokenize, official_tokenizer: CLIPTokenizer) -> None:
    clean_ids, positions = official_parse(official_tokenizer, prompt)
    parsed = parse_prompt(prompt, tokenize)
    assert parsed.positions == tuple(positions)
    assert parsed.token_ids == tuple(clean_ids)
    assert parsed.text == prompt.replace(MARKER, "")
    assert tuple(tokenize(parsed.text)) == parsed.token_ids
    assert parsed.num_subjects == prompt.count(MARKER)


def test_positions_by_hand(tokenize: Tokenize) -> None:
    parsed = parse_prompt("a man <|image|> and a woman <|image|> at a cafe", tokenize)
    # [BOS] a man and a woman at a cafe
    assert parsed.positions == (2, 5)
    assert parsed.words == ("man", "woman")
    assert parsed.text == "a man  and a woman  at a cafe"


@pytest.mark.parametrize("word", ["tyrannosaurus", "pikachu-like", "bartholomew"])
def test_multi_token_word_marks_its_last_token(word: str, tokenize: Tokenize) -> None:
    word_ids = list(tokenize(word))
    assert len(word_ids) >= 2, f"'{word}' should split into several BPE tokens for this test"
    parsed = parse_prompt(f"a photo of a {word} <|image|> outside", tokenize)
    (position,) = parsed.positions
    assert position == len(tokenize("a photo of a")) + len(word_ids)
    assert parsed.token_ids[position - 1] == word_ids[-1]  # token_ids has no BOS
    assert parsed.words == (word,)


def test_no_marker_is_plain_text(tokenize: Tokenize) -> None:
    parsed = parse_prompt("a man at a cafe, smiling", tokenize)
    assert parsed.positions == () and parsed.words == () and parsed.num_subjects == 0
    assert parsed.text == "a man at a cafe, smiling"
    assert parsed.token_ids == tuple(tokenize("a man at a cafe, smiling"))


def test_custom_marker(tokenize: Tokenize) -> None:
    parsed = parse_prompt("a man [img] and a woman [img]", tokenize, marker="[img]")
    assert parsed.positions == (2, 5) and parsed.text == "a man  and a woman "


def marked_at(position: int) -> str:
    """A prompt whose single marked word ('man', one token) is token ``position`` ('a' is one token)."""
    return "a " * (position - 1) + "man <|image|> at a cafe"


@pytest.mark.parametrize("max_position", [CHUNK_TOKENS, 10])
def test_last_allowed_position(max_position: int, tokenize: Tokenize) -> None:
    assert parse_prompt(marked_at(max_position), tokenize, max_position=max_position).positions == (max_position,)


def test_default_limits() -> None:
    assert (MARKER, MAX_SUBJECTS, CHUNK_TOKENS) == ("<|image|>", 4, 75)


def test_more_subjects_with_a_higher_limit(tokenize: Tokenize) -> None:
    prompt = " ".join(f"a {word} <|image|>" for word in ("man", "woman", "girl", "boy", "dog"))
    assert parse_prompt(prompt, tokenize, max_subjects=5).positions == (2, 4, 6, 8, 10)


FIVE = "a man <|image|> a woman <|image|> a girl <|image|> a boy <|image|> a dog <|image|>"
ERRORS = [
    pytest.param("<|image|> a man at a cafe", {}, r"#1 has no word before it; write it right after", id="marker-first"),
    pytest.param("   <|image|> a man", {}, r"#1 has no word before it", id="marker-after-spaces"),
    pytest.param("a man <|image|> <|image|> at a cafe", {}, r"#2 follows <\|image\|> #1 on the word 'man'", id="two-on-one"),
    pytest.param("a man <|image|><|image|>", {}, r"#2 follows .* #1 on the word 'man'; each subject needs", id="two-glued"),
    pytest.param("a man, <|image|>", {}, r"#1 follows ',' instead of a word", id="after-comma"),
    pytest.param("a man and <|image|>, <|image|>", {}, r"#2 follows ',' instead of a word", id="second-after-comma"),
    pytest.param(FIVE, {}, r"5 <\|image\|> markers but at most 4 subjects .* remove 1 marker", id="too-many"),
    pytest.param(FIVE, {"max_subjects": 2}, r"5 .* at most 2 subjects .* remove 3 marker", id="too-many-custom"),
    pytest.param(marked_at(CHUNK_TOKENS + 1), {}, r"'man' marked by .* #1 is token 76 .* within the first 75 tokens", id="past-75"),
    pytest.param(marked_at(11), {"max_position": 10}, r"is token 11 .* within the first 10 tokens", id="past-custom"),
    pytest.param("a man<|image|>woman at a cafe", {}, r"tokenizes differently once .* is removed", id="glued-both-sides"),
]


@pytest.mark.parametrize(("prompt", "options", "message"), ERRORS)
def test_errors(prompt: str, options: dict, message: str, tokenize: Tokenize) -> None:
    with pytest.raises(PromptError, match=message):
        parse_prompt(prompt, tokenize, **options)


def test_too_many_markers_is_checked_before_tokenizing() -> None:
    def refuse(text: str) -> list[int]:
        raise AssertionError("tokenize must not be called")

    with pytest.raises(PromptError, match=re.escape("at most 4 subjects")):
        parse_prompt(FIVE, refuse)


def test_errors_are_value_errors(tokenize: Tokenize) -> None:
    with pytest.raises(ValueError):
        parse_prompt("<|image|>", tokenize)


@pytest.mark.parametrize("container", [np.array, torch.tensor, tuple])
def test_token_id_containers(container, simple_tokenizer: SimpleTokenizer) -> None:
    parsed = parse_prompt("a man <|image|> at a cafe", lambda text: container(simple_tokenizer.encode(text)))
    assert parsed.positions == (2,)
    assert parsed.token_ids == tuple(simple_tokenizer.encode("a man  at a cafe"))
    assert all(type(token) is int for token in parsed.token_ids)


def test_a_bare_transformers_tokenizer_is_refused(official_tokenizer: CLIPTokenizer) -> None:
    """Calling it returns a BatchEncoding (with BOS/EOS), not ids: it must be wrapped."""
    with pytest.raises(TypeError, match=r"got BatchEncoding; wrap a transformers tokenizer as .*add_special_tokens=False"):
        parse_prompt("a man <|image|>", official_tokenizer)
