"""SMTP TLS Reporting (RFC 8460), the sending side: count sessions, build and send reports.

Knows TLSRPT only: the `_smtp._tls` record, per-day session counters, the §4 JSON report,
its mail and HTTPS forms. Never imports `relay` or `mailqueue`; of `policy` only its model.
"""
