"""Issue 15, through the real Envoy on both transports: each kind of caller (a person, an agent
through its agent user account, an autonomous agent, an ordinary app) against routes that admit
people (``token_kind: user``), any non-agent (``authenticated``) and agents only
(``actor: agent``); the actor reaches the backend as ``x-actor-kind`` and a forged one never
does."""

from __future__ import annotations

import json
from typing import Any

import pytest

from authz.dev.stack import Stack

KINDS: dict[str, dict[str, Any]] = {
    "human-user": {},
    "agent-as-user": {"agent": "agent-user"},
    "agent-app": {"kind": "app", "agent": "autonomous", "roles": ["Orders.Read.All"]},
    "plain-app": {"kind": "app", "roles": ["Orders.Read.All"]},
}
ACTOR = {"human-user": "human", "agent-as-user": "agent", "agent-app": "agent", "plain-app": "app"}
# path -> the kinds it admits
ROUTES = {
    "/orders/1": {"human-user", "plain-app"},  # read: user + scope, or app + role; no agents
    "/orders/me/x": {"human-user", "plain-app"},  # authenticated: no agents by default
    "/orders/agents/x": {"agent-as-user", "agent-app"},  # actor: agent
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("path", sorted(ROUTES))
def test_each_kind_on_each_route(stack: Stack, kind: str, path: str) -> None:
    token = stack.mint(**KINDS[kind])
    reply = stack.request("GET", path, token=token, headers={"x-actor-kind": "human"})
    if kind in ROUTES[path]:
        assert reply.status == 200, reply.body
        assert reply.backend_headers["x-actor-kind"] == ACTOR[kind]  # ours, not the client's
        return
    assert reply.status == 403, reply.body
    assert json.loads(reply.body)["code"] == "actor_not_allowed"
    assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]


def test_a_forged_actor_header_never_reaches_the_backend(stack: Stack) -> None:
    reply = stack.request("GET", "/orders/healthz", headers={"x-actor-kind": "human"})
    assert reply.status == 200
    assert "x-actor-kind" not in reply.backend_headers


def test_the_actor_is_counted(stack: Stack) -> None:
    stack.request("GET", "/orders/agents/x", token=stack.mint(agent="on-behalf-of"))
    metrics = stack.metrics_text()
    assert 'authz_checks_by_actor_total{actor="agent",api="orders",decision="allow"}' in metrics
