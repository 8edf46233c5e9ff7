"""A deterministic discrete-event simulation of a service behind a real Throttler.

The service has ``servers`` connections (a database pool) and a service time per request; a
request admitted by the throttler takes a free connection or waits for one in FIFO order, as the
benchmark's target app does. Arrivals are Poisson (seeded). No real time passes: the throttler
reads the simulation's clock, and with ``max_queue=0`` it never blocks.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shedder import Overloaded, Permit, Throttler


@dataclass
class Outcome:
    arrived: float
    latency: float | None = None  # None: shed


@dataclass
class Simulation:
    servers: int
    service_time: Callable[[float], float]  # seconds, as a function of the clock
    rate: float  # arrivals per second
    seed: int = 1
    now: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    limits: list[tuple[float, int]] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def run(self, throttler: Throttler, duration: float) -> None:
        rng = random.Random(self.seed)
        events: list[tuple[float, int, str, object]] = []
        sequence = 0
        busy = 0
        waiting: deque[tuple[Permit, Outcome]] = deque()

        def schedule(at: float, kind: str, payload: object) -> None:
            nonlocal sequence
            sequence += 1
            heapq.heappush(events, (at, sequence, kind, payload))

        def start(permit: Permit, outcome: Outcome) -> None:
            nonlocal busy
            busy += 1
            schedule(self.now + self.service_time(self.now), "done", (permit, outcome))

        schedule(rng.expovariate(self.rate), "arrive", None)
        while events:
            self.now, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                if self.now < duration:
                    schedule(self.now + rng.expovariate(self.rate), "arrive", None)
                outcome = Outcome(self.now)
                self.outcomes.append(outcome)
                try:
                    permit = throttler.acquire()
                except Overloaded:
                    continue
                if busy < self.servers:
                    start(permit, outcome)
                else:
                    waiting.append((permit, outcome))
            else:
                permit, outcome = payload  # type: ignore[misc]
                busy -= 1
                outcome.latency = self.now - outcome.arrived
                permit.release()
                self.limits.append((self.now, throttler.max_concurrency))
                if waiting:
                    start(*waiting.popleft())

    def goodput(self, start: float, end: float) -> float:
        """Completed requests per second among arrivals in [start, end)."""
        done = [o for o in self.outcomes if start <= o.arrived < end and o.latency is not None]
        return len(done) / (end - start)

    def latency_quantile(self, start: float, end: float, q: float) -> float:
        latencies = sorted(
            o.latency for o in self.outcomes if start <= o.arrived < end and o.latency is not None
        )
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]
