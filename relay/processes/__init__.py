"""`serve` on every core: one supervisor and `serve.processes` processes (relay/processes/).

The supervisor binds the listening sockets, takes the serve lock and opens the store once
(schema, leases a dead relay left), then forks the processes. Each one is a whole relay on
the shared sockets and the shared store (the kernel spreads connections; SQLite leases keep
one attempt per piece of work across processes); index 0 also runs the one-per-relay jobs.
The supervisor serves the one metrics endpoint (the processes' figures merged), forwards
signals, and when a process dies returns its leases to the queue at once and starts another.
"""
