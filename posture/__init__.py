"""The outbound TLS posture: how the relay's mail left, kept as bounded daily aggregates.

Knows only its own values (model), their counting and flushing (tally), their storage
behind a small interface (store), the report built from them (report) and its page
(page, chart). Imports nothing of `relay`, `mailqueue`, `policy` or `tlsrpt`.
"""
