"""Karbor's engine, for comparison: its linking rules on the real TaskFlow library.

Run as a subprocess (eventlet monkey-patches the interpreter, as Karbor's
services did): ``python -m benchmarks.karbor_taskflow GRAPH.json``. The graph
file holds ``resources`` ([type, id] pairs), ``edges`` ([parent, child] index
pairs) and optionally ``delays`` (pre-sampled per-resource latencies in
seconds, so both engines see the same simulated cloud).

What is reproduced from Karbor (``resource_flow.py`` and ``workflow.py`` of
openstack/karbor, written here from its description): one ``FunctorTask`` per
resource and hook, injected with context, parameters and resource and
requiring ``checkpoint`` from the store; per resource
``begin -> finish -> main -> complete``; per edge ``begin(P) -> begin(C)``,
``finish(C) -> finish(P)``, ``complete(C) -> complete(P)``, all by
``graph_flow.Flow.link``; ``taskflow.engines.load(..., engine="parallel",
executor=futurist.GreenThreadPoolExecutor())``, with the '*' notifier and
atom-notifier callbacks Karbor registers. Prints one JSON line.
"""

from __future__ import annotations

import warnings

# eventlet and futurist announce their deprecation; Karbor ran on them, so do we here.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet  # noqa: E402

eventlet.monkey_patch()

import json  # noqa: E402  (after monkey-patching, as Karbor's services do)
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import futurist  # noqa: E402
from taskflow import engines, task  # noqa: E402
from taskflow.patterns import graph_flow  # noqa: E402

HOOKS = ("on_prepare_begin", "on_prepare_finish", "on_main", "on_complete")
SERVER = "OS::Nova::Server"
VOLUME = "OS::Cinder::Volume"


def _peak_rss_kb() -> int:
    """VmHWM: this program's peak RSS (ru_maxrss would report the parent's across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _watch(state: Any, details: Any) -> None:
    """Karbor's flow and atom watchers log at trace level: a call that does nothing."""


def main(path: str) -> dict[str, Any]:
    with open(path) as fh:
        spec = json.load(fh)
    resources: list[list[str]] = spec["resources"]
    edges: list[list[int]] = spec["edges"]
    delays: dict[str, list[float]] | None = spec.get("delays")
    cuts: list[float] = []
    windows: list[float] = []
    frozen_at: dict[int, float] = {}

    def sleep(kind: str, i: int) -> None:
        if delays is not None and delays[kind][i] > 0:
            time.sleep(delays[kind][i])  # eventlet-patched: yields to other green threads

    def hook_for(i: int, rtype: str, hook: str) -> Callable[..., None]:
        def call(context: Any, parameters: Any, resource: Any, checkpoint: Any) -> None:
            if hook == "on_prepare_begin" and rtype == SERVER:
                sleep("quiesce", i)
                frozen_at[i] = time.monotonic()
            elif hook == "on_prepare_finish" and rtype == VOLUME:
                sleep("snapshot", i)
                cuts.append(time.monotonic())
                sleep("snapshot_return", i)
            elif hook == "on_prepare_finish" and rtype == SERVER:
                sleep("thaw", i)
                if i in frozen_at:
                    windows.append(time.monotonic() - frozen_at[i])
            elif hook == "on_main" and rtype == VOLUME:
                sleep("copy", i)

        return call

    t0 = time.monotonic()
    flow = graph_flow.Flow("ResourceGraphFlow_protect")
    tasks: list[list[Any]] = []
    for i, (rtype, rid) in enumerate(resources):
        hooks = [
            task.FunctorTask(
                hook_for(i, rtype, hook),
                name=f"protect_{hook}_{rtype}_{rid}",
                requires=["context", "parameters", "resource", "checkpoint"],
                inject={"context": None, "parameters": {}, "resource": (rtype, rid)},
            )
            for hook in HOOKS
        ]
        flow.add(*hooks)
        flow.link(hooks[0], hooks[1])
        flow.link(hooks[1], hooks[2])
        flow.link(hooks[2], hooks[3])
        tasks.append(hooks)
    for p, c in edges:
        flow.link(tasks[p][0], tasks[c][0])
        flow.link(tasks[c][1], tasks[p][1])
        flow.link(tasks[c][3], tasks[p][3])
    engine = engines.load(
        flow,
        executor=futurist.GreenThreadPoolExecutor(),
        engine="parallel",
        store={"checkpoint": {"id": "bench"}},
    )
    engine.notifier.register("*", _watch)
    engine.atom_notifier.register("*", _watch)
    t1 = time.monotonic()
    engine.run()
    t2 = time.monotonic()
    return {
        "build_s": t1 - t0,
        "run_s": t2 - t1,
        "total_s": t2 - t0,
        "maxrss_kb": _peak_rss_kb(),
        "cuts": cuts,
        "windows": windows,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
