"""Test-only fault injection: make a chosen engine site raise or hang, once.

A `FaultInjector` is built once at start (from `JAXSERVE_INJECT_FAULT`, or handed to
`LLMEngine(faults=...)`) and owned by the engine; the runner calls `hit("forward")` before
launching a step's forward and `hit("sampler")` before its sampler, the output processor
`hit("detokenize")` before a request's detokenization. The spec `SITE:ACTION@N` fires on
the N-th call at that site (1-based): `forward:raise@3`, `sampler:raise@1`,
`forward:hang@2`, `detokenize:raise@4`. With no spec the engine holds None and pays nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

ENV_VAR = "JAXSERVE_INJECT_FAULT"
SITES = ("forward", "sampler", "detokenize")
ACTIONS = ("raise", "hang")


class InjectedFault(RuntimeError):
    """What an injected `raise` raises."""


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    site: str  # one of SITES: where it fires
    action: str  # one of ACTIONS: raise InjectedFault, or block the calling thread forever
    at_call: int  # fires on this call at the site (1-based), and only then

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """`SITE:ACTION@N`; ValueError naming the variable for anything else."""
        try:
            site, rest = text.strip().split(":")
            action, at_call = rest.split("@")
            spec = cls(site, action, int(at_call))
        except ValueError:
            raise ValueError(f"{ENV_VAR} must look like SITE:ACTION@N (e.g. forward:raise@3), "
                             f"got {text!r}") from None
        if spec.site not in SITES or spec.action not in ACTIONS or spec.at_call < 1:
            raise ValueError(f"{ENV_VAR}: site in {SITES}, action in {ACTIONS}, N >= 1; "
                             f"got {text!r}")
        return spec


class FaultInjector:
    """Counts calls per site and fires the spec's fault on its call. Thread-safe: the
    runner and output processor call it from the engine thread, tests from theirs."""

    def __init__(self, spec: FaultSpec):
        self.spec = spec
        self._calls = dict.fromkeys(SITES, 0)
        self._lock = threading.Lock()
        self._never = threading.Event()  # a hang waits on it; nothing sets it

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultInjector | None:
        text = environ.get(ENV_VAR, "")
        return cls(FaultSpec.parse(text)) if text else None

    def hit(self, site: str) -> None:
        with self._lock:
            self._calls[site] += 1
            fires = site == self.spec.site and self._calls[site] == self.spec.at_call
        if not fires:
            return
        if self.spec.action == "hang":
            self._never.wait()
        raise InjectedFault(f"injected fault: {site} call {self.spec.at_call}")
