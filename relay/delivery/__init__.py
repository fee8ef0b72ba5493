"""Outbound delivery: MX resolution, TLS, one SMTP conversation, one domain, the worker."""
