# The example NixOS system built into the project's main image (`nix build .#image`).
{ modulesPath, ... }:
{
  imports = [ (modulesPath + "/profiles/minimal.nix") ];

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
