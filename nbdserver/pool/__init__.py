"""The on-disk pool: superblock, journal, page cache, space maps, volume catalog."""
