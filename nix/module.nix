# NixOS module: makeDiskImage.* options mirror the function's arguments; with makeDiskImage.enable it
# sets system.build.diskImage (off by default, so importing the module into a configuration that defines
# system.build.diskImage itself, as many do, changes nothing).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.makeDiskImage;
  argsLib = import ./args;
  inherit (lib) mkOption types;
  opt =
    type: default: description:
    mkOption { inherit type default description; };
  # Options left at null are not passed, so the function's own defaults (and their dependencies) apply.
  nullable = type: description: mkOption {
    type = types.nullOr type;
    default = null;
    inherit description;
  };
  d = argsLib.defaults;
  passed = lib.filterAttrs (n: v: n != "enable" && v != null) cfg;
in
{
  options.makeDiskImage = {
    enable = lib.mkEnableOption "building the system as a disk image in system.build.diskImage with makeDiskImage";
    diskSize = opt (types.oneOf [
      (types.enum [ "auto" ])
      types.ints.positive
      (types.strMatching "[0-9]+")
    ]) d.diskSize "Disk size in MiB, or \"auto\".";
    additionalSpace = opt types.str d.additionalSpace "Free space added when diskSize = \"auto\" (IEC size).";
    bootSize = opt types.str d.bootSize "END offset of the boot partition (IEC size).";
    contents = opt (types.listOf (types.attrsOf types.anything)) d.contents
      "Files to place in the image: { source, target, mode?, user?, group? }.";
    partitionTableType = opt (types.enum argsLib.tableTypes) d.partitionTableType "Partition layout.";
    installBootLoader = opt types.bool d.installBootLoader "Run switch-to-configuration boot in the image.";
    touchEFIVars = opt types.bool d.touchEFIVars "Give the VM UEFI pflash and copy the variables to $out/efi-vars.fd.";
    # Any attribute set, as the function takes (it reads firmware, variables and systemManagementModeRequired).
    OVMF = nullable types.attrs "OVMF output providing firmware and variables (default pkgs.OVMF.fd).";
    efiFirmware = nullable types.path "UEFI firmware code image (default OVMF.firmware).";
    efiVariables = nullable types.path "UEFI variables template (default OVMF.variables).";
    fsType = opt (types.enum argsLib.fsTypes) d.fsType "Root filesystem type.";
    label = nullable types.str "Root filesystem label (default \"nixos\", \"nix-store\" with onlyNixStore).";
    configFile = nullable types.path "File copied to /etc/nixos/configuration.nix.";
    postVM = opt types.lines d.postVM "Shell run after the image is in $out; $diskImage names it.";
    memSize = opt (types.either types.ints.positive (types.strMatching "[0-9]+")) d.memSize
      "VM memory in MiB (a string of digits too, as nixpkgs reads it through toString).";
    onlyNixStore = opt types.bool d.onlyNixStore "The image holds only the Nix store.";
    name = opt types.str d.name "Derivation name.";
    baseName = opt types.str d.baseName "Output file base name.";
    format = opt (types.enum argsLib.formats) d.format "Image format (qemu-img name; qcow2-compressed, vpc -> .vhd).";
    deterministic = opt types.bool d.deterministic "Fixed disk/partition GUIDs and filesystem UUID.";
    rootGPUID = opt types.str d.rootGPUID "GPT partition GUID of the root partition.";
    rootFSUID = nullable types.str "Root filesystem UUID (default rootGPUID for ext4).";
    copyChannel = opt types.bool d.copyChannel "Install a nixos channel made from pkgs.path.";
    shareRootFilesystem = opt types.bool d.shareRootFilesystem
      "Build the root filesystem as its own derivation, shared by images of this system that differ only in format or table.";
    additionalPaths = opt (types.listOf (types.either types.package types.path)) d.additionalPaths "More store paths (with closure) in the image store.";
  };

  config = lib.mkIf cfg.enable {
    system.build.diskImage = import ./make-disk-image.nix ({ inherit pkgs lib config; } // passed);
  };
}
