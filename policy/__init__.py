"""MTA-STS (RFC 8461) as a library: discover, fetch, parse, match, cache, resolve.

This package knows nothing about SMTP sessions, the mail queue or the relay: it answers
"which MTA-STS policy applies to this domain right now?" and "may this MX host be used?".
"""
