"""Tests for the makeDiskImage builder (pytest, real tools)."""
