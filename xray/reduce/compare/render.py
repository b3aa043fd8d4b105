"""A comparison as text or markdown: by default what changed (the metric rows marked
``changed``, flips, failures, models and detectors missing or new), with one line counting the
metric rows that did not; all_rows lists every row."""
from __future__ import annotations

import math
from typing import Any

from xray.reduce.formatting import fmt


def _delta(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):+.4f}"


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def render(result: Any, markdown: bool, all_rows: bool = False) -> str:
    """A `Comparison` (not imported: it imports this module) as text or markdown; only the
    metric rows marked ``changed`` unless all_rows."""
    h = (lambda t: f"\n## {t}\n") if markdown else (lambda t: f"\n{t}\n{'-' * len(t)}")
    verdict = ("REGRESSION" if result.regression else "no regression (within tolerance)")
    out = [("# " if markdown else "") + f"xray compare: {verdict}",
           f"A (baseline): {result.a}", f"B (new):      {result.b}"]
    if markdown:
        out[1:] = [f"- A (baseline): `{result.a}`", f"- B (new): `{result.b}`"]
    if result.regressions:
        out.append(h("Regressions"))
        out += [("- " if markdown else "  ") + r for r in result.regressions]
    shown = result.metrics if all_rows else [m for m in result.metrics if m["changed"]]
    out.append(h("Metrics per detector x group (delta = B - A)"
                 + ("" if all_rows else ": what changed")))
    rows = [[m["detector"], m["group"], m["metric"], fmt(m["a"], 4), fmt(m["b"], 4),
             _delta(m["delta"]),
             fmt(m["tolerance"], 3) if m["tolerance"] is not None else "-", m["status"],
             m.get("note") or ""] for m in shown]
    if rows:
        out.append(_table(["detector", "group", "metric", "A", "B", "delta", "tolerance",
                           "status", "note"], rows, markdown))
    elif not result.metrics:
        out.append("(no common detector)")
    if not all_rows:
        same = len(result.metrics) - len(shown)
        out.append(("- " if markdown else "") + f"{same} of {len(result.metrics)} metric rows "
                   "unchanged within their tolerance (--all lists every row)")
    out.append(h(f"Flipped verdicts ({len(result.flips)}; both sides at the baseline's "
                 "threshold)"))
    rows = [[f["detector"], f["model_id"], f["truth"], f["verdict_a"], f["verdict_b"],
             fmt(f["score_a"], 4), fmt(f["score_b"], 4), f["effect"]] for f in result.flips]
    out.append(_table(["detector", "model", "truth", "verdict A", "verdict B", "score A",
                       "score B", "effect"], rows, markdown) if rows else "none")
    for title, items in (("New errors / timeouts", result.new_failures),
                         ("Fixed errors / timeouts", result.fixed_failures)):
        out.append(h(f"{title} ({len(items)})"))
        rows = [[f["detector"], f["model_id"], f["status"], f["error"]] for f in items]
        out.append(_table(["detector", "model", "status", "error"], rows, markdown)
                   if rows else "none")
    out.append(h("Models and detectors"))
    lists = (("models missing from B", result.missing_models),
             ("models new in B", result.new_models),
             ("detectors missing from B", result.detectors_missing),
             ("detectors new in B", result.detectors_new))
    for label, items in lists:
        if items or all_rows:
            names = ", ".join(items[:50]) + (f" and {len(items) - 50} more"
                                             if len(items) > 50 else "")
            out.append(("- " if markdown else "  ") + f"{label}: {names or 'none'}")
    if not all_rows and not any(items for _, items in lists):
        out.append(("- " if markdown else "  ") + "none missing from B or new in B")
    out.append(h("What differs between the runs"))
    if result.changes:
        rows = [[c["what"], c["a"], c["b"], c["detail"]] for c in result.changes]
        out.append(_table(["what", "A", "B", "detail"], rows, markdown))
    else:
        out.append("nothing (same detector versions, configurations, code and manifest)")
    for i in result.ignored:
        out.append(("- " if markdown else "  ") + f"ignored on side {i['side']}: {i['detector']} "
                   f"{i['detector_version']} [{i['config_hash']}] ({i['reason']})")
    return "\n".join(out) + "\n"
