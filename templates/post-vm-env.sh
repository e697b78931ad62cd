# Sourced before the user's postVM runs (by the Nix derivation and by `python -m builder build`).
# nixpkgs' make-disk-image.nix defines these in the same shell before postVM, and real postVM scripts
# call them (e.g. `eval $(partx $diskImage -o START,SECTORS --nr 2 --pairs)` then `sectorsToBytes $START`):
# sector counts (512 bytes) to KiB or bytes, a sum of lines of numbers, nixpkgs' ext4 reserve estimate,
# and its round_to_nearest (which always adds one unit, even to an aligned value).
mebibyte=$((1024 * 1024))
sectorsToKilobytes() { echo $(($1 * 512 / 1024)); }
sectorsToBytes() { echo $(($1 * 512)); }
sum_lines() {
  local total=0 n
  while read -r n; do total=$((total + n)); done
  echo "$total"
}
compute_fudge() { echo $(($1 * 52 / 1000)); }
round_to_nearest() { echo $((($1 / $2 + 1) * $2)); }
