"""Parsing prompts that mark subjects with ``<|image|>`` after their class word.

``"a man <|image|> and a woman <|image|> at a cafe"`` has two subjects; the i-th marker
binds the i-th reference image to the token just before it ("man", "woman"). Following
FastComposer, the text between markers is tokenized piece by piece and the marked
position is the index of the last token before each marker, with BOS at index 0.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import PromptError

__all__ = ["MARKER", "MAX_SUBJECTS", "CHUNK_TOKENS", "Tokenize", "ParsedPrompt", "parse_prompt"]

MARKER = "<|image|>"
MAX_SUBJECTS = 4
CHUNK_TOKENS = 75  # tokens of one CLIP chunk between BOS and EOS

Tokenize = Callable[[str], Sequence[int]]
"""``tokenize(text) -> token ids`` without BOS, EOS or padding (ComfyUI's SD1 tokenizer,
a transformers ``CLIPTokenizer``, open_clip's ``SimpleTokenizer().encode`` ...)."""

_CLOSING = ")]}"  # ComfyUI weight syntax "(a man:1.2) <|image|>" ends in a bracket


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its markers removed.

    ``text``: the clean prompt; ``token_ids``: its tokens (no BOS/EOS);
    ``positions``: per marker, the index of the marked token in ``[BOS] + token_ids``;
    ``words``: the marked words, for messages.
    """

    text: str
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    words: tuple[str, ...]

    @property
    def num_subjects(self) -> int:
        return len(self.positions)


def _token_ids(tokenize: Tokenize, text: str) -> list[int]:
    """``tokenize(text)`` as plain ints; a tokenizer returning anything else is a wiring error."""
    ids = tokenize(text)
    try:
        return [operator.index(token) for token in ids]
    except TypeError:
        raise TypeError(
            f"tokenize must return a sequence of int token ids without BOS/EOS, got {type(ids).__name__}; wrap a "
            "transformers tokenizer as `lambda text: tokenizer(text, add_special_tokens=False)['input_ids']`"
        ) from None


def _marked_word(before: str) -> str:
    return before.rstrip().split()[-1] if before.strip() else ""


def parse_prompt(
    prompt: str,
    tokenize: Tokenize,
    marker: str = MARKER,
    max_subjects: int = MAX_SUBJECTS,
    max_position: int = CHUNK_TOKENS,
) -> ParsedPrompt:
    """Find every ``marker``; return the clean prompt and each marked token's position.

    Raises :class:`PromptError` for a marker with no word before it, two markers on one
    word, more than ``max_subjects`` markers, a marked word past token ``max_position``
    (the first CLIP chunk), or a marker glued to the next word so that the clean prompt
    tokenizes differently from the marked one.
    """
    pieces = prompt.split(marker)
    count = len(pieces) - 1
    if count > max_subjects:
        raise PromptError(
            f"the prompt has {count} {marker} markers but at most {max_subjects} subjects are supported; "
            f"remove {count - max_subjects} marker(s)"
        )
    token_ids: list[int] = []
    positions: list[int] = []
    words: list[str] = []
    for index, piece in enumerate(pieces):
        token_ids.extend(_token_ids(tokenize, piece))
        if index == count:
            break
        number = index + 1
        stripped = piece.rstrip()
        if not stripped:
            if index == 0:
                raise PromptError(
                    f"{marker} #{number} has no word before it; write it right after the subject's class word, "
                    f"e.g. 'a man {marker} at a cafe'"
                )
            raise PromptError(
                f"{marker} #{number} follows {marker} #{index} on the word '{words[-1]}'; "
                "each subject needs its own class word, e.g. 'a man <|image|> and a woman <|image|>'"
            )
        if not (stripped[-1].isalnum() or stripped[-1] in _CLOSING):
            raise PromptError(
                f"{marker} #{number} follows '{stripped[-1]}' instead of a word; "
                f"put it right after the subject's class word, e.g. 'a man {marker}'"
            )
        position = len(token_ids)  # BOS is at index 0
        if position == 0 or (positions and position == positions[-1]):
            raise PromptError(f"{marker} #{number} marks no token of its own; put it right after a class word")
        word = _marked_word(piece)
        if position > max_position:
            raise PromptError(
                f"the word '{word}' marked by {marker} #{number} is token {position} of the prompt, but marked "
                f"words must be within the first {max_position} tokens; move the subject earlier in the prompt"
            )
        positions.append(position)
        words.append(word)
    text = "".join(pieces)
    if count and _token_ids(tokenize, text) != token_ids:
        raise PromptError(
            f"the prompt tokenizes differently once {marker} is removed (a marker glued to the next word, "
            f"or inside weight brackets); put a space after each {marker} and keep it outside brackets, "
            f"e.g. '(a man:1.2) {marker}'"
        )
    return ParsedPrompt(text, tuple(token_ids), tuple(positions), tuple(words))
