# vmTools.runInLinuxVM's host side in the nixpkgs stand-in, in nixpkgs' order (pkgs/build-support/vm/
# default.nix, vmRunCommand): PATH from the inputs and stdenv's initialPath only; preVM in this shell
# (so diskImage it sets is seen); with enableParallelBuilding one vCPU per build core added to QEMU_OPTS;
# the original builder as root in a VM with $diskImage as /dev/vda; a failing status ends the build;
# postVM only after success.
PATH=
for p in $nativeBuildInputs $buildInputs $initialPath; do
  PATH=${PATH:+$PATH:}$p/bin
done
export PATH
eval "$preVM"
if [ "$enableParallelBuilding" = 1 ]; then
  cpus=${NIX_BUILD_CORES:-0}
  if [ "$cpus" = 0 ]; then cpus=$(nproc); fi
  if [ "$cpus" -gt 255 ]; then cpus=255; fi
  QEMU_OPTS+=" -smp cpus=$cpus"
fi
if [ -z "$vmRunner" ]; then
  echo "nixpkgs stand-in: no VM stand-in configured; this image needs a VM" >&2
  exit 1
fi
# The VM stand-in boots a kernel with the host store shared, attaches $diskImage as /dev/vda and
# runs the original builder with this derivation's environment; it exits with the guest's status.
QEMU_OPTS=$QEMU_OPTS $vmRunner --disk "$diskImage" --mem "$memSize" -- "$origBuilder" $origArgs
eval "$postVM"
