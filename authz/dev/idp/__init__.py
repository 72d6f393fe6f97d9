"""The Entra-shaped local issuer: for development, demos and tests only.

NOT FOR PRODUCTION. Production code never imports it (see ``authz.dev``): it mints any token
anyone asks for.

Must not import: the production packages.
"""

from authz.dev.idp.server import CONTOSO, FABRIKAM, MSA_TENANT, DevIdP

__all__ = ["CONTOSO", "FABRIKAM", "MSA_TENANT", "DevIdP"]
