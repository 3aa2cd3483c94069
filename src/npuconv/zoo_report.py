"""Zoo reports for CI: merge the reports of ``--shard`` jobs, and render a report as JUnit XML or Markdown.

All three work on the JSON report of :func:`npuconv.zoo.run_zoo` (schema in docs/ci.md) and
nothing else, so they run on a machine that only has the reports (a CI summary job).

- :func:`merge_reports` — one report from several: entries of every shard in zoo-file order,
  totals recomputed, ``exit_code`` the worst. A report that is only ``{"ok": false, "error",
  "exit_code"}`` (its zoo file was invalid, nothing ran) makes the merged report fail with that
  error listed in ``errors``.
- :func:`junit_xml` — one ``<testcase>`` per entry (classname ``npuconv.zoo``, name = entry
  name, time = its seconds): ``failed`` → ``<error>``, ``verify-failed`` → ``<failure>``,
  ``not-run`` → ``<skipped>``; ``converted`` / ``skipped`` (up to date) / ``would-*`` pass.
  ``<system-out>`` carries the reason, the verify summary and the warnings.
- :func:`markdown_summary` — a status line and a table (name, target, status, time, verify,
  detail), then the warnings: for a pull-request comment or ``$GITHUB_STEP_SUMMARY``.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

from npuconv.errors import InputError
from npuconv.zoo import DRY_RUN_STATUSES, STATUSES

ERROR_STATUSES = {"failed"}
FAILURE_STATUSES = {"verify-failed"}


def read_report(path: str | Path) -> dict:
    """A zoo JSON report from a file (one-line :class:`InputError` if it is not one)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such report file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(report, dict) or not ("entries" in report or "error" in report):
        raise InputError(f"{path}: not an npuconv zoo report (no 'entries' and no 'error')")
    return report


def merge_reports(reports: list[dict], labels: list[str] | None = None) -> dict:
    """One report from the reports of several shard jobs (see the module docstring)."""
    labels = labels or [f"report {i + 1}" for i in range(len(reports))]
    if not reports:
        raise InputError("no report to merge")
    runs = [r for r in reports if "entries" in r]
    errors = [f"{label}: {r.get('error')}" for label, r in zip(labels, reports) if "entries" not in r]
    dry = {bool(r.get("dry_run")) for r in runs}
    if len(dry) > 1:
        raise InputError("cannot merge --dry-run reports with reports of real runs")
    seen: dict[tuple, str] = {}
    entries = []
    for label, report in zip(labels, reports):
        for entry in report.get("entries") or []:
            key = (entry.get("index"), entry.get("output"))
            if key in seen:
                raise InputError(f"{label}: entry {entry.get('name')!r} is also in {seen[key]} (the same shard twice?)")
            seen[key] = label
            entries.append(entry)
    entries.sort(key=lambda e: (e.get("index", 0), str(e.get("output"))))
    statuses = DRY_RUN_STATUSES if dry == {True} else STATUSES
    exit_code = max([e.get("exit_code", 0) for e in entries] + [r.get("exit_code", 2) for r in reports if "entries" not in r] + [0])
    peaks = [e["peak_rss_bytes"] for e in entries if e.get("peak_rss_bytes") is not None]
    versions = sorted({str(r.get("npuconv_version")) for r in runs if r.get("npuconv_version")})
    return {
        "npuconv_version": versions[0] if len(versions) == 1 else versions,
        "zoo": next((r.get("zoo") for r in runs if r.get("zoo")), None),
        "zoo_entries": max((r.get("zoo_entries") or 0 for r in runs), default=0),
        "merged_from": labels,
        "shards": [r.get("shard") for r in runs],
        "dry_run": dry == {True},
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "errors": errors,
        "entries": entries,
        "totals": {
            "entries": len(entries),
            **{status: sum(e.get("status") == status for e in entries) for status in statuses},
            # shard jobs run side by side: the merged run took as long as its longest shard
            "seconds": max((r.get("totals", {}).get("seconds", 0.0) for r in runs), default=0.0),
            "bytes_in": sum(e.get("bytes_in", 0) for e in entries),
            "bytes_out": sum(e.get("bytes_out", 0) for e in entries),
            "peak_rss_bytes": max(peaks) if peaks else None,
        },
    }


# ------------------------------------------------------------------------------------ rendering
def verify_text(entry: dict) -> str:
    """``7/7 ok``, ``FAIL 1 of 7``, ``nothing checked``, ``error`` or ``-`` (not verified)."""
    v = entry.get("verify")
    if not v:
        return "-"
    if "passed" not in v:
        return "error"
    checked = v["passed"] + v["failed"]
    if v["failed"]:
        return f"FAIL {v['failed']} of {checked}"
    if not checked:
        return "nothing checked"
    skipped = f", {v['skipped']} skipped" if v.get("skipped") else ""
    return f"{v['passed']}/{checked} ok{skipped}"


def entry_detail(entry: dict) -> str:
    return entry.get("error") or entry.get("reason") or ""


def summary_line(report: dict) -> str:
    """``OK 4 entries: 1 converted, 3 skipped`` (no markup)."""
    totals = report.get("totals") or {}
    statuses = DRY_RUN_STATUSES if report.get("dry_run") else STATUSES
    counts = ", ".join(f"{totals[s]} {s}" for s in statuses if totals.get(s)) or "nothing to do"
    n = totals.get("entries", 0)
    return f"{'OK' if report.get('ok') else 'FAIL'} {n} entr{'y' if n == 1 else 'ies'}: {counts}"


def junit_xml(report: dict) -> str:
    """The report as JUnit XML (see the module docstring), UTF-8 text with an XML declaration."""
    entries = report.get("entries") or []
    suite = ElementTree.Element(
        "testsuite",
        name=f"npuconv zoo {report.get('zoo') or ''}".strip(),
        tests=str(len(entries) + len(report.get("errors") or []) + (0 if "entries" in report else 1)),
        failures=str(sum(e.get("status") in FAILURE_STATUSES for e in entries)),
        errors=str(sum(e.get("status") in ERROR_STATUSES for e in entries) + len(report.get("errors") or []) + (0 if "entries" in report else 1)),
        skipped=str(sum(e.get("status") == "not-run" for e in entries)),
        time=f"{(report.get('totals') or {}).get('seconds', 0.0):.3f}",
    )
    for entry in entries:
        case = ElementTree.SubElement(
            suite, "testcase", classname="npuconv.zoo", name=str(entry.get("name")), time=f"{entry.get('seconds', 0.0):.3f}"
        )
        status = entry.get("status")
        message = f"{status}: {entry_detail(entry)}"
        if status in ERROR_STATUSES:
            ElementTree.SubElement(case, "error", message=message, type=status).text = entry_detail(entry)
        elif status in FAILURE_STATUSES:
            ElementTree.SubElement(case, "failure", message=message, type=status).text = entry_detail(entry)
        elif status == "not-run":
            ElementTree.SubElement(case, "skipped", message=message)
        out = [f"status: {status}", f"target: {entry.get('target')}", f"source: {entry.get('source')}",
               f"output: {entry.get('output')}", f"reason: {entry.get('reason') or '-'}", f"verify: {verify_text(entry)}"]
        out += [f"warning: {w}" for w in entry.get("warnings") or []]
        ElementTree.SubElement(case, "system-out").text = "\n".join(out)
    problems = list(report.get("errors") or [])
    if "entries" not in report:
        problems.append(str(report.get("error")))
    for problem in problems:  # an invalid zoo file: nothing ran, one failing case says why
        case = ElementTree.SubElement(suite, "testcase", classname="npuconv.zoo", name="zoo file", time="0.000")
        ElementTree.SubElement(case, "error", message=problem, type="invalid-zoo-file").text = problem
    root = ElementTree.Element("testsuites")
    root.append(suite)
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _cell(text: object) -> str:
    """A Markdown table cell: pipes escaped, one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_summary(report: dict) -> str:
    """The report as Markdown (see the module docstring)."""
    icon = "✅" if report.get("ok") else "❌"
    lines = [f"### {icon} npuconv zoo: {summary_line(report)}", ""]
    for problem in list(report.get("errors") or []) + ([report["error"]] if "entries" not in report and report.get("error") else []):
        lines += [f"**error:** {_cell(problem)}", ""]
    entries = report.get("entries") or []
    if entries:
        lines += ["| # | name | target | status | time | verify | detail |", "|---|---|---|---|---|---|---|"]
        for e in entries:
            lines.append(
                f"| {e.get('index', 0) + 1} | {_cell(e.get('name'))} | {_cell(e.get('target'))} | {_cell(e.get('status'))} "
                f"| {e.get('seconds', 0.0):.1f} s | {_cell(verify_text(e))} | {_cell(entry_detail(e))} |"
            )
        lines.append("")
    warnings = [(e.get("name"), w) for e in entries for w in e.get("warnings") or []]
    if warnings:
        lines += [f"<details><summary>{len(warnings)} warning(s)</summary>", ""]
        lines += [f"- **{_cell(name)}**: {_cell(w)}" for name, w in warnings]
        lines += ["", "</details>", ""]
    return "\n".join(lines)
