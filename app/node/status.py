"""``python -m app status``: what the node has received, analysed and sent, from its database;
``--health``: whether it is alive and can analyse (the container's HEALTHCHECK)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from app.node.logs import uid_hash

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
                  f"  {'StudyInstanceUID':<64} {'hash (logs)':<16} {'status':<10} {'inst':>5} {'outcome':<18}"
                  f" {'sent/pend/dead':>14}  last instance    reason"]
        for s in summary["recent_studies"]:
            counts = f"{s['sent']}/{s['pending']}/{s['dead']}"
            reason = (s.get("reason") or "").replace("\n", " ")
            ref = s.get("study_hash") or uid_hash(s["study_uid"])
            lines.append(f"  {s['study_uid']:<64} {ref:<16} {s['status']:<10} {s['instances']:>5}"
                         f" {s.get('outcome') or '-':<18} {counts:>14}  {_ago(s['last_received'], now):<16}"
                         f" {reason[:80]}")
    if summary["dead_letters"]:
        lines += ["", "Dead letters (not delivered after all retries):"]
        for d in summary["dead_letters"]:
            lines.append(f"  {d['sop_instance_uid']} -> {d['destination']}  attempts {d['attempts']}"
                         f"  last error: {d['last_status']}  (study {d['study_uid']})")
    return "\n".join(lines)


def health(settings, info: dict[str, str], now: float | None = None) -> tuple[bool, str]:
    """Is the node healthy? Its heartbeat (written every few seconds by the scheduler) must be
    younger than ``health_max_heartbeat_age_s``, at least one analysis worker must have the
    pipeline and the model loaded (``workers_ready``; a node that receives but cannot analyse
    is not healthy), and its listener must answer a C-ECHO from ``health_check_ae_title``
    (over TLS when the listener uses TLS).

    Returns (healthy, one line saying why).
    """
    from app.node.net import echo

    now = time.time() if now is None else now
    beat = _float(info.get("heartbeat_at"))
    if beat is None:
        return False, "no heartbeat recorded (the node has not started with this state database)"
    age = now - beat
    started, stopped = _float(info.get("started_at")), _float(info.get("stopped_at"))
    if stopped is not None and (started is None or stopped >= started):
        return False, f"the node stopped {_ago(stopped, now)}"
    if age > settings.health_max_heartbeat_age_s:
        return False, f"heartbeat {age:.0f} s old (limit {settings.health_max_heartbeat_age_s:g} s)"
    ready = int(_float(info.get("workers_ready")) or 0)
    if ready < 1:
        why = info.get("worker_error") or "the workers are still loading the pipeline and model"
        return False, f"no analysis worker can analyse: {why}"
    host = settings.bind_address
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ipaddress.ip_address(host).version == 6 else "127.0.0.1"
    except ValueError:
        pass
    port = int(info.get("port") or settings.port)
    tls = None
    if settings.tls_enabled:
        from app.node.listener import client_ssl_context

        tls = client_ssl_context(settings)
    status = echo(host, port, settings.ae_title, settings.health_check_ae_title, timeout_s=5.0, tls_context=tls)
    if status != 0:
        return False, f"listener {host}:{port} did not answer C-ECHO" + ("" if status is None else
                                                                       f" with success (0x{status:04X})")
    return True, f"ok: heartbeat {age:.0f} s old, {ready} worker(s) ready, C-ECHO {host}:{port} answered"
