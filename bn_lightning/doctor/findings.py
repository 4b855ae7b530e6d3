"""What the doctor reports: a :class:`Finding` per mistake and layer, with codes that never change meaning.

Scripts and users match on the codes (``ignore=("BN005",)``): a new check gets the next free code, and a
retired one keeps its number unused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CODES", "DOCS", "SEVERITIES", "Finding", "finding"]

SEVERITIES = ("error", "warning", "info")  # most serious first
DOCS = "docs/doctor.md"

# code: (default severity, title); the title is the heading of the code's section in docs/doctor.md.
CODES: dict[str, tuple[str, str]] = {
    "BN001": ("warning", "evaluation in training mode"),
    "BN002": ("error", "running statistics with autograd history"),
    "BN003": ("warning", "statistics kept as plain tensor attributes"),
    "BN004": ("warning", "batches too small for batch statistics"),
    "BN005": ("info", "a bias cancelled by BN"),
    "BN006": ("warning", "frozen BN still updating its statistics"),
    "BN007": ("warning", "a momentum in the other convention"),
    "BN008": ("warning", "lagging running statistics"),
    "BN009": ("warning", "small per-process batches without synchronized BN"),
    "BN010": ("info", "weight decay on gamma and beta"),
    "BN011": ("warning", "running buffers that are no longer tracked"),
    "BN012": ("warning", "a cumulative average as running statistics"),
    "BN013": ("warning", "running statistics updated in evaluation mode"),
    "BN014": ("warning", "dropout right before BN"),
}


def anchor(code: str) -> str:
    """The anchor a code host gives the heading ``code: title`` of docs/doctor.md."""
    heading = f"{code}: {CODES[code][1]}".lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


@dataclass(frozen=True)
class Finding:
    """One mistake in one layer (``layer`` is the qualified module name, ``""`` for the model as a whole):
    ``message`` says what is wrong, ``fix`` how to fix it, ``link`` where this project measured its cost."""

    code: str
    severity: str
    layer: str
    message: str
    fix: str
    link: str

    def __str__(self) -> str:
        where = f" {self.layer}" if self.layer else ""
        return f"{self.code} ({self.severity}){where}: {self.message} Fix: {self.fix} See {self.link}"


def finding(code: str, layer: str, message: str, fix: str, severity: str | None = None) -> Finding:
    """A :class:`Finding` of ``code`` with its default severity (or ``severity``) and its docs link."""
    severity = severity or CODES[code][0]
    assert severity in SEVERITIES, severity
    return Finding(code, severity, layer, message, fix, f"{DOCS}#{anchor(code)}")
