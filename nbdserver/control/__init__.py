"""Managing pools: the operations, and the control socket of a running server.

A pool is locked while a server has it open, so the CLI cannot open it too.
Instead the server listens on a control socket per open pool, found from the
pool's UUID (readable without the lock): the CLI sends the same operation
there, and the server runs it on its live pool. That is how a running VM's
disk is forked without stopping it.
"""
