"""The report written out: Markdown (status, table, verdict, incidents, plots) and one self-contained HTML page.

:func:`render_markdown` takes analysed runs (:class:`runreport.report.Analysed`:
the first is the report's run, the others ``--compare``'s) and the plots made for
them; :func:`markdown_to_html` turns that Markdown (our own subset) into a page
with the plots inline.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np

from protocol.config import Q_DIVERGED_MULTIPLE
from protocol.text import duration
from runreport.expected import BAD, INFO, NO_DATA, OK, WARN, Row
from runreport.faults import format_summary
from runreport.incidents import causes_by_child, outliers
from runreport.status import FAILED, FROZEN

STATUS_MARK = {OK: "ok", WARN: "**WARNING**", BAD: "**BAD**", INFO: "info", NO_DATA: "no data"}


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e7):
        return f"{int(x):,}"
    ax = abs(x)
    return f"{x:.3g}" if ax >= 1e5 or ax < 1e-3 else f"{x:.4g}"


def status_lines(a) -> list[str]:
    """The run status section's lines (the first one is the status and why)."""
    s = a.status
    lines = [f"**{s['status'].upper()}**: {s.get('reason')}" + (f" (exit {s['exit_code']})"
                                                              if s.get("exit_code") is not None else "")]
    if s.get("note"):
        lines.append(s["note"])
    steps = s.get("env_steps")
    if steps is not None:
        lines.append(f"env steps {steps:,} of max_timesteps {s['max_timesteps']:,} ({steps / s['max_timesteps']:.1%})")
    if s.get("last_update") is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_update_time"]))
        lines.append(f"last update logged: {s['last_update']:,} at {when}")
    lines.append(f"wall time {duration(s.get('wall_s'), missing='?')}")
    if s["status"] in (FROZEN, FAILED) and s.get("last_progress_time"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_progress_time"]))
        lines.append(f"last progress seen ({s['last_progress_what']}) at {when}; what the supervisor did since: "
                     + "; ".join(s.get("since_last_progress") or []))
    if s["restarts"]:
        lines.append("restarts: " + ", ".join(
            f"{k} {v.get('restarts', 0)} (" + ", ".join(f"{n} {c}" for c, n in sorted(v.items()) if c != "restarts")
            + ")" for k, v in s["restarts"].items()))
    else:
        lines.append("restarts: none")
    return lines


def _row_cells(r: Row) -> list[str]:
    st = r.stats or {}
    return [_fmt(st.get("final")), _fmt(st.get("mean")), _fmt(st.get("min")), _fmt(st.get("max")),
            STATUS_MARK[r.status], r.delta + (f" ({r.note})" if r.note else "")]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]


def verdict_lines(a) -> list[str]:
    v = a.verdict
    out = [f"**Verdict: {v.verdict.upper()}**" + (f", first went wrong at update {v.first_wrong:,}"
                                                   if v.first_wrong is not None else "")]
    for f in v.findings:
        out.append(f"- {f.level}: {f.text}")
    if not v.findings:
        out.append("- no rule fired: values within Qmax, -actor_loss consistent with Q, clipping in at most half of the updates, no alerts")
    for name, label in (("actor_loss", "actor loss"), ("q", "Q (mean of q1, q2)")):
        g = v.growth.get(name)
        out.append(f"- {label}: " + (g.text() if g is not None else "too few points"))
    if v.gap is not None:
        out.append(f"- -actor_loss against Q: -actor_loss {v.gap['actor']:.4g}, Q {v.gap['q']:.4g}; gap "
                   f"(-actor_loss - Q)/(|Q|+1) = {v.gap['final_ratio']:.3g} over the last window (largest "
                   f"{v.gap['max_ratio']:.3g})")
    for group, c in v.clipping.items():
        active = f"clipping active in {c['clip_active']:.0%} of updates" if c["clip_active"] is not None else \
            f"{c['share_logged_above']:.0%} of logged means above the threshold"
        out.append(f"- {group} gradients: pre-clip median {_fmt(c['median'])}, max {_fmt(c['max'])} against "
                   f"threshold {c['threshold']:g}: {active}")
    if v.first_alert is not None:
        fa = v.first_alert
        tail = (f"{v.alert_lead:,} updates before the blow-up at update {v.blowup:,}" if v.alert_lead is not None
                and v.alert_lead >= 0 else f"{-v.alert_lead:,} updates after the blow-up at update {v.blowup:,}"
                if v.alert_lead is not None else f"no blow-up (|Q| never passed {Q_DIVERGED_MULTIPLE:g} Qmax)")
        out.append(f"- first alert: {fa['level']}:{fa['rule']} at update {fa['update']:,}; {tail}")
    else:
        out.append("- no alert fired" + (f"; blow-up at update {v.blowup:,}" if v.blowup is not None else ""))
    return out


def render_markdown(runs: list, plots: list[tuple[str, str]]) -> str:
    a = runs[0]
    names = [r.run.name for r in runs]
    md = [f"# Run report: {a.run.name}" + (f" (compared with {', '.join(names[1:])})" if len(runs) > 1 else ""), "",
          f"Run directory `{a.run.dir}`; written {time.strftime('%Y-%m-%d %H:%M:%S')}. Qmax = "
          f"{a.q_max:.4g} ({'report.q_max' if a.run.cfg.report.q_max else 'env.reward_max / (1 - gamma)'}).", ""]
    md += ["## 1. Run status", ""]
    for r in runs:
        if len(runs) > 1:
            md.append(f"**{r.run.name}**")
            md.append("")
        md += [f"- {line}" for line in status_lines(r)]
        for p in r.run.problems:
            md.append(f"- read problem: {p}")
        md.append("")
    md += ["## 2. Expected against observed", ""]
    if len(runs) == 1:
        md += _md_table(["metric", "expected", "final", "mean", "min", "max", "status", "delta"],
                        [[r.metric, r.expected] + _row_cells(r) for r in a.rows])
    else:
        head = ["metric", "expected"]
        for r in runs:
            head += [f"{r.run.name} final", f"{r.run.name} mean", f"{r.run.name} status"]
        by = [{row.metric: row for row in r.rows} for r in runs]
        body = []
        for row in a.rows:
            cells = [row.metric, row.expected]
            for b in by:
                other = b.get(row.metric)
                st = other.stats if other is not None else None
                cells += [_fmt((st or {}).get("final")), _fmt((st or {}).get("mean")),
                          STATUS_MARK[other.status] if other is not None else "no data"]
            body.append(cells)
        md += _md_table(head, body)
    md += ["", "final: the last logged value (evaluation: the mean of the last round); each logged value is a "
           "mean over `learner.log_every` updates. Gradient norms are taken before clipping unless the row says "
           "after.", ""]
    md += ["## 3. Divergence analysis", ""]
    for r in runs:
        if len(runs) > 1:
            md += [f"**{r.run.name}**", ""]
        md += verdict_lines(r) + [""]
    md += ["## 4. Incidents", ""]
    for r in runs:
        if len(runs) > 1:
            md += [f"**{r.run.name}**", ""]
        if not r.timeline:
            md += ["No stalls, kills, crashes, restarts or alerts.", ""]
        else:
            md += _md_table(["time", "process", "event", "detail"],
                            [[t["clock"], str(t["name"]), t["event"], t["detail"]] for t in r.timeline])
            md.append("")
            table = causes_by_child(r.run)
            if table:
                kinds = sorted({cause for row in table.values() for cause in row})
                md += ["Causes per process over the run (named from each incident's evidence):", ""]
                md += _md_table(["process"] + kinds + ["all"],
                                [[name] + [str(row.get(k, "")) for k in kinds] + [str(sum(row.values()))]
                                 for name, row in table.items()])
                md += [""] + [f"- {line}" for line in outliers(r.run)] + [""]
            for t in r.timeline:
                if t.get("stack"):
                    md += [f"Stack of {t['name']} at {t['clock']} ({t['detail'].split(';')[0]}):", "", "```"]
                    md += t["stack"] + ["```", ""]
        if r.faults:
            md += ["Chaos faults (detection: fault to stalled/exited; recovery: fault to running again):", "", "```"]
            md += format_summary(r.faults) + ["```", ""]
    md += ["## 5. Plots", ""]
    for title, fname in plots:
        md += [f"![{title}]({fname})", ""]
    if not plots:
        md += ["No plots (matplotlib is missing, or there was nothing to plot).", ""]
    md += ["Per-worker steps/s comes from `progress.jsonl`, which the supervisor writes from its children's "
           "heartbeats every 2 s; runs without it show the run's steps/s from `buffer/transitions`.", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    import html

    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_to_html(md: str, image_dir: Path, title: str) -> str:
    """The report's markdown (our own subset: headings, tables, lists, code, images) as one self-contained page."""
    import base64
    import html

    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}pre{background:#f4f4f4;padding:6px}"
           "img{max-width:100%}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            block = []
            while j < len(lines) and not lines[j].startswith("```"):
                block.append(lines[j])
                j += 1
            out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
            i = j + 1
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip())[1:-1]] for r in rows]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>")
            for r in cells[2:]:
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif (m := re.fullmatch(r"!\[(.*)\]\((.+)\)", line)):
            try:
                data = base64.b64encode((image_dir / m.group(2)).read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(m.group(1))}</figcaption></figure>")
            except OSError:
                out.append(f"<p>(missing plot {html.escape(m.group(2))})</p>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)
