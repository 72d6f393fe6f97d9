"""authz.identity package."""
