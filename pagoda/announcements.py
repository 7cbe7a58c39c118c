"""The one line each service prints when it is up, and the pattern that reads it back.

``pagoda serve``, the benchmarks and the tests start services with port 0 and learn
the real ports from these lines. Each line is defined here once, as a template: the
service formats it, the launcher parses it, so the two cannot drift apart. A line may
carry a prefix (a log format's time and level) and more fields after it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Announcement:
    """A line like ``"gateway listening http={http} grpc={grpc}"``: every field is one
    word (no spaces), read back by name."""

    template: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(self.template):
            parts.append(re.escape(literal))
            if name:
                parts.append(f"(?P<{name}>\\S+)")
        object.__setattr__(self, "pattern", re.compile("".join(parts)))

    def line(self, **fields: object) -> str:
        return self.template.format(**fields)

    def search(self, text: str) -> re.Match[str] | None:
        return self.pattern.search(text)


SCHEDULER_LISTENING = Announcement("scheduler listening grpc={grpc} step={step} http={http}")
# Appended to the scheduler's line when it publishes prefix-cache events.
SCHEDULER_KV_EVENTS = Announcement("kv_events={kv_events} kv_snapshot={kv_snapshot}")
WORKER_REGISTERED = Announcement(
    "worker {worker_id} registered replica={replica} epoch={epoch} http={http}"
)
GATEWAY_LISTENING = Announcement("gateway listening http={http} grpc={grpc}")
