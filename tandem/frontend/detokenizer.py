"""Token ids to text, one delta at a time, and stop strings that never leak.

Decoding each new token on its own is wrong in two ways: a multi-byte UTF-8 character split
over several byte-level tokens decodes to U+FFFD halves, and SentencePiece tokenizers drop or
add spaces depending on what precedes a token. So, as vLLM does, we decode a short window of
previous tokens plus the new ones and emit only the part of the text past the window's
previously decoded text, and only once that text no longer ends in an incomplete character.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context, so the first generated token gets the spacing it would
# have inside the full text.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a sequence's generated token ids into text deltas.

    The concatenation of every `push` and the final `flush` equals decoding the generated
    tokens after the prompt's tail, and no delta ends in half a character: trailing U+FFFD
    (bytes of a character still incomplete) is held back until more tokens settle it. Byte-level
    BPE merges across character boundaries, so a character can stay incomplete over many
    tokens; the text before it is released meanwhile.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # ids[prefix_offset:read_offset] is context whose text is settled ("prefix text");
        # ids[read_offset:] are newer tokens, of whose text `_released` chars are emitted.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_len: int | None = None
        self._released = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
        )

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text that is now stable (maybe empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back; call once when the sequence ends."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        if self._prefix_len is None:
            self._prefix_len = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        new_text = self._decode(self._ids[self._prefix_offset :])
        stable = new_text if final else new_text.rstrip(REPLACEMENT)
        start = self._prefix_len + self._released
        out = stable[start:] if len(stable) > start else ""
        if len(stable) == len(new_text):
            # Everything decoded cleanly: slide the window so that decoding stays O(1) tokens.
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._prefix_len, self._released = None, 0
        else:
            self._released += len(out)
        return out


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back anything that might start one.

    Text is released only once no stop string can begin inside it: the longest suffix that is
    a prefix of some stop string stays in the buffer until the next delta settles it. When a
    stop string appears, the text before its earliest occurrence is released and the rest,
    the stop string included, is dropped.
    """

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._buffer = ""
        self.stopped = False
        self.matched: str | None = None

    @property
    def active(self) -> bool:
        return bool(self._stop)

    def push(self, text: str) -> str:
        """Add text; return the part that can be released now."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        self._buffer += text
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = self._buffer.find(s)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            out = self._buffer[: best[0]]
            self._buffer = ""
            self.stopped = True
            self.matched = best[1]
            return out
        hold = self._held_suffix_len()
        cut = len(self._buffer) - hold
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        """Release the held-back text: the sequence ended without completing a stop string."""
        out, self._buffer = self._buffer, ""
        return "" if self.stopped else out

    def _held_suffix_len(self) -> int:
        buf = self._buffer
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest
