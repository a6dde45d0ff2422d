"""Pluggable block maps: ``radix`` (Parallax), ``extent`` (extent lists), ``linear`` (LVM)."""

from nbdserver.blockmap.base import BlockMap, design, designs

__all__ = ["BlockMap", "design", "designs"]
