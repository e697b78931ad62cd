"""Tools around the build: inspecting images, checking reproducibility, pinning nixpkgs."""
