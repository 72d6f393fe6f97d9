"""Compile once, at configuration time: the engine's constructor compiles every requirement,
header plan and challenge from the frozen settings; the policy modules keep no module-level
cache that a check fills (issue 14)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from authz import config as authz_config
from authz.engine import Engine
from authz.identity.entra import TokenVerifier
from authz.policy.decisions import ResponsePlan, www_authenticate
from authz.policy.errors import ClaimsChallenge, Code, Forbidden
from authz.policy.model import HeaderContract, RequestAttrs, Requirement

CLAIMS_C1 = '{"access_token":{"acrs":{"essential":true,"value":"c1"}}}'
POLICY = Path(__file__).resolve().parents[2] / "authz" / "policy"

CONFIG = """
issuers:
  - {name: contoso, tenant: 11111111-1111-4111-8111-111111111111}
apis:
  - name: orders
    audiences: [api://orders]
    issuers: [contoso]
    routes:
      - {name: read, path: /orders, require: {roles_any: [Orders.Read]}}
      - {name: ctx, path: /ctx, require: {auth_context: c1}}
      - {name: open, path: /open, require: anonymous}
"""


def _engine(settings: authz_config.Settings, env: SimpleNamespace, memory_keys: Any) -> Engine:
    verifier = TokenVerifier(settings.tokens, env.ISSUERS, memory_keys, clock=lambda: env.NOW)
    return Engine(settings, verifier)


def test_the_constructor_compiles_every_requirement(env: SimpleNamespace, memory_keys: Any) -> None:
    settings = authz_config.parse(CONFIG, env={})
    engine = _engine(settings, env, memory_keys)
    plan = engine.plans["orders"]
    assert [c.requirement for c in plan.requirements] == [r.require for r in plan.table.routes]
    # A requirement that cannot compile fails the build, not the first check.
    (api,) = settings.apis
    broken_route = dataclasses.replace(api.routes[0], require=Requirement(any_of=()))
    broken = dataclasses.replace(api, routes=(broken_route,))
    with pytest.raises(ValueError, match="at least one clause"):
        _engine(dataclasses.replace(settings, apis=(broken,)), env, memory_keys)


def test_the_constructor_renders_the_challenges(env: SimpleNamespace, memory_keys: Any) -> None:
    engine = _engine(authz_config.parse(CONFIG, env={}), env, memory_keys)
    responses = engine.plans["orders"].responses
    scope = Forbidden(Code.MISSING_ROLE, required_scope="Orders.Read")
    claims = ClaimsChallenge(Code.AUTH_CONTEXT_REQUIRED, CLAIMS_C1)
    for denial in (scope, claims, Forbidden(Code.MISSING_ROLE)):
        first = responses.challenge(denial)
        assert first is not None
        assert first is responses.challenge(denial)  # the value rendered at build time
        assert first == www_authenticate(denial, responses.api, responses.authorization_uri)


def test_a_data_derived_challenge_is_rendered_and_not_kept() -> None:
    plan = ResponsePlan(None, HeaderContract())
    revoked = ClaimsChallenge(Code.TOKEN_REVOKED, '{"access_token":{"nbf":{"value":"9"}}}')
    assert plan.challenge(revoked) == www_authenticate(revoked, None)
    assert plan.challenge(revoked) is not plan.challenge(revoked)  # nothing cached


def test_two_engines_never_share_compiled_state(env: SimpleNamespace, memory_keys: Any) -> None:
    """The same ApiSpec objects under two header contracts: each engine answers with its own."""
    settings = authz_config.parse(CONFIG, env={})
    renamed = dataclasses.replace(settings, headers=HeaderContract(user_id="x-caller"))
    assert renamed.apis is settings.apis
    first, second = _engine(settings, env, memory_keys), _engine(renamed, env, memory_keys)
    assert first.plans["orders"].responses is not second.plans["orders"].responses
    assert first.plans["orders"].requirements[0] is not second.plans["orders"].requirements[0]
    anonymous = RequestAttrs(method="GET", path="/open", context={"api": "orders"})
    removed_first = first.check(anonymous).remove_headers
    removed_second = second.check(anonymous).remove_headers
    assert "x-user-id" in removed_first
    assert "x-caller" not in removed_first
    assert "x-caller" in removed_second
    assert "x-user-id" not in removed_second


_MUTATORS = {"clear", "pop", "popitem", "setdefault", "update", "append", "__setitem__"}


def _module_caches(tree: ast.Module) -> set[str]:
    """Module-level names bound to a fresh dict/list/set that some function mutates."""
    containers: set[str] = set()
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Dict | ast.List | ast.Set):
            containers.add(target.id)
    mutated: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
        ):
            mutated.add(node.value.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _MUTATORS
            and isinstance(node.func.value, ast.Name)
        ):
            mutated.add(node.func.value.id)
    return containers & mutated


@pytest.mark.parametrize("module", sorted(p.name for p in POLICY.glob("*.py")))
def test_policy_modules_keep_no_module_level_cache(module: str) -> None:
    tree = ast.parse((POLICY / module).read_text(encoding="utf-8"))
    assert _module_caches(tree) == set()
