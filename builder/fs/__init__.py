"""Root and boot filesystems: one module per filesystem, and the two ways a root is built (in place, placed)."""
