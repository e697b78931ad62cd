# Evaluation-only nixpkgs for tests/test_nix_args.py: makeDiskImage's wiring with fake store paths,
# nothing built. Each pkgs function records what it was called with, so tests can check the wiring.
# `touchOVMF = false` makes pkgs.OVMF throw, proving the default firmware is only forced when needed.
{
  touchOVMF ? true,
  grub ? {
    enable = true;
    devices = [ "/dev/vda" ];
  },
}:
let
  store = name: "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
  drv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = store name;
    }
    // extra;
  lib = import ./nixpkgs-stub/lib.nix { nixosSystem = null; };
  pkgs = {
    inherit lib;
    path = store "nixpkgs-source";
    OVMF =
      if touchOVMF then
        {
          fd = {
            firmware = store "OVMF-fd/FV/OVMF_CODE.fd";
            variables = store "OVMF-fd/FV/OVMF_VARS.fd";
          };
        }
      else
        throw "pkgs.OVMF was forced";
    closureInfo = { rootPaths }: drv "closure-info" { inherit rootPaths; };
    writeText = name: text: drv name { inherit text; };
    runCommand =
      name: env: buildCommand:
      drv name ({ inherit env buildCommand; } // (env.passthru or { }));
    vmTools.runInLinuxVM = d: d // { inVM = true; };
    python3Packages = {
      buildPythonApplication = a: drv "${a.pname}-${a.version}" { };
      setuptools = null;
      jinja2 = null;
      jsonschema = null;
      pyparted = null;
    };
    e2fsprogs = drv "e2fsprogs" { };
    dosfstools = drv "dosfstools" { };
    mtools = drv "mtools" { };
    util-linux = drv "util-linux" { };
    qemu-utils = drv "qemu-utils" { };
    nix = drv "nix" { };
    fakeroot = drv "fakeroot" { };
    btrfs-progs = drv "btrfs-progs" { };
    xfsprogs = drv "xfsprogs" { };
    erofs-utils = drv "erofs-utils" { };
    squashfsTools = drv "squashfs-tools" { };
    libfaketime = drv "libfaketime" { };
  };
  config = {
    system.build.toplevel = drv "nixos-system-test" { };
    system.build.nixos-enter = drv "nixos-enter" { };
    system.nixos = {
      version = "25.11.0";
      versionSuffix = ".8fd9daa";
    };
    boot.loader.grub = grub;
  };
in
{
  inherit pkgs lib config store;
  toplevel = config.system.build.toplevel.outPath;
  channel = store "nixos-25.11.0";
}
