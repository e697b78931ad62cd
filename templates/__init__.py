"""The shell templates of the build (installed as the package builder.templates; data, not code)."""
