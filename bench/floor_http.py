"""The HTTP floor: our HTTP ext_authz server (``authz.server.http``) with a decision that costs
nothing: every check is answered with one constant allow (no identity headers), decided
synchronously like our fast path. What the transport alone costs: httptools parsing on uvloop,
one read and one write per check. ``python -m bench.floor_http PORT``.
"""

from __future__ import annotations

import sys

from authz.policy.model import Decision, RequestAttrs
from authz.server.http import HttpCheckServer
from bench._serve import until_sigterm

ALLOW = Decision(allowed=True, status=200, code="ok", reason="allowed", decision_id="floor")


def _now(attrs: RequestAttrs) -> Decision:
    return ALLOW


async def _check(attrs: RequestAttrs) -> Decision:
    return ALLOW


async def main(port: int) -> None:
    server = HttpCheckServer(_check, check_now=_now)
    await server.start("127.0.0.1", port)
    await until_sigterm(lambda: server.close(1.0))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1])))
