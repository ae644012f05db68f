"""The idempotency transition function, row by row (haif/control/idempotency.py)."""

from __future__ import annotations

import pytest

from haif.control.idempotency import Claim, Held, Next, StoreAnswer, next_step

KEYED = Claim("acme", "k1", "h1")
UNKEYED = Claim("acme", None, "h1")


def held(status: str = "running", tenant: str = "acme", key: str | None = "k1") -> Held:
    return Held(tenant, key, status)


@pytest.mark.parametrize(
    ("claim", "answer", "found", "here", "expected"),
    [
        # created: whatever the row says, the caller owns it
        (KEYED, "created", held("reserved"), False, Next.RUN),
        (UNKEYED, "created", held("reserved", key=None), False, Next.RUN),
        # the same key with another body
        (KEYED, "conflict", held("running"), False, Next.CONFLICT),
        (KEYED, "conflict", held("done"), True, Next.CONFLICT),
        # the same key and body
        (KEYED, "existing", held("running"), True, Next.ATTACH),
        (KEYED, "existing", held("reserved"), True, Next.ATTACH),
        (KEYED, "existing", held("done"), False, Next.REPLAY),
        (KEYED, "existing", held("failed"), False, Next.REPLAY),
        (KEYED, "existing", held("expired"), False, Next.RESERVE_AGAIN),
        (KEYED, "existing", held("running"), False, Next.WAIT),
        (KEYED, "existing", held("reserved"), False, Next.WAIT),
        # the id is another request's
        (KEYED, "existing", held("running", tenant="other"), False, Next.RENAME),
        (KEYED, "existing", held("done", key="k2"), False, Next.RENAME),
        (KEYED, "existing", held("running", key=None), True, Next.RENAME),
        (UNKEYED, "existing", held("done", key=None), False, Next.RENAME),
        (UNKEYED, "existing", held("running", key=None), True, Next.RENAME),
    ],
)
def test_next_step(
    claim: Claim, answer: StoreAnswer, found: Held, here: bool, expected: Next
) -> None:
    assert next_step(claim, answer, found, here) is expected


def test_every_outcome_is_reachable() -> None:
    outcomes = {
        next_step(c, a, held(s, t, k), here)
        for c in (KEYED, UNKEYED)
        for a in ("created", "existing", "conflict")
        for s in ("reserved", "running", "done", "failed", "expired")
        for t in ("acme", "other")
        for k in ("k1", "k2", None)
        for here in (False, True)
    }
    assert outcomes == set(Next)
