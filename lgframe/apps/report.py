"""What the applications' markdown reports share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(head: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """The lines of a markdown table: a header, its rule and one line per row."""
    return ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def save_figure(fig, path, dpi: float | None = None) -> None:
    """A matplotlib figure as a PNG, laid out tight, written atomically, then closed
    (`dpi`: matplotlib's savefig.dpi when None)."""
    import matplotlib.pyplot as plt  # deferred: matplotlib (plots only)

    from lgframe.formats.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
