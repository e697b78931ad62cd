"""The build VM: the in-VM finalize script, the runner standing in for vmTools, its initramfs, settling."""
