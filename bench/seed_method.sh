#!/usr/bin/env bash
# The seed's (nixpkgs make-disk-image.nix) way of building an `efi` image, as far as Debian allows:
# staging copy of the closure (nixos-install's copy; rsync -a, no -H: NAR copies lose hard links),
# Nix DB via --load-db, the seed's auto-size formula on the staged root, truncate, parted,
# mkfs.ext4 -E offset, mkfs.vfat for the ESP (the seed does it in the VM), then a loop mount of the
# root partition and `cp -a` in place of lkl's cptofs, and tune2fs as the VM does. Needs root.
# Inputs (environment): TREE STAGE IMG MNT REG TOPLEVEL BOOT_MIB ADDITIONAL LABEL.
# Prints "BENCH-STEP <name> <seconds>" lines on stderr for bench.runner.
set -euo pipefail

t=$EPOCHREALTIME
mark() { local now=$EPOCHREALTIME; awk -v n="$now" -v t="$t" -v s="$1" 'BEGIN { printf "BENCH-STEP %s %.3f\n", s, n - t }' >&2; t=$now; }

mkdir -p "$STAGE/nix/store" "$MNT"
rsync -a "$TREE/nix/store/" "$STAGE/nix/store/"
mark stage-copy

nix-store --store "$STAGE" --load-db < "$REG"
mkdir -p "$STAGE/nix/var/nix/profiles" "$STAGE/etc"
ln -sfn "$TOPLEVEL" "$STAGE/nix/var/nix/profiles/system-1-link"
ln -sfn system-1-link "$STAGE/nix/var/nix/profiles/system"
touch "$STAGE/etc/NIXOS"
mark nix-db

# make-disk-image.nix's diskSize = "auto" (nixpkgs-notes §1.5), on the staged root.
round_to_nearest() { echo $(( ( $1 / $2 + 1) * $2 )); }
boot_bytes=$(( BOOT_MIB * 1024 * 1024 ))
reserved=$(( 512 * 34 + boot_bytes ))
additional=$(( $(numfmt --from=iec "$ADDITIONAL") + reserved ))
usage=$(cd "$STAGE" && find . ! -type d -print0 | du --files0-from=- --apparent-size --count-links --block-size 4096 | cut -f1 | awk '{s+=$1} END {print s+0}')
inodes=$(cd "$STAGE" && find . | wc -l)
usage=$(( (usage + 2 * inodes) * 4096 ))
fudge=$(( usage * 52 / 1000 ))
fs_needed=$(round_to_nearest $(( usage + fudge )) 4096)
disk=$(round_to_nearest $(( fs_needed + additional )) $(( 1024 * 1024 )))
echo "BENCH-SEED-SIZE $disk" >&2
mark size

truncate -s "$disk" "$IMG"
parted --script "$IMG" -- mklabel gpt mkpart ESP fat32 8MiB "${BOOT_MIB}MiB" set 1 boot on mkpart primary ext4 "${BOOT_MIB}MiB" -1
eval "$(partx "$IMG" -o START,SECTORS --nr 2 --pairs)"
root_off=$(( START * 512 )); root_len=$(( SECTORS * 512 ))
mkfs.ext4 -q -b 4096 -F -L "$LABEL" "$IMG" -E offset=$root_off $(( root_len / 1024 ))K
eval "$(partx "$IMG" -o START,SECTORS --nr 1 --pairs)"
mkfs.vfat -F 16 -n ESP --offset "$START" "$IMG" $(( SECTORS / 2 )) >/dev/null
mark partition-mkfs

loop=$(losetup -f --show -o "$root_off" --sizelimit "$root_len" "$IMG")
trap 'umount "$MNT" 2>/dev/null || true; losetup -d "$loop" 2>/dev/null || true' EXIT
mount "$loop" "$MNT"
cp -a "$STAGE"/. "$MNT"/
umount "$MNT"
tune2fs -c 0 -i 0 "$loop" >/dev/null
losetup -d "$loop"
trap - EXIT
mark copy-cp-a
