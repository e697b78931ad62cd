"""Running tools unprivileged yet exact: user+mount namespaces, fakeroot/faketime, sorted copies, the stat shim."""
