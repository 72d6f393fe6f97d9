"""authz.server package."""
