# vmTools.runInLinuxVM's host side in the nixpkgs stand-in, in nixpkgs' order: preVM (same shell, so
# diskImage it sets is seen), the original builder as root in a VM with $diskImage as /dev/vda, postVM.
PATH=
for p in $nativeBuildInputs; do
  PATH=${PATH:+$PATH:}$p/bin
done
export PATH=${PATH:+$PATH:}$hostPath
eval "$preVM"
if [ -z "$vmRunner" ]; then
  echo "nixpkgs stand-in: no VM stand-in configured; this image needs a VM" >&2
  exit 1
fi
# The VM stand-in boots a kernel with the host store shared, attaches $diskImage as /dev/vda and
# runs the original builder with this derivation's environment; it exits with the guest's status.
$vmRunner --disk "$diskImage" --mem "$memSize" -- "$origBuilder" $origArgs
eval "$postVM"
