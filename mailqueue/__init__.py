"""Durable mail queue: put, lease due work, record outcomes, retry schedule, admin.

Knows durability and scheduling only: nothing of TLS, MTA-STS or SMTP sessions.
"""

from mailqueue.ids import new_queue_id

__all__ = ["new_queue_id"]
