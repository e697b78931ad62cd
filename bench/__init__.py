"""Benchmark of the builder against systemd-repart, the seed's method and the mkfs.ext4 -d floor."""
