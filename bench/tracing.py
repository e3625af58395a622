#!/usr/bin/env python3
"""What tracing costs: the engine benchmark with tracing off, then on (every trace sampled, exported over
OTLP/HTTP to a receiver on loopback that accepts every export without parsing it, as a collector on
another machine would cost these cores nothing), alternating ``--rounds`` times in one run on one machine;
prints the medians of each and their ratio as a markdown table.

    .venv/bin/python bench/tracing.py [--rounds 3] [--only chain1,chain8]

Each round runs ``bench/engine.py`` as it is run on its own (its own scratch database and processes), with
``--env OTEL_EXPORTER_OTLP_ENDPOINT=...`` and ``OTEL_TRACES_SAMPLER=always_on`` for the traced rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fakes.otlp_receiver import OtlpReceiver  # noqa: E402

CPU_PROCESSES = ("api", "worker", "postgres")
FIGURES = (("steps/s", "steps_per_s"), ("hand-off p50 ms", "handoff_p50_ms"), ("hand-off p99 ms", "handoff_p99_ms"))


def engine_round(only: str, env: list[str], redis: str) -> dict[str, dict[str, Any]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(ROOT / "bench" / "engine.py"), "--only", only, "--json", out.name,
                   "--redis", redis, *(arg for item in env for arg in ("--env", item))]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        report = json.loads(Path(out.name).read_text())
    return {scenario["scenario"]: scenario for scenario in report["scenarios"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="chain1,chain8")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    results: dict[str, list[dict[str, dict[str, Any]]]] = {"off": [], "on": []}
    with OtlpReceiver(parse=False) as receiver:
        traced = [f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.base_url}", "OTEL_TRACES_SAMPLER=always_on"]
        for number in range(args.rounds):
            for mode, env in (("off", []), ("on", traced)):
                print(f"round {number + 1}/{args.rounds}, tracing {mode} ...", file=sys.stderr, flush=True)
                results[mode].append(engine_round(args.only, env, args.redis))
        received = receiver.received_bytes
    print(f"\n{args.rounds} rounds each, alternating; {received / 2**20:.1f} MB of spans received in the traced rounds")
    print("command: " + " ".join(["bench/tracing.py", *sys.argv[1:]]) + "\n")
    print("| scenario | figure | tracing off (median) | tracing on (median) | on / off |\n|---|---|---:|---:|---:|")
    for scenario in results["off"][0]:
        figures = [(label, lambda r, key=key: r[key]) for label, key in FIGURES]
        # CPU per step per process: steadier than throughput on a shared machine.
        measured = results["off"][0][scenario].get("cpu_ms_per_step") or {}
        figures += [(f"CPU ms/step {process}", lambda r, process=process: r["cpu_ms_per_step"][process])
                    for process in CPU_PROCESSES if measured.get(process)]
        for label, read in figures:
            off = statistics.median(read(r[scenario]) for r in results["off"])
            on = statistics.median(read(r[scenario]) for r in results["on"])
            print(f"| {scenario} | {label} | {off:.2f} | {on:.2f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
