"""The asyncio (uvloop) transport: listeners, connections, lifecycle. It only moves bytes."""
