"""``python -m app status``: what the node has received, analysed and sent, from its database."""

from __future__ import annotations

import time
from typing import Any

#: A node whose heartbeat is older than this is reported as not running, s.
STALE_HEARTBEAT_S = 20.0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _ago(t: Any, now: float) -> str:
    value = _float(t)
    if value is None:
        return "-"
    seconds = max(0.0, now - value)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))


def node_running(info: dict[str, str], now: float | None = None) -> bool:
    """True when the node's heartbeat is fresh and it has not recorded a stop since starting."""
    now = time.time() if now is None else now
    beat, started, stopped = (_float(info.get(k)) for k in ("heartbeat_at", "started_at", "stopped_at"))
    if beat is None or now - beat > STALE_HEARTBEAT_S:
        return False
    return stopped is None or (started is not None and stopped < started)


def format_status(summary: dict[str, Any], now: float | None = None) -> str:
    """Render :meth:`app.node.state.StateStore.summary` for people."""
    now = time.time() if now is None else now
    info = summary["node"]
    st, ob = summary["studies"], summary["outbox"]
    state = "running" if node_running(info, now) else "not running"
    lines = [
        f"Node {info.get('ae_title', '?')} on {info.get('address', '?')}:{info.get('port', '?')}: {state}"
        f" (pid {info.get('pid', '?')}, heartbeat {_ago(info.get('heartbeat_at'), now)},"
        f" quiet period {info.get('quiet_period_s', '?')} s, workers {info.get('workers', '?')})",
        f"Studies: {summary['studies_total']} received ({summary['instances_total']} instances)"
        f" | receiving {st['receiving']} | queued {st['queued']} | in progress {st['processing']}"
        f" | done {st['done']} | failed {st['failed']}",
        f"Outbox: pending {ob['pending']} | sent {ob['sent']} | dead {ob['dead']} | superseded {ob['superseded']}",
    ]
    if summary["recent_studies"]:
        lines += ["", "Recent studies (newest first):",
                  f"  {'StudyInstanceUID':<64} {'status':<10} {'inst':>5} {'outcome':<18} {'sent/pend/dead':>14}"
                  f"  last instance    reason"]
        for s in summary["recent_studies"]:
            counts = f"{s['sent']}/{s['pending']}/{s['dead']}"
            reason = (s.get("reason") or "").replace("\n", " ")
            lines.append(f"  {s['study_uid']:<64} {s['status']:<10} {s['instances']:>5} {s.get('outcome') or '-':<18}"
                         f" {counts:>14}  {_ago(s['last_received'], now):<16} {reason[:80]}")
    if summary["dead_letters"]:
        lines += ["", "Dead letters (not delivered after all retries):"]
        for d in summary["dead_letters"]:
            lines.append(f"  {d['sop_instance_uid']} -> {d['destination']}  attempts {d['attempts']}"
                         f"  last error: {d['last_status']}  (study {d['study_uid']})")
    return "\n".join(lines)
