"""RewriteReport: one record per site found, for humans (a table) and tools (a dict)."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Site", "RewriteReport", "APPLIED", "REFUSED", "ROLLED_BACK", "plain_text"]

APPLIED, REFUSED, ROLLED_BACK = "applied", "refused", "rolled_back"


@dataclass(eq=False)
class Site:
    location: str  # module path of the site in the user's model
    kind: str  # what was found: attention, layer_norm, rms_norm, residual_stream, ...
    action: str  # what it became (or would have): canonical_attention, rms_norm, ...
    status: str = APPLIED
    reason: str | None = None  # why refused / rolled back
    error: dict[str, float] = field(default_factory=dict)  # measured error of this site
    pass_name: str = ""
    node: str = ""  # graph node name, for debugging
    params: dict[str, Any] = field(default_factory=dict)  # the parameters an approximate rewrite used

    def refuse(self, reason: str) -> "Site":
        self.status, self.reason = REFUSED, reason
        return self

    def roll_back(self, reason: str) -> "Site":
        self.status, self.reason = ROLLED_BACK, reason
        return self


@dataclass
class RewriteReport:
    sites: list[Site] = field(default_factory=list)
    capture: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)  # pass name -> sites changed
    verification: dict[str, Any] = field(default_factory=dict)

    def add(self, site: Site) -> Site:
        self.sites.append(site)
        return site

    def count(self, kind: str | None = None, status: str | None = APPLIED, action: str | None = None) -> int:
        return sum(
            1 for s in self.sites
            if (kind is None or s.kind == kind) and (status is None or s.status == status)
            and (action is None or s.action == action)
        )

    def select(self, **fields) -> list[Site]:
        return [s for s in self.sites if all(getattr(s, k) == v for k, v in fields.items())]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [asdict(s) for s in self.sites],
            "capture": self.capture,
            "passes": self.passes,
            "verification": self.verification,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def table(self):
        from rich.table import Table

        t = Table(title="rewriter report", show_lines=False)
        for col in ("location", "kind", "action", "status", "error", "reason"):
            t.add_column(col, overflow="fold")
        style = {APPLIED: "green", REFUSED: "yellow", ROLLED_BACK: "red"}
        for s in self.sites:
            err = f"{s.error['rel_l2']:.1e}" if "rel_l2" in s.error else ""
            t.add_row(s.location, s.kind, s.action, f"[{style.get(s.status, '')}]{s.status}", err, s.reason or "")
        return t

    def summary(self) -> str:
        by = {}
        for s in self.sites:
            by.setdefault((s.kind, s.action), {}).setdefault(s.status, 0)
            by[(s.kind, s.action)][s.status] += 1
        parts = [f"{k[0]}→{k[1]}: " + ", ".join(f"{n} {st}" for st, n in v.items()) for k, v in by.items()]
        out = self.verification.get("output")
        if out and "rel_l2" in out:
            parts.append(f"exact rewrites: output rel_l2 {out['rel_l2']:.1e}")
        approx = self.verification.get("approximate_output")
        if approx and "rel_l2" in approx:
            parts.append(f"with approximate attention: output rel_l2 {approx['rel_l2']:.1e}")
        parts.extend(self.capture.get("notes", []))
        return "; ".join(parts) or "no sites found"

    def __str__(self) -> str:
        return plain_text(self.table(), self.summary())

    def __rich__(self):
        return self.table()


def plain_text(*renderables) -> str:
    """Rich renderables (a table, a summary line) as plain text, for `str(report)`."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=140, force_terminal=False, color_system=None)
    for r in renderables:
        console.print(r)
    return buf.getvalue()
