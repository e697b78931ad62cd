# systemd-boot without the build VM: the spec's bootLoader.systemdBoot section (builder/spec.schema.json),
# read from the configuration as nixpkgs' systemd-boot.nix reads it for systemd-boot-builder.py, and why
# the VM is still needed when the section cannot be given. Builtins only (evaluates without nixpkgs).
#
# prepare then writes the ESP (and XBOOTLDR) from the system's bootspec ($toplevel/boot.json) and these
# options (builder/boot/systemd_boot.py). What needs programs of the system itself keeps the VM, where the system's
# own switch-to-configuration runs: extraInstallCommands (shell run by the installer), boot.initrd.secrets
# (append-initrd-secrets), extraEfiDrivers (left to the installer, whose placement of them is not
# reproduced here).
{
  config,
  # The configuration's platform (config.nixpkgs.hostPlatform.system), e.g. "aarch64-linux".
  targetSystem,
}:
let
  inherit (builtins) concatStringsSep mapAttrs;
  cfg = config.boot.loader.systemd-boot or { };
  efi = config.boot.loader.efi or { };
  enabled = cfg.enable or false;

  # bootctl's EFI architecture names (nixpkgs' lib.systems calls them efiArch).
  efiArchs = {
    x86_64-linux = "x64";
    i686-linux = "ia32";
    aarch64-linux = "aa64";
    armv7l-linux = "arm";
    armv6l-linux = "arm";
    riscv64-linux = "riscv64";
    loongarch64-linux = "loongarch64";
  };
  efiArch =
    config.nixpkgs.hostPlatform.efiArch
      or (if targetSystem == null then null else efiArchs.${targetSystem} or null);

  nonEmpty = name: value: if value != { } && value != "" && value != null then [ name ] else [ ];
  # Each specialisation's own evaluated configuration (nixpkgs' specialisation.nix reads
  # childConfig.configuration.system.build.toplevel the same way): systemd-boot-builder.py runs the
  # append-initrd-secrets of every specialisation's bootspec too.
  specialisations = config.specialisation or { };
  vmReasons =
    nonEmpty "boot.loader.systemd-boot.extraInstallCommands" (cfg.extraInstallCommands or "")
    ++ nonEmpty "boot.initrd.secrets" (config.boot.initrd.secrets or { })
    ++ builtins.concatMap (
      name:
      nonEmpty "specialisation.${name}.configuration.boot.initrd.secrets" (
        specialisations.${name}.configuration.boot.initrd.secrets or { }
      )
    ) (builtins.attrNames specialisations)
    ++ nonEmpty "boot.loader.systemd-boot.extraEfiDrivers" (cfg.extraEfiDrivers or { })
    ++ (if efiArch == null then [ "no EFI architecture is known for ${toString targetSystem}" ] else [ ]);

  # nixpkgs: timeout = if config.boot.loader.timeout == null then "menu-force" else config.boot.loader.timeout.
  timeout = config.boot.loader.timeout or 5;
in
{
  inherit enabled vmReasons;
  # Why the system's own installer must run (for messages), when systemd-boot is enabled.
  reason = "systemd-boot with ${concatStringsSep ", " vmReasons} (only the system's own installer can do that)";
  section =
    if !enabled || vmReasons != [ ] then
      null
    else
      {
        # The binary `bootctl install` copies, from the system's own systemd.
        efiBinary = "${config.systemd.package}/lib/systemd/boot/efi/systemd-boot${efiArch}.efi";
        efiSysMountPoint = efi.efiSysMountPoint or "/boot";
        xbootldrMountPoint = cfg.xbootldrMountPoint or null;
        distroName = config.system.nixos.distroName or "NixOS";
        timeout = if timeout == null then "menu-force" else timeout;
        editor = cfg.editor or true;
        consoleMode = cfg.consoleMode or "keep";
        rebootForBitlocker = cfg.rebootForBitlocker or false;
        # Store paths as strings (with their context: the spec file depends on them).
        extraFiles = mapAttrs (_: source: "${source}") (cfg.extraFiles or { });
        extraEntries = cfg.extraEntries or { };
      };
}
