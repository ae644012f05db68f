"""The pure control core: the orchestrator's decisions as state machines.

:class:`~haif.control.core.ControlCore` is the decision loop (admission,
placement, retries, dead letters); :class:`~haif.control.presence.Presence`
judges workers from their heartbeats (stale, evicted, rejoined). Both shells
drive the same objects.
"""
