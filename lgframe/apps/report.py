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


def source_commit(root, paths: Sequence[str] = (), missing: str | None = "unknown", timeout: float = 30) -> str | None:
    """The git commit a result was measured at: `git rev-parse --short HEAD` in the checkout
    `root`, with "+changes" when any of `paths` (relative to it) differ from that commit;
    `missing` when there is no git or no commit (a plain install)."""
    import subprocess  # deferred: only benchmarks record their commit

    run = {"cwd": root, "capture_output": True, "text": True, "timeout": timeout}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *paths], **run).stdout if paths else ""
    except (OSError, subprocess.SubprocessError):
        return missing
    return head + ("+changes" if status.strip() else "") if head else missing
