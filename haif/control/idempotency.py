"""What a reserved request does next: the idempotency rules as one pure function.

Theory of operation
-------------------
Before a request runs, the orchestrator reserves a job row for it in the
metadata store, keyed by its request id and, when it carries one, by its
tenant's ``Idempotency-Key`` (the store makes the reservation atomic). What
the store answers, and whether the request already runs in this process,
decide what happens, and nothing else does:

======================  =======================  =================  ============
store says              job found                running here?      next
======================  =======================  =================  ============
created                 (the new row)            --                 RUN
conflict                same key, other body     --                 CONFLICT
existing                same key, same body      yes                ATTACH
existing                ... done / failed        no                 REPLAY
existing                ... expired              no                 RESERVE_AGAIN
existing                ... reserved / running   no                 WAIT
existing                another request's id     --                 RENAME
======================  =======================  =================  ============

``WAIT`` means the twin runs in another orchestrator (or was leaked by one
that died): the caller reads the job again later and decides again, until
it finished (``REPLAY``) or its lease lapsed and the reconciler expired it
(``RESERVE_AGAIN``, which releases the key). ``RENAME`` means the id is
taken by a request that is not this one (another tenant's, or an earlier
request without a key): the request is reserved again under a fresh id.

Pure: no clock, no I/O; the orchestrator (:mod:`haif.runtime.reservations`)
does the store calls and the waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

StoreAnswer = Literal["created", "existing", "conflict"]


class Next(StrEnum):
    """What the caller of a reservation does next (see the module's table)."""

    RUN = "run"
    ATTACH = "attach"
    REPLAY = "replay"
    CONFLICT = "conflict"
    WAIT = "wait"
    RESERVE_AGAIN = "reserve_again"
    RENAME = "rename"


@dataclass(frozen=True, slots=True)
class Claim:
    """Who reserves: the request's tenant, its ``Idempotency-Key`` and its body's digest."""

    tenant: str
    idempotency_key: str | None
    body_hash: str


@dataclass(frozen=True, slots=True)
class Held:
    """The job the store holds under the id or the key (what matters of it here)."""

    tenant: str
    idempotency_key: str | None
    status: str  # reserved | running | done | failed | expired


_FINISHED = frozenset({"done", "failed"})


def next_step(claim: Claim, answer: StoreAnswer, held: Held, running_here: bool) -> Next:
    """The one transition function of idempotent reservations (module docstring)."""
    if answer == "created":
        return Next.RUN
    same_key = (
        claim.idempotency_key is not None
        and held.tenant == claim.tenant
        and held.idempotency_key == claim.idempotency_key
    )
    if not same_key:
        return Next.RENAME
    if answer == "conflict":
        return Next.CONFLICT
    if running_here:
        return Next.ATTACH
    if held.status in _FINISHED:
        return Next.REPLAY
    if held.status == "expired":
        return Next.RESERVE_AGAIN
    return Next.WAIT
