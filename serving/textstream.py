"""Turning a token stream into text that is safe to send: UTF-8-whole pieces and stop-string holdback.

Both are pure and per request, so they are tested on their own and shared by the server and
`orlik chat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# How many prompt tokens seed the detokenizer window, so the first generated token keeps the
# leading space a SentencePiece decoder would drop at the start of a string.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text deltas from growing token ids, never splitting a multi-byte UTF-8 character.

    Decodes a small sliding window (prefix + new tokens) and emits what the new tokens added, the
    way vLLM and TGI do: it works for any tokenizer (SentencePiece, byte-level BPE) through the
    runtime's own detokenize, and holds back while the window ends in an incomplete character.
    """

    def __init__(self, detokenize: Callable[[list[int]], str], prompt: Sequence[int]) -> None:
        self.detok = detokenize
        self.ids: list[int] = list(prompt[-_CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this are already emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.detok(self.ids[self.prefix : self.read])
        after = self.detok(self.ids[self.prefix :])
        if after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the bytes that finish it
        # If the decoder rewrote the prefix (rare), the tail past its old length is still the news.
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever is pending, replacement characters included."""
        if self.read == len(self.ids):
            return ""
        before = self.detok(self.ids[self.prefix : self.read])
        after = self.detok(self.ids[self.prefix :])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


class StopBuffer:
    """Holds back any tail of the text that could still become a stop string.

    push() returns the text that is safe to send now; once a stop string appears, `stopped` is set
    and nothing from the stop string onwards is ever returned, even when it spanned several tokens.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped: str | None = None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, text: str) -> str:
        if self.stopped is not None:
            return ""
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut, self.stopped = i, s
        if cut >= 0:
            self.pending = ""
            return buf[:cut]
        keep = self._held(buf)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Generation ended without a stop string: the held-back text is plain text after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
