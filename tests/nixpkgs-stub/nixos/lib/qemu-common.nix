# nixpkgs' nixos/lib/qemu-common.nix in the stand-in: the same interface ({ lib, pkgs } -> qemuBinary,
# qemuSerialDevice) and the same answer for a Linux host: the guest platform's qemu with KVM when the
# machine has it and TCG otherwise.
{ lib, pkgs }:
{
  qemuSerialDevice = "ttyS0";
  qemuBinary =
    qemuPkg:
    let
      hostStdenv = qemuPkg.stdenv;
      guestSystem = pkgs.stdenv.hostPlatform.system;
      linuxHostGuestMatrix = {
        x86_64-linux = "${qemuPkg}/bin/qemu-system-x86_64 -machine accel=kvm:tcg -cpu max";
        aarch64-linux = "${qemuPkg}/bin/qemu-system-aarch64 -machine virt,gic-version=max,accel=kvm:tcg -cpu max";
      };
    in
    if hostStdenv.hostPlatform.isLinux then
      linuxHostGuestMatrix.${guestSystem} or "${qemuPkg}/bin/qemu-kvm"
    else
      throw "the stand-in's qemu-common only knows Linux hosts";
}
