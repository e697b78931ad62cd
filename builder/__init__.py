"""makeDiskImage's builder: turns one JSON spec into a NixOS disk image."""
