"""The disk around the filesystems: partition layout and table, sparse placement, formats and their identifiers."""
