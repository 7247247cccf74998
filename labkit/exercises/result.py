"""What a checker returns: :class:`CheckResult` (``passed``, ``feedback``) and its findings.

A checker runs the learner's code against ground truth and collects one
:class:`Finding` per requirement: passed, failed (with what was measured, what is
wrong, and a hint toward the fix), skipped, or a note. The result renders as text
(``print(result)``), as Markdown and as HTML (Jupyter shows it on its own).

Notes:

1. Three states, not two. ``attempted=False`` means the learner has not written the
   code yet (it raised ``NotImplementedError``, returned ``None`` or ``...``): the
   result says "not done yet" with guidance, ``passed`` is False, and nothing raises,
   so a notebook whose exercises are unfinished still runs top to bottom.
2. ``feedback`` is plain text built from the findings, so ``result.feedback`` can be
   asserted on in tests and read in a terminal; the HTML form is the same content.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckResult", "Finding"]

_MARK = {"pass": "✔", "fail": "✘", "skip": "–", "note": "•", "todo": "…"}
_COLOR = {
    "pass": "#1a7f37",
    "fail": "#cf222e",
    "skip": "#6e7781",
    "note": "#0969da",
    "todo": "#9a6700",
}


@dataclass
class Finding:
    """The verdict on one requirement."""

    #: Short name of the requirement, e.g. "TTFT is measured to the first text".
    requirement: str
    #: "pass", "fail", "skip" (could not be checked), "note" (information) or "todo".
    status: str
    #: What was measured and, for a failure, what is wrong.
    detail: str = ""
    #: For a failure: what to change.
    hint: str = ""

    def text(self) -> str:
        out = f"{_MARK.get(self.status, '?')} {self.requirement}"
        if self.detail:
            out += f": {self.detail}"
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out


@dataclass(repr=False)
class CheckResult:
    """The outcome of one checker: ``passed`` and human-readable ``feedback``."""

    #: True when no requirement failed or is unfinished (skipped ones are listed as such).
    passed: bool
    #: What was measured against the truth, what is wrong, and hints (plain text).
    feedback: str
    #: The checker's name, e.g. "check_ttft".
    name: str = ""
    #: False when the learner's code is not written yet (see note 1).
    attempted: bool = True
    #: One verdict per requirement.
    findings: list[Finding] = field(default_factory=list)
    #: Numbers measured on the way (for tables and tests).
    measured: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def verdict(self) -> str:
        if not self.attempted:
            return "not done yet"
        return "passed" if self.passed else "not yet right"

    def failed(self) -> list[Finding]:
        """The findings that failed."""
        return [f for f in self.findings if f.status == "fail"]

    def __str__(self) -> str:
        head = f"{self.name}: {self.verdict}" if self.name else self.verdict
        return f"{head}\n{self.feedback}" if self.feedback else head

    def __repr__(self) -> str:
        return str(self)

    def _repr_markdown_(self) -> str:
        lines = [f"**{html.escape(self.name)}: {self.verdict}**", ""]
        if not self.findings:
            lines.append(html.escape(self.feedback))
        for f in self.findings:
            line = f"- {_MARK.get(f.status, '?')} **{html.escape(f.requirement)}**"
            if f.detail:
                line += f": {html.escape(f.detail)}"
            if f.hint:
                line += f"  \n  *hint:* {html.escape(f.hint)}"
            lines.append(line)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        color = "#1a7f37" if self.passed else ("#9a6700" if not self.attempted else "#cf222e")
        rows = []
        for f in self.findings:
            hint = f"<br><i>hint:</i> {html.escape(f.hint)}" if f.hint else ""
            rows.append(
                f"<li style='list-style:none'><span style='color:{_COLOR.get(f.status, '#000')}'>"
                f"{_MARK.get(f.status, '?')}</span> <b>{html.escape(f.requirement)}</b>"
                f"{': ' + html.escape(f.detail) if f.detail else ''}{hint}</li>"
            )
        body = (
            f"<ul style='padding-left:0.5em;margin:0.3em 0'>{''.join(rows)}</ul>"
            if rows
            else f"<pre style='white-space:pre-wrap'>{html.escape(self.feedback)}</pre>"
        )
        return (
            f"<div style='border-left:4px solid {color};padding:0.2em 0.8em'>"
            f"<b>{html.escape(self.name)}</b>: <span style='color:{color}'><b>{self.verdict}</b></span>"
            f"{body}</div>"
        )


class Report:
    """Collects findings while a checker runs; :meth:`result` makes the CheckResult."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.findings: list[Finding] = []
        self.measured: dict[str, Any] = {}
        self.attempted = True

    def add(self, requirement: str, status: str, detail: str = "", hint: str = "") -> Finding:
        finding = Finding(requirement, status, detail, hint)
        self.findings.append(finding)
        return finding

    def ok(self, requirement: str, detail: str = "") -> None:
        self.add(requirement, "pass", detail)

    def fail(self, requirement: str, detail: str, hint: str = "") -> None:
        self.add(requirement, "fail", detail, hint)

    def skip(self, requirement: str, detail: str) -> None:
        self.add(requirement, "skip", detail)

    def note(self, requirement: str, detail: str) -> None:
        self.add(requirement, "note", detail)

    def todo(self, requirement: str, detail: str, hint: str = "") -> None:
        self.add(requirement, "todo", detail, hint)

    def check(self, cond: bool, requirement: str, good: str, bad: str, hint: str = "") -> bool:
        if cond:
            self.ok(requirement, good)
        else:
            self.fail(requirement, bad, hint)
        return cond

    def result(self) -> CheckResult:
        statuses = {f.status for f in self.findings}
        attempted = self.attempted and bool(statuses & {"pass", "fail"})
        passed = attempted and not statuses & {"fail", "todo"}
        return CheckResult(
            passed=passed,
            feedback="\n".join(f.text() for f in self.findings),
            name=self.name,
            attempted=attempted,
            findings=list(self.findings),
            measured=dict(self.measured),
        )


def not_done(name: str, what: str, guidance: str) -> CheckResult:
    """The result for code that is not written yet (note 1)."""
    finding = Finding(what, "todo", "not done yet", guidance)
    return CheckResult(
        passed=False,
        feedback=finding.text(),
        name=name,
        attempted=False,
        findings=[finding],
    )
