"""Layer rows (docs/CONVENTIONS.md): row 0 is the embedding output, row L >= 1 the output of
block L-1, row n_layers the last hidden state with the final norm applied."""

from pertoken.errors import PertokenError


def block_of_row(row: int, n_layers: int) -> int:
    """The decoder block whose output is row `row` (steering at row L acts on block L-1)."""
    check_steer_row(row, n_layers)
    return row - 1


def check_steer_row(row: int, n_layers: int) -> None:
    if not 1 <= row <= n_layers:
        raise PertokenError(
            f"layer {row} is outside 1..{n_layers}: rows are 1-based block outputs "
            f"(row 0 is the embedding and cannot be steered); pick a layer in 1..{n_layers}"
        )


def check_capture_rows(rows: list[int], n_layers: int) -> None:
    bad = [r for r in rows if not 0 <= r <= n_layers]
    if bad:
        raise PertokenError(f"layers {bad} are outside 0..{n_layers} for this model")


def parse_layers(text: str) -> list[int]:
    """'12,16,20' -> [12, 16, 20]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PertokenError(
            f"could not read layers {text!r}: give integers like 12,16,20"
        ) from None
