"""Stop strings over streamed text: release text only when no stop string can still
begin inside it, and cut the output right before the first stop string."""

from __future__ import annotations

from dataclasses import dataclass

MAX_NUM_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True, slots=True)
class StopResult:
    text: str  # text that is final: no stop string can start inside it
    is_stopped: bool  # a stop string matched; ``text`` ends right before it


def validate_stop_strings(stop: list[str]) -> str | None:
    """An error message naming the bad field, or None when the stop strings are usable."""
    if len(stop) > MAX_NUM_STOP_STRINGS:
        return f"params.stop: at most {MAX_NUM_STOP_STRINGS} stop strings, got {len(stop)}"
    for i, s in enumerate(stop):
        if not s:
            return f"params.stop[{i}]: must not be empty"
        if len(s) > MAX_STOP_STRING_CHARS:
            return f"params.stop[{i}]: longer than {MAX_STOP_STRING_CHARS} characters"
    return None


class StopMatcher:
    """Feeds text chunks; holds back the longest tail that could still grow into a stop
    string, so the client never sees text that a later chunk would cut."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = list(stop)
        self._held = ""
        self._is_stopped = False

    def feed(self, text: str) -> StopResult:
        if self._is_stopped:
            return StopResult("", True)
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self._is_stopped = True
            return StopResult(buf[:cut], True)
        keep = self._longest_partial_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return StopResult(buf[:len(buf) - keep], False)

    def flush(self) -> str:
        """The generation ended without a stop string: release what was held back."""
        held, self._held = self._held, ""
        return "" if self._is_stopped else held

    def _longest_partial_tail(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
