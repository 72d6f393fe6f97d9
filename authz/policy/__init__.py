"""authz.policy package."""
