#!/bin/sh
# Run a command where /nix/store is the benchmark closure's store, whether or not this host has a /nix/store
# (Debian's nix-bin makes one only at its first build). Run as root inside a private mount namespace:
#   unshare --mount --propagation private sh bench/storeview.sh STORE VIEW -- COMMAND...
# A tmpfs on the empty directory VIEW becomes the new root: each entry of the host's / but /nix is bound there
# (symlinks copied), nix/store is made on it with STORE bound over it, and COMMAND runs with it as its root
# (pivot_root) in the same working directory. The host's own /nix (if any) is not seen, as in a Nix build sandbox; nothing on the
# host changes and the mounts die with the namespace.
set -eu
store=$1 view=$2 cwd=$PWD
[ "$3" = -- ] || { echo "usage: storeview.sh STORE VIEW -- COMMAND..." >&2; exit 2; }
shift 3
mount -t tmpfs -o mode=0755 storeview "$view"
for entry in /* /.[!.]*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  name=${entry#/}
  [ "$name" = nix ] && continue
  if [ -L "$entry" ]; then
    ln -s "$(readlink "$entry")" "$view/$name"
  elif [ -d "$entry" ]; then
    mkdir "$view/$name" && mount --rbind "$entry" "$view/$name"
  else
    : > "$view/$name" && mount --bind "$entry" "$view/$name"
  fi
done
mkdir -p "$view/nix/store"
mount --bind "$store" "$view/nix/store"
# pivot_root, not chroot: the kernel refuses a user namespace to a chrooted process (EPERM), and the builder,
# finding none, copies the whole closure into its staging root instead of binding it (a 2-4x slower build).
mkdir "$view/.old-root"
cd "$view"
pivot_root . .old-root
umount --lazy /.old-root
rmdir /.old-root
exec /bin/sh -c 'cd "$0" && exec "$@"' "$cwd" "$@"
