# The example NixOS system built into the project's main image (`nix build .#image`).
{ modulesPath, ... }:
{
  imports = [
    (modulesPath + "/profiles/minimal.nix")
    # virtio drivers in the initrd: the image boots as a virtio disk (the VM test, qemu, most clouds).
    (modulesPath + "/profiles/qemu-guest.nix")
  ];

  boot.loader.grub.device = "/dev/vda";
  boot.kernelParams = [ "console=ttyS0" ];
  boot.growPartition = true;
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };

  services.getty.autologinUser = "root";
  networking.hostName = "mdi-example";
  system.stateVersion = "25.11";
}
