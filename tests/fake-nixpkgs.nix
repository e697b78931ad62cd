# Evaluation-only nixpkgs for tests/test_nix_args.py: makeDiskImage's wiring with fake store paths,
# nothing built. Each pkgs function records what it was called with, so tests can check the wiring.
# `touchOVMF = false` makes pkgs.OVMF throw, proving the default firmware is only forced when needed.
{
  touchOVMF ? true,
  grub ? {
    enable = true;
    devices = [ "/dev/vda" ];
  },
  limine ? { },
  # Whether pkgs has nixos-enter (nixpkgs 25.11 does; config.system.build.nixos-enter is deprecated there).
  nixosEnterPackage ? true,
  smm ? false,
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
            systemManagementModeRequired = smm;
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
    rsync = drv "rsync" { };
    parted = drv "parted" { };
    gptfdisk = drv "gptfdisk" { };
    systemdMinimal = drv "systemd-minimal" { };
    stdenv.initialPath = map (n: drv n { }) [ "coreutils" "findutils" "diffutils" "gnused" "gnugrep" "gawk" "gnutar" "gzip" "bzip2" "gnumake" "bash" "patch" "xz" "file" ];
  }
  // (if nixosEnterPackage then { nixos-enter = drv "nixos-enter" { }; } else { });
  config = {
    system.build.toplevel = drv "nixos-system-test" { };
    system.build.nixos-enter = drv "nixos-enter-from-config" { };
    system.nixos = {
      version = "25.11.0";
      versionSuffix = ".8fd9daa";
    };
    boot.loader.grub = grub;
    boot.loader.limine = limine;
  };
in
{
  inherit pkgs lib config store;
  toplevel = config.system.build.toplevel.outPath;
  channel = store "nixos-25.11.0";
}
