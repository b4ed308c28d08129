"""Live terminal output while monitoring: each token on a background coloured by its projection.

Blue is negative, red positive; the scale is symmetric around 0 and grows with the largest
|projection| seen so far, since the final range is unknown while the model is still writing.
"""

from __future__ import annotations

import sys

# xterm-256 backgrounds, weakest to strongest.
_REDS = (224, 217, 210, 203, 196)
_BLUES = (195, 153, 111, 69, 27)
_RESET = "\x1b[0m"


def colour_code(value: float, scale: float) -> int | None:
    """The 256-colour background for `value` on a scale of +-`scale` (None when near 0)."""
    if scale <= 0:
        return None
    x = max(-1.0, min(1.0, value / scale))
    level = min(len(_REDS), int(abs(x) * (len(_REDS) + 1)))
    if level == 0:
        return None
    return (_REDS if x > 0 else _BLUES)[level - 1]


def paint(piece: str, value: float, scale: float) -> str:
    """`piece` wrapped in ANSI colours (black text on the projection's background)."""
    code = colour_code(value, scale)
    if code is None:
        return piece
    # Colour each line separately so a newline never drags the background across the terminal.
    return "\n".join(f"\x1b[30;48;5;{code}m{p}{_RESET}" if p else "" for p in piece.split("\n"))


class LivePrinter:
    """An on_token callback that prints tokens as they come, coloured when `stream` is a TTY.

    value_of maps a token's hidden rows [len(rows), hidden] to the number that sets its colour.
    """

    def __init__(self, value_of, *, stream=None, colour: bool | None = None):
        self.stream = stream or sys.stdout
        self.colour = _isatty(self.stream) if colour is None else colour
        self.value_of = value_of
        self.scale = 0.0

    def __call__(self, i: int, piece: str, hidden_i) -> None:
        if not self.colour:
            self._write(piece)
            return
        value = float(self.value_of(hidden_i))
        self.scale = max(self.scale, abs(value))
        self._write(paint(piece, value, self.scale))

    def line(self, text: str = "") -> None:
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
