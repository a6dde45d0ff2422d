"""nbdserver: an NBD server that exports forkable volumes for virtual machines."""

__version__ = "0.1.0"
