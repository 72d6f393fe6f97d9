"""entra-authz: an Envoy external-authorization service for Microsoft Entra ID access tokens."""

__version__ = "0.1.0"
