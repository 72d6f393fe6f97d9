"""The Entra-shaped local issuer and the echo backend: for development, demos and tests only.

NOT FOR PRODUCTION. Production code (``authz.identity``, ``authz.server``, ``authz.engine``, ...)
must never import this package; it mints any token anyone asks for.

Must not import: the production packages.
"""

from authz.devidp.echo import EchoServer
from authz.devidp.server import CONTOSO, FABRIKAM, MSA_TENANT, DevIdP

__all__ = ["CONTOSO", "FABRIKAM", "MSA_TENANT", "DevIdP", "EchoServer"]
