"""Development tools: the Entra-shaped local issuer (``authz.dev.idp``), the echo backend
(``authz.dev.echo``), the local stack the tests and the bench start (``authz.dev.stack``) and the
demo (``authz.dev.demo``). For development, demos and tests only.

NOT FOR PRODUCTION. Production code (``authz.identity``, ``authz.server``, ``authz.engine``, ...)
never imports this package (tests/unit/test_import_graph.py enforces it); ``authz.cli`` loads it
only inside the functions that run the dev subcommands (``dev-idp``, ``echo``, ``demo``).

Must not be imported by: any production module.
"""
