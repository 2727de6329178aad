"""Incremental detokenization with stop strings.

In: the token ids a request gains each step. Out: the text delta to emit and, when a stop
string matched, that string (the engine then finishes the request). A few tokens of context
are re-decoded each step (the prefix/read-offset scheme), so the cost per step is constant
and a multi-byte character split across tokens is only emitted once it is complete. While
streaming, the last `max(len(stop)) - 1` characters are held back so that a stop string
about to match is never shown to the client.

With a Rust-backed ("fast") HF tokenizer that does no clean-up of spaces, the per-token
work is `tokenizers.decoders.DecodeStream`, primed with the same prompt context: one call
into Rust per token instead of two Python-level decodes.
"""

from __future__ import annotations

# Prompt tokens re-decoded as context for the first output tokens (leading-space rules).
_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Per-request state; `add_tokens` returns the newly visible text."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], *,
                 skip_special_tokens: bool = True,
                 stop: tuple[str, ...] = (),
                 include_stop_str_in_output: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._hold_back = 0 if include_stop_str_in_output else max(
            (len(s) for s in self._stop), default=1) - 1
        self._pending = 0  # ids at the end of _ids the DecodeStream has not emitted yet
        self._stream = self._make_stream()
        self.output_text = ""      # all text decoded so far (trimmed at a matched stop string)
        self._num_emitted = 0      # characters of output_text already returned
        self.stop_string: str | None = None

    def _make_stream(self):
        """A DecodeStream primed with the prompt context, or None (the Python path)."""
        backend = getattr(self._tokenizer, "_tokenizer", None)
        if backend is None or getattr(self._tokenizer, "clean_up_tokenization_spaces", True):
            return None
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        if not isinstance(backend, Tokenizer) or _INCOMPLETE in self._decode(self._ids):
            return None  # a context cut inside a character would leak its bytes: Python path
        stream = DecodeStream(skip_special_tokens=self._skip_special)
        for token_id in self._ids:  # the context: its text is the prompt's, never emitted
            stream.step(backend, token_id)
        return stream

    def _stream_delta(self, token_id: int) -> str:
        """The DecodeStream path of `_decode_delta` for one new token."""
        self._ids.append(token_id)
        chunk = self._stream.step(self._tokenizer._tokenizer, token_id)
        if chunk is None:  # an incomplete character: wait for the bytes that finish it
            self._pending += 1
            return ""
        self._pending = 0
        return chunk

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_delta(self, token_id: int | None, *, force: bool = False) -> str:
        """Text completed by `token_id`; with `force`, also a dangling partial character
        (the request has ended: what the bytes decode to is final)."""
        if token_id is not None and self._stream is not None:
            return self._stream_delta(token_id)
        if token_id is not None:
            self._ids.append(token_id)
        elif self._stream is not None:  # the end: decode what the stream still holds
            if not self._pending:
                return ""
            self._read_offset = len(self._ids) - self._pending
            self._prefix_offset = max(0, self._read_offset - _CONTEXT_TOKENS)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_INCOMPLETE) and not force):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _check_stop(self, num_new_chars: int) -> bool:
        """Looks for a stop string in the new text (and the tail it may straddle)."""
        if not self._stop:
            return False
        max_len = max(len(s) for s in self._stop)
        start = max(0, len(self.output_text) - num_new_chars - max_len + 1)
        best = None
        for stop in self._stop:
            index = self.output_text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        end = index + len(stop) if self._include_stop else index
        self.output_text = self.output_text[:end]
        self.stop_string = stop
        return True

    def add_tokens(self, token_ids: list[int], *, finished: bool = False) -> str:
        """Appends tokens; returns the text delta now safe to show the client.

        Tokens after a matched stop string are ignored.
        """
        finished = finished or self.stop_string is not None
        for token_id in token_ids if self.stop_string is None else ():
            delta = self._decode_delta(token_id)
            self.output_text += delta
            if delta and self._check_stop(len(delta)):
                finished = True
                break
        if finished and self.stop_string is None:
            tail = self._decode_delta(None, force=True)
            self.output_text += tail
            if tail:
                self._check_stop(len(tail))
        visible = len(self.output_text) if finished else max(
            self._num_emitted, len(self.output_text) - self._hold_back)
        out = self.output_text[self._num_emitted:visible]
        self._num_emitted = visible
        return out

    def flush(self) -> str:
        """The held-back text, once the request has finished for another reason."""
        return self.add_tokens([], finished=True)
