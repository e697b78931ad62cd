# nixos-enter's stand-in (nixpkgs-notes §4.2): needs /etc/NIXOS, binds /dev and /sys, mounts /proc,
# runs the system's activate, then runs the command chrooted. Usage: nixos-enter --root DIR -- CMD...
set -eu
# Like nixos-enter: a private mount and pid namespace, so the mounts below vanish when it exits.
if [ -z "${NIXOS_ENTER_REEXEC:-}" ]; then
  NIXOS_ENTER_REEXEC=1 exec unshare --fork --mount --mount-proc --pid -- "$0" "$@"
fi
mount --make-rprivate /
root=/mnt
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "nixos-enter stand-in: unsupported option $1" >&2; exit 1 ;;
  esac
done
if [ ! -e "$root/etc/NIXOS" ]; then
  echo "$root does not look like a NixOS installation - missing /etc/NIXOS" >&2
  exit 126
fi
mkdir -p "$root/dev" "$root/sys" "$root/proc"
mountpoint -q "$root/dev" || mount --rbind /dev "$root/dev"
mountpoint -q "$root/sys" || mount --rbind /sys "$root/sys"
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
system=/nix/var/nix/profiles/system
IN_NIXOS_ENTER=1 chroot "$root" "$system/activate" 1>&2 || true
exec chroot "$root" "$@"
