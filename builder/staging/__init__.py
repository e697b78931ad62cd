"""Staging the image tree: contents, the Nix state, store placeholders, and measuring it for sizing."""
