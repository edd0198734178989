"""Chrome / Perfetto trace-event JSON of a simulated timeline.

Format (Trace Event Format, "JSON Object Format"): ``{"traceEvents": [...],
"displayTimeUnit": "ms"}`` with complete events ``{"name", "ph": "X", "ts", "dur",
"pid", "tid", "args"}`` (ts and dur in microseconds), counter events ``"ph": "C"``
and metadata events ``"ph": "M"`` (process_name / thread_name) naming the integer
pids/tids. Open in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json

US_PER_S = 1e6


def build(spans, counters=(), *, process_names: dict | None = None) -> dict:
    """spans: (process, thread, name, start_s, dur_s[, args]); counters: (name, t_s, {series: value})."""
    pids: dict = {}
    tids: dict = {}
    events = []
    for sp in spans:
        proc, thread, name, start, dur = sp[:5]
        args = sp[5] if len(sp) > 5 else {}
        pid = pids.setdefault(proc, len(pids) + 1)
        tid = tids.setdefault((proc, thread), len([k for k in tids if k[0] == proc]) + 1)
        events.append({"name": str(name), "ph": "X", "ts": start * US_PER_S, "dur": dur * US_PER_S,
                       "pid": pid, "tid": tid, "args": args})
    cpid = len(pids) + 1 if counters else None
    for name, t, values in counters:
        events.append({"name": name, "ph": "C", "ts": t * US_PER_S, "pid": cpid, "tid": 0,
                       "args": {k: float(v) for k, v in values.items()}})
    meta = []
    for proc, pid in pids.items():
        label = (process_names or {}).get(proc, str(proc))
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": label}})
    for (proc, thread), tid in tids.items():
        meta.append({"name": "thread_name", "ph": "M", "pid": pids[proc], "tid": tid, "args": {"name": str(thread)}})
    if cpid is not None:
        meta.append({"name": "process_name", "ph": "M", "pid": cpid, "tid": 0, "args": {"name": "queues"}})
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def write(path, trace: dict) -> None:
    from dsref.reference.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(trace))


def validate(trace: dict) -> None:
    """Raise ValueError unless ``trace`` is a well-formed trace-event object (used by the tests)."""
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError("trace must be an object with a 'traceEvents' list")
    for i, e in enumerate(trace["traceEvents"]):
        for k in ("name", "ph", "pid", "tid"):
            if k not in e:
                raise ValueError(f"event {i}: missing '{k}'")
        if e["ph"] == "X":
            if not (isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))):
                raise ValueError(f"event {i}: complete event needs numeric ts and dur")
            if e["dur"] < 0 or e["ts"] < 0:
                raise ValueError(f"event {i}: negative ts or dur")
        elif e["ph"] == "C":
            if not isinstance(e.get("ts"), (int, float)) or not isinstance(e.get("args"), dict):
                raise ValueError(f"event {i}: counter event needs ts and args")
        elif e["ph"] != "M":
            raise ValueError(f"event {i}: unexpected phase {e['ph']!r}")


def serve_trace(sim) -> dict:
    """Trace of a ServeSim run made with record=True: one process per role, one thread per instance."""
    return build(sim.rec.spans, sim.rec.counters)


def train_trace(tsim) -> dict:
    """Trace of a TrainSim run made with record=True: per pipeline rank one compute thread and
    one thread for the (overlapping) data-parallel collectives."""
    spans = [("pipeline", f"rank {r:02d} {stream}", name, start, dur) for r, name, start, dur, stream in tsim.spans]
    return build(spans, process_names={"pipeline": f"{tsim.sc.schedule} PP{tsim.par.pp}"})
