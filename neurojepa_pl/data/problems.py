"""Problems found in a manifest or its scans, the errors that carry them, the validation report, the problem table."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from neurojepa_pl.errors import UserValueError

log = logging.getLogger(__name__)

TABLE_TEXT_WIDTH = 56
"""Width of the wrapped ``reason`` and ``fix`` columns of :func:`problem_table` (the path is never wrapped)."""


# ----------------------------------------------------------------------------------------------------------------------
# Problems and reports
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One finding of :func:`validate_manifest`.

    Attributes:
        kind: short machine-readable category, e.g. ``missing_file`` or ``leakage``.
        row: DataFrame index of the offending row (0-based data row), or ``None`` for manifest-wide problems.
        path: the scan path concerned, if any.
        message: what is wrong (expected vs found).
        fix: how to fix it.
        severity: ``error`` (blocks training) or ``warning``.
    """

    kind: str
    row: int | None
    path: str | None
    message: str
    fix: str
    severity: Literal["error", "warning"] = "error"

    def format(self, source: str | None = None) -> str:
        where = []
        if self.row is not None:
            # Data row i sits on CSV line i + 2 (line 1 is the header).
            where.append(f"row {self.row} (line {self.row + 2}{' of ' + source if source else ''})")
        if self.path:
            where.append(f"path {self.path}")
        head = f"[{self.severity}] {self.kind}" + (": " + ", ".join(where) if where else "")
        return f"{head}\n    {self.message}\n    fix: {self.fix}"


class ManifestError(UserValueError):
    """Raised when a manifest has errors; the message is the full report (every problem with its row and fix).

    A :class:`neurojepa_pl.errors.UserError`: ``neurojepa`` prints it without a traceback and exits with status 2.
    """

    def __init__(self, report: ValidationReport):
        source = report.source or "the manifest"
        super().__init__(
            str(report),
            f"correct the rows above in {source} (`neurojepa validate-manifest {source}` checks it, reading every "
            "file), then rerun.",
        )
        self.report = report

    def __reduce__(self):  # rebuilt from the report (the base class pickles message and fix)
        return (type(self), (self.report,))


def problem_table(problems: Sequence[Problem]) -> str:
    """The problems as a plain-text (ASCII) table with the columns ``path``, ``reason`` and ``fix``.

    ``reason`` is ``"<kind>: <message>"``; long reasons and fixes wrap inside their column, paths never wrap (so that
    they can be copied). Rendered with rich, with no colour and no terminal codes, so the text is the same in a log file
    as on a terminal.
    """
    # rich is imported here: it is only needed when there is something to report.
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.ASCII2, show_edge=False, pad_edge=False)
    table.add_column("path", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    table.add_column("fix", overflow="fold", ratio=1)
    for p in problems:
        table.add_row(p.path or "-", f"{p.kind}: {p.message}", p.fix)
    path_width = max((len(p.path or "-") for p in problems), default=4)
    buffer = io.StringIO()
    console = Console(file=buffer, width=path_width + 2 * TABLE_TEXT_WIDTH + 6, color_system=None, highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


@dataclass
class ValidationReport:
    """All problems found in one manifest.

    Attributes:
        problems: every finding, errors and warnings, in check order.
        source: the manifest path (for messages), if known.
        n_rows: number of data rows checked.
        form: ``per_scan`` or ``paired`` (``None`` if the form could not be recognised).
    """

    problems: list[Problem] = field(default_factory=list)
    source: str | None = None
    n_rows: int = 0
    form: str | None = None
    max_listed_per_kind: int = 20

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings are allowed)."""
        return not self.errors

    def kinds(self) -> dict[str, int]:
        """Number of problems of each kind."""
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def raise_if_errors(self) -> None:
        """Raise :class:`ManifestError` (whose message is this report) if there is any error."""
        if not self.ok:
            raise ManifestError(self)

    def __str__(self) -> str:
        name = self.source or "manifest"
        lines = [
            f"{name}: {self.n_rows} rows ({self.form or 'unrecognised form'}), "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        ]
        shown: dict[str, int] = {}
        for p in self.problems:
            shown[p.kind] = shown.get(p.kind, 0) + 1
            if shown[p.kind] <= self.max_listed_per_kind:
                lines.append(p.format(Path(self.source).name if self.source else None))
        for kind, count in self.kinds().items():
            if count > self.max_listed_per_kind:
                lines.append(f"... and {count - self.max_listed_per_kind} more problem(s) of kind {kind!r}")
        if self.ok:
            lines.append("OK: no errors.")
        return "\n".join(lines)
