"""The relay: configuration, SMTP listener, delivery worker, bounces, events, CLI.

Wires `policy` (MTA-STS) and `mailqueue` (durability) together; neither of those imports this.
"""

__version__ = "0.1.0"
