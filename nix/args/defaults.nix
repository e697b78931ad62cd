# The arguments of nixpkgs' make-disk-image.nix with its defaults, and this project's own (shareRootFilesystem).
# label and rootFSUID are left out: their defaults depend on other arguments (see ./default.nix's normalize).
rec {
  defaults = {
    diskSize = "auto";
    additionalSpace = "512M";
    bootSize = "256M";
    contents = [ ];
    partitionTableType = "legacy";
    installBootLoader = true;
    touchEFIVars = false;
    OVMF = null;
    efiFirmware = null;
    efiVariables = null;
    fsType = "ext4";
    configFile = null;
    postVM = "";
    memSize = 1024;
    onlyNixStore = false;
    name = "nixos-disk-image";
    format = "raw";
    baseName = "nixos";
    deterministic = true;
    rootGPUID = "F222513B-DED1-49FA-B591-20CE86A2FE7F";
    copyChannel = true;
    additionalPaths = [ ];
    # Not in nixpkgs: the root filesystem as its own derivation, shared by the images that have the same one.
    shareRootFilesystem = false;
  };

  knownArgs = [
    "pkgs"
    "lib"
    "config"
    "label"
    "rootFSUID"
  ]
  ++ builtins.attrNames defaults;
}
