"""Bootloaders installed on the host, without the build VM: systemd-boot from the system's bootspec."""
