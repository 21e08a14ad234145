"""STUN Binding transactions (RFC 8489 section 6.2.1), sans-I/O, and NAT mapping classification.

``StunClient`` keeps the outstanding transactions of one UDP socket. ``start`` gives the
first datagram to send; ``next_deadline``/``tick(now)`` give the retransmissions as they fall
due (RTO doubling after each, at most ``max_transmissions`` sends, then ``last_wait_factor``
x RTO of waiting before the transaction fails); ``receive`` matches a response by
transaction id AND source address. Every outcome (``BindingResult`` with the reflexive
address and the RTT, or ``BindingFailure``) is queued for ``take_completed`` exactly once.
Network input that does not match is dropped and counted in ``drops`` by reason.

``classify_mapping`` turns the results of two or more servers, queried from the same local
socket, into a ``MappingReport``: endpoint-independent mapping (RFC 4787 section 4.1) when
every server saw the same reflexive address and port, endpoint-dependent otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from pywg.nat.stun import (
    BINDING,
    TAILSCALE_SOFTWARE,
    StunClass,
    StunError,
    StunMessage,
    TransportAddress,
    binding_request,
    parse,
)


@dataclass(frozen=True)
class RetransmitPolicy:
    """RFC 8489 section 6.2.1: the first retransmission after ``rto`` seconds, each wait
    twice the one before, ``max_transmissions`` (Rc) sends in all, and after the last one
    ``last_wait_factor`` (Rm) x ``rto`` before giving up. The defaults are the RFC's
    (500 ms, Rc = 7, Rm = 16: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s, failure at 39.5 s)."""

    rto: float = 0.5
    max_transmissions: int = 7
    last_wait_factor: int = 16

    def __post_init__(self) -> None:
        if not self.rto > 0:
            raise ValueError(f"rto must be positive, not {self.rto}")
        if self.max_transmissions < 1:
            raise ValueError(f"max_transmissions must be at least 1, not {self.max_transmissions}")
        if self.last_wait_factor < 1:
            raise ValueError(f"last_wait_factor must be at least 1, not {self.last_wait_factor}")

    def schedule(self) -> tuple[tuple[float, ...], float]:
        """(offsets of every transmission from the first, offset of the failure)."""
        sends, at = [0.0], 0.0
        for k in range(self.max_transmissions - 1):
            at += self.rto * 2 ** k
            sends.append(at)
        return tuple(sends), at + self.rto * self.last_wait_factor


class Transmit(NamedTuple):
    """A datagram to send to ``destination``."""

    datagram: bytes
    destination: TransportAddress


@dataclass(frozen=True)
class BindingResult:
    """A Binding success: ``server`` saw us as ``reflexive``. ``rtt`` runs from the latest
    transmission to the response; when ``transmissions`` > 1 it may belong to an earlier
    one (Karn's rule: do not feed it to an RTO estimate)."""

    server: TransportAddress
    reflexive: TransportAddress
    rtt: float
    transmissions: int
    transaction_id: bytes = field(repr=False)

    @property
    def retransmitted(self) -> bool:
        return self.transmissions > 1


@dataclass(frozen=True)
class BindingFailure:
    """A Binding transaction that ended without a reflexive address, and why."""

    server: TransportAddress
    reason: str
    transmissions: int
    transaction_id: bytes = field(repr=False)


Outcome = BindingResult | BindingFailure


@dataclass
class _Transaction:
    transaction_id: bytes
    server: TransportAddress
    datagram: bytes
    sent_at: float
    next_at: float
    wait: float
    transmissions: int = 1


class StunClient:
    """The Binding transactions of one UDP socket (sans-I/O: the caller sends and receives)."""

    def __init__(self, random: Callable[[int], bytes], policy: RetransmitPolicy | None = None, *,
                 software: str | None = TAILSCALE_SOFTWARE, fingerprint: bool = True) -> None:
        self._random = random
        self.policy = policy or RetransmitPolicy()
        self._software = software
        self._fingerprint = fingerprint
        self._transactions: dict[bytes, _Transaction] = {}
        self._completed: list[Outcome] = []
        self.drops: Counter[str] = Counter()

    def __len__(self) -> int:
        """The number of outstanding transactions."""
        return len(self._transactions)

    def start(self, server: TransportAddress | tuple[str, int], now: float) -> Transmit:
        """Begin a Binding transaction with ``server``; send the returned datagram now."""
        if not isinstance(server, TransportAddress):
            server = TransportAddress.of(*server[:2])
        for _ in range(8):
            transaction_id, datagram = binding_request(self._random, software=self._software,
                                                       fingerprint=self._fingerprint)
            if transaction_id not in self._transactions:
                break
        else:
            raise RuntimeError("the random source keeps repeating outstanding transaction ids")
        wait = self.policy.rto
        next_at = now + (wait if self.policy.max_transmissions > 1 else wait * self.policy.last_wait_factor)
        self._transactions[transaction_id] = _Transaction(transaction_id, server, datagram, now, next_at, wait)
        return Transmit(datagram, server)

    def cancel(self, transaction_id: bytes) -> None:
        self._transactions.pop(transaction_id, None)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (a retransmission or a failure), or None."""
        return min((t.next_at for t in self._transactions.values()), default=None)

    def tick(self, now: float) -> list[Transmit]:
        """The retransmissions due at ``now``; transactions out of time fail (see take_completed)."""
        out = []
        policy = self.policy
        for transaction in list(self._transactions.values()):
            if transaction.next_at > now:
                continue
            if transaction.transmissions < policy.max_transmissions:
                transaction.transmissions += 1
                transaction.sent_at = now
                if transaction.transmissions < policy.max_transmissions:
                    transaction.wait *= 2
                    transaction.next_at = now + transaction.wait
                else:
                    transaction.next_at = now + policy.rto * policy.last_wait_factor
                out.append(Transmit(transaction.datagram, transaction.server))
            else:
                del self._transactions[transaction.transaction_id]
                self._completed.append(BindingFailure(
                    transaction.server, f"no response after {transaction.transmissions} transmissions",
                    transaction.transmissions, transaction.transaction_id))
        return out

    def receive(self, datagram: bytes, source: TransportAddress | tuple[str, int], now: float) -> Outcome | None:
        """Feed a datagram that came from ``source``; the outcome it completes, or None (then it
        was dropped and counted, or it did not end its transaction)."""
        try:
            message = parse(datagram)
        except StunError as exc:
            self.drops[f"malformed: {exc.reason}"] += 1
            return None
        if message.method != BINDING or message.cls not in (StunClass.SUCCESS, StunClass.ERROR):
            self.drops["not a Binding response"] += 1
            return None
        transaction = self._transactions.get(message.transaction_id)
        if transaction is None:
            self.drops["unknown transaction"] += 1
            return None
        if not isinstance(source, TransportAddress):
            source = TransportAddress.of(*source[:2])  # (host, port[, flowinfo, scope_id])
        if source.unmapped() != transaction.server:
            self.drops["response from another address"] += 1
            return None
        del self._transactions[message.transaction_id]
        outcome: Outcome
        failure = self._failure_reason(message)
        if failure is not None:
            outcome = BindingFailure(transaction.server, failure, transaction.transmissions,
                                     transaction.transaction_id)
        else:
            assert message.mapped_address is not None
            outcome = BindingResult(transaction.server, message.mapped_address, now - transaction.sent_at,
                                    transaction.transmissions, transaction.transaction_id)
        self._completed.append(outcome)
        return outcome

    @staticmethod
    def _failure_reason(message: StunMessage) -> str | None:
        if message.cls == StunClass.ERROR:
            error = message.error_code
            return f"error response {error.code} {error.reason}".rstrip() if error else "error response"
        if message.unknown_required:
            codes = ", ".join(f"{code:#06x}" for code in message.unknown_required)
            return f"response with unknown comprehension-required attributes {codes}"
        if message.mapped_address is None:
            return "response without a mapped address"
        return None

    def take_completed(self) -> list[Outcome]:
        """The outcomes since the last call, each reported once."""
        done, self._completed = self._completed, []
        return done


class MappingBehavior(Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class MappingReport:
    """How this socket's NAT maps it, as the agent reports it.

    ``reflexive`` is the public address when the mapping is endpoint-independent (the one
    peers can use), else None; ``behind_nat`` is whether a reflexive address differs from
    every local address given (None when none were given or no server answered)."""

    behavior: MappingBehavior
    reflexive: TransportAddress | None
    behind_nat: bool | None
    reason: str
    results: tuple[BindingResult, ...] = ()
    failures: tuple[BindingFailure, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "mapping": self.behavior.value,
            "reflexive": str(self.reflexive) if self.reflexive else None,
            "behind_nat": self.behind_nat,
            "reason": self.reason,
            "servers": [{"server": str(r.server), "reflexive": str(r.reflexive), "rtt_ms": round(r.rtt * 1000, 3)}
                        for r in self.results]
            + [{"server": str(f.server), "error": f.reason} for f in self.failures],
        }


def classify_mapping(outcomes: Iterable[Outcome], local: Iterable[TransportAddress] = ()) -> MappingReport:
    """Classify the mapping from Binding outcomes of several servers, all sent from one socket.

    Two servers on different IP addresses must have answered (per address family) to tell;
    any two that saw different reflexive addresses or ports mean endpoint-dependent mapping."""
    outcomes = list(outcomes)
    results = tuple(o for o in outcomes if isinstance(o, BindingResult))
    failures = tuple(o for o in outcomes if isinstance(o, BindingFailure))
    locals_ = {address.unmapped() for address in local}
    behind_nat = None
    if locals_ and results:
        behind_nat = any(r.reflexive not in locals_ for r in results)

    def report(behavior: MappingBehavior, reflexive: TransportAddress | None, reason: str) -> MappingReport:
        return MappingReport(behavior, reflexive, behind_nat, reason, results, failures)

    by_family: dict[int, list[BindingResult]] = {}
    for result in results:
        by_family.setdefault(result.reflexive.ip.version, []).append(result)
    for family, group in sorted(by_family.items()):
        seen = sorted({r.reflexive for r in group})
        if len(seen) > 1:
            servers = ", ".join(f"{r.server} saw {r.reflexive}" for r in group)
            return report(MappingBehavior.ENDPOINT_DEPENDENT, None,
                          f"IPv{family} mapping varies by destination: {servers}")
    for family, group in sorted(by_family.items()):
        if len({r.server.ip for r in group}) >= 2:
            reflexive = group[0].reflexive
            return report(MappingBehavior.ENDPOINT_INDEPENDENT, reflexive,
                          f"{len(group)} servers on {len({r.server.ip for r in group})} addresses "
                          f"all saw {reflexive}")
    if not results:
        why = "; ".join(f"{f.server}: {f.reason}" for f in failures) or "no server was queried"
        return report(MappingBehavior.UNKNOWN, None, f"no STUN server answered ({why})")
    return report(MappingBehavior.UNKNOWN, None,
                  "fewer than two servers on different addresses answered; the mapping cannot be told")
