# Evaluation-only nixpkgs for tests/test_nix_args.py: makeDiskImage's wiring with fake store paths,
# nothing built. Each pkgs function records what it was called with, so tests can check the wiring.
# `touchOVMF = false` makes pkgs.OVMF throw, proving the default firmware is only forced when needed.
{
  touchOVMF ? true,
  # The default configuration is a GRUB system whose install needs the build VM (an extraInstallCommands only
  # install-grub.pl runs): most tests here look at the VM derivation. GRUB at grub.nix's defaults (enable,
  # devices) is installed by prepare instead (nix/grub.nix; tests/test_nix_grub.py passes it explicitly).
  grub ? {
    enable = true;
    devices = [ "/dev/vda" ];
    extraInstallCommands = "echo the build VM installs GRUB";
  },
  limine ? { },
  # Whether pkgs has nixos-enter (nixpkgs 25.11 does; config.system.build.nixos-enter is deprecated there).
  nixosEnterPackage ? true,
  smm ? false,
  # boot.loader.systemd-boot and boot.loader.efi of the configuration (systemd-boot when enable = true).
  systemdBoot ? { },
  efi ? { },
  # config.boot.loader.timeout when not null-or-absent ("absent": NixOS's default, 5), boot.initrd.secrets.
  loaderTimeout ? "absent",
  initrdSecrets ? { },
  # config.specialisation: name -> that specialisation's boot.initrd.secrets (its evaluated configuration).
  specialisations ? { },
  # pkgs.stdenv.hostPlatform.system and config.nixpkgs.hostPlatform.system (null: attribute absent).
  buildSystem ? null,
  targetSystem ? "x86_64-linux",
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
  # The system's own package set, as nixos/modules/misc/nixpkgs.nix gives it to every module
  # (config._module.args.pkgs): nixpkgs' grub.nix takes GRUB from it (realGrub = grubPkgs.grub2) and its EFI
  # variant by `realGrub.override { efiSupport = cfg.efiSupport; }` (another store path, the same name).
  systemPkgs = {
    grub2 = drv "grub-2.12" {
      pname = "grub";
      version = "2.12";
      override =
        a:
        if a == { efiSupport = true; } then
          drv "grub-2.12" {
            pname = "grub";
            version = "2.12";
            outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" "grub-2.12-efi")}-grub-2.12";
          }
        else
          throw "fake-nixpkgs: grub2.override called with an unexpected argument";
    };
  };
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
    # The build platform's GRUB, whose grub-mkimage makes a cross image's GRUB (nix/grub.nix).
    grub2 = drv "grub-2.12-build" { };
    stdenv = (if buildSystem == null then { } else { hostPlatform.system = buildSystem; }) // {
      initialPath = map (n: drv n { }) [ "coreutils" "findutils" "diffutils" "gnused" "gnugrep" "gawk" "gnutar" "gzip" "bzip2" "gnumake" "bash" "patch" "xz" "file" ];
    };
  }
  // (if nixosEnterPackage then { nixos-enter = drv "nixos-enter" { }; } else { });
  config = {
    _module.args.pkgs = systemPkgs;
    system.build.toplevel = drv "nixos-system-test" { };
    system.build.nixos-enter = drv "nixos-enter-from-config" { };
    system.nixos = {
      version = "25.11.0";
      versionSuffix = ".8fd9daa";
    };
    boot.loader = {
      inherit grub limine efi;
      systemd-boot = systemdBoot;
    }
    // (if loaderTimeout == "absent" then { } else { timeout = loaderTimeout; });
    boot.initrd.secrets = initrdSecrets;
    specialisation = builtins.mapAttrs (_: secrets: {
      inheritParentConfig = true;
      configuration.boot.initrd.secrets = secrets;
    }) specialisations;
    systemd.package = drv "systemd-258.2" { };
  }
  // (if targetSystem == null then { } else { nixpkgs.hostPlatform.system = targetSystem; });
in
{
  inherit pkgs lib config store;
  toplevel = config.system.build.toplevel.outPath;
  channel = store "nixos-25.11.0";
}
