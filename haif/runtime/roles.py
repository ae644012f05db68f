"""Who may call which RPC method: roles from the keyring, one table per service.

A sealed call proves which key sent it (:mod:`haif.runtime.rpc`); this
module says what that key may do. A key's role comes from the name it is
trusted under in the keyring (its file's stem, see
:mod:`haif.runtime.cluster_keys`): ``gateway``, ``orchestrator`` and
``admin`` and ``monitor`` (or those words followed by ``-`` and anything,
for several of a kind, e.g. ``gateway-eu``), and any other name is a
worker's id. Under mutual TLS (:mod:`haif.runtime.cluster_tls`) the role is
written in the caller's certificate, and must be the one its name implies.
``monitor`` may call no RPC method: it is the identity that health checks
and Prometheus scrape internal ports with.

=====================  =========================================================
method                 roles allowed
=====================  =========================================================
orchestrator:
``submit``             gateway, admin
``submit_stream``      gateway
``auth_key``           gateway
``heartbeat``          worker (and only as itself: the orchestrator checks the id)
``status``             gateway, admin
``dlq_*``              admin
``keys_*``             admin
worker:
``infer``,             orchestrator
``infer_stream``
=====================  =========================================================

A method not in its table is refused to every role, so a new method is
closed until someone decides who may call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Role(StrEnum):
    GATEWAY = "gateway"
    ORCHESTRATOR = "orchestrator"
    ADMIN = "admin"
    WORKER = "worker"
    MONITOR = "monitor"


_SERVICES = (Role.GATEWAY, Role.ORCHESTRATOR, Role.ADMIN, Role.MONITOR)

_GW, _ORCH, _ADMIN, _WORKER = Role.GATEWAY, Role.ORCHESTRATOR, Role.ADMIN, Role.WORKER

ORCHESTRATOR_METHODS: Mapping[str, frozenset[Role]] = {
    "submit": frozenset({_GW, _ADMIN}),
    "submit_stream": frozenset({_GW}),
    "auth_key": frozenset({_GW}),
    "heartbeat": frozenset({_WORKER}),
    "status": frozenset({_GW, _ADMIN}),
    "dlq_list": frozenset({_ADMIN}),
    "dlq_show": frozenset({_ADMIN}),
    "dlq_replay": frozenset({_ADMIN}),
    "keys_add": frozenset({_ADMIN}),
    "keys_list": frozenset({_ADMIN}),
    "keys_revoke": frozenset({_ADMIN}),
}

WORKER_METHODS: Mapping[str, frozenset[Role]] = {
    "infer": frozenset({_ORCH}),
    "infer_stream": frozenset({_ORCH}),
}


def role_of(name: str) -> Role:
    """The role of a key trusted under ``name``."""
    for role in _SERVICES:
        if name == role.value or name.startswith(f"{role.value}-"):
            return role
    return Role.WORKER


def allowed(table: Mapping[str, frozenset[Role]], method: str, name: str) -> bool:
    """May the key named ``name`` call ``method`` of a service with this ``table``?"""
    roles = table.get(method)
    return roles is not None and role_of(name) in roles
