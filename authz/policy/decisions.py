"""Turning outcomes into ``Decision`` objects: allow with the identity-header contract, deny with
the right challenge and JSON body, and the explicit fail-closed internal error.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import json
from types import MappingProxyType

from authz.policy.errors import MEANING, Code
from authz.policy.model import Decision


def internal_error(decision_id: str, request_id: str = "") -> Decision:
    """The explicit deny for any unexpected failure: 503 ``internal_error``, never an allow."""
    body = json.dumps(
        {
            "error": "temporarily_unavailable",
            "code": Code.INTERNAL_ERROR.value,
            "request_id": request_id,
        },
        separators=(",", ":"),
    ).encode()
    return Decision(
        allowed=False,
        status=503,
        code=Code.INTERNAL_ERROR.value,
        reason=MEANING[Code.INTERNAL_ERROR],
        decision_id=decision_id,
        response_headers=(("content-type", "application/json"),),
        body=body,
        metadata=MappingProxyType({"decision_id": decision_id, "code": Code.INTERNAL_ERROR.value}),
    )
