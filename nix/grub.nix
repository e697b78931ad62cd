# GRUB without the build VM: the spec's bootLoader.grub section (builder/spec.schema.json), read from the
# configuration as nixpkgs' grub.nix hands it to install-grub.pl, and -- the one rule -- why the VM is still
# needed when the section cannot be given. Builtins only (evaluates without nixpkgs).
#
# prepare then writes grub.cfg, GRUB's files and the boot code (builder/boot/grub.py). What the host path
# does not reproduce keeps the VM, where the system's own switch-to-configuration runs install-grub.pl.
{
  config,
  # The normalized makeDiskImage arguments (partitionTableType, fsType, deterministic, ...).
  args,
  # The configuration's platform (config.nixpkgs.hostPlatform.system), e.g. "aarch64-linux".
  targetSystem,
  # Whether the image is built on another platform: grub-mkimage then comes from pkgs (the build platform).
  cross,
  pkgs,
}:
let
  inherit (builtins) concatStringsSep filter length;
  cfg = config.boot.loader.grub or { };
  efi = config.boot.loader.efi or { };
  enabled = cfg.enable or false;
  devices = filter (d: d != "nodev") (cfg.devices or [ ]);
  efiSupport = cfg.efiSupport or false;
  table = args.partitionTableType;
  biosTables = [ "legacy" "legacy+gpt" "hybrid" ];
  efiTables = [ "efi" "hybrid" ];
  onRoot = table == "legacy" || table == "legacy+gpt";
  package = cfg.package or null;

  given = name: value: if value != { } && value != "" && value != null && value != [ ] && value != false then [ name ] else [ ];
  # Every option the host path does not reproduce, by its NixOS name: the build log and the cross refusal name them.
  vmReasons =
    (if package == null then [ "boot.loader.grub.package (not a NixOS configuration's GRUB options)" ] else [ ])
    ++ given "boot.loader.grub.extraPrepareConfig" (cfg.extraPrepareConfig or "")
    ++ given "boot.loader.grub.extraInstallCommands" (cfg.extraInstallCommands or "")
    ++ given "boot.loader.grub.zfsSupport" (cfg.zfsSupport or false)
    ++ given "boot.loader.grub.useOSProber" (cfg.useOSProber or false)
    ++ given "boot.loader.grub.enableCryptodisk" (cfg.enableCryptodisk or false)
    ++ given "boot.loader.grub.copyKernels" (cfg.copyKernels or false)
    ++ given "boot.loader.grub.theme" (cfg.theme or null)
    ++ given "boot.loader.grub.users" (cfg.users or { })
    ++ given "boot.loader.grub.extraFiles" (cfg.extraFiles or { })
    ++ given "boot.loader.grub.extraGrubInstallArgs" (cfg.extraGrubInstallArgs or [ ])
    ++ given "boot.loader.grub.forceInstall" (cfg.forceInstall or false)
    ++ given "boot.loader.efi.canTouchEfiVariables" (efi.canTouchEfiVariables or false)
    ++ given "boot.initrd.secrets" (config.boot.initrd.secrets or { })
    ++ given "specialisation" (config.specialisation or { })
    ++ (if length (cfg.mirroredBoots or [ ]) > 1 then [ "boot.loader.grub.mirroredBoots (more than one)" ] else [ ])
    ++ (if length (cfg.mirroredBoots or [ ]) == 1 && ((builtins.head cfg.mirroredBoots).path or "/boot") != "/boot" then [ "boot.loader.grub.mirroredBoots.*.path other than /boot" ] else [ ])
    ++ (if length devices > 1 then [ "boot.loader.grub.devices (more than one disk)" ] else [ ])
    ++ (if (cfg.fsIdentifier or "uuid") == "provided" then [ "boot.loader.grub.fsIdentifier = \"provided\"" ] else [ ])
    ++ (if (config.boot.loader.timeout or 5) == null then [ "boot.loader.timeout = null" ] else [ ])
    ++ (if (cfg.storePath or "/nix/store") != "/nix/store" then [ "boot.loader.grub.storePath" ] else [ ])
    ++ (if builtins.match "[0-9]+" (toString (cfg.default or "0")) == null then [ "boot.loader.grub.default = ${toString cfg.default}" ] else [ ])
    ++ (if devices != [ ] && !(builtins.elem table biosTables) then [ "BIOS devices with partitionTableType = \"${table}\"" ] else [ ])
    ++ (if devices != [ ] && targetSystem != "x86_64-linux" then [ "BIOS devices on ${toString targetSystem}" ] else [ ])
    ++ (if efiSupport && !(builtins.elem table efiTables) then [ "boot.loader.grub.efiSupport with partitionTableType = \"${table}\"" ] else [ ])
    ++ (if efiSupport && (efi.efiSysMountPoint or "/boot") != "/boot" then [ "boot.loader.efi.efiSysMountPoint other than /boot" ] else [ ])
    ++ (if efiSupport && !(builtins.elem targetSystem [ "x86_64-linux" "aarch64-linux" ]) then [ "efiSupport on ${toString targetSystem}" ] else [ ])
    ++ (if devices == [ ] && !efiSupport then [ "boot.loader.grub.devices = [ \"nodev\" ] without efiSupport" ] else [ ])
    ++ (if onRoot && (args.fsType != "ext4" && args.fsType != "ext3" && args.fsType != "ext2") then [ "fsType = \"${args.fsType}\" with /boot on the root" ] else [ ])
    ++ (if onRoot && !args.deterministic then [ "deterministic = false with /boot on the root (grub.cfg names the root's UUID)" ] else [ ])
    ++ (if onRoot && args.shareRootFilesystem then [ "shareRootFilesystem with /boot on the root" ] else [ ]);

  efiPackage = if package ? override then package.override { efiSupport = true; } else package;
  fullName = package.pname or (builtins.parseDrvName (package.name or "grub")).name;
  fullVersion = package.version or (builtins.parseDrvName (package.name or "grub")).version;
in
{
  inherit enabled vmReasons;
  reason = "GRUB with ${concatStringsSep ", " vmReasons} (only the system's own installer can do that)";
  section =
    if !enabled || vmReasons != [ ] then
      null
    else
      {
        biosPackage = if devices != [ ] then "${package}" else null;
        efiPackage = if efiSupport then "${efiPackage}" else null;
        # GRUB's images are data: the build platform's grub-mkimage of the same nixpkgs makes them.
        mkimage = if cross then "${pkgs.grub2}/bin/grub-mkimage" else "${package}/bin/grub-mkimage";
        system = targetSystem;
        inherit fullName fullVersion;
        timeout = config.boot.loader.timeout or 5;
        default = builtins.fromJSON (toString (cfg.default or "0"));
        extraConfig = cfg.extraConfig or "";
        extraEntries = cfg.extraEntries or "";
        extraEntriesBeforeNixOS = cfg.extraEntriesBeforeNixOS or false;
        extraPerEntryConfig = cfg.extraPerEntryConfig or "";
        splashImage = if (cfg.splashImage or null) == null then null else "${cfg.splashImage}";
        configurationLimit = cfg.configurationLimit or 100;
        fsIdentifier = cfg.fsIdentifier or "uuid";
        gfxmodeEfi = cfg.gfxmodeEfi or "auto";
        gfxmodeBios = cfg.gfxmodeBios or "1024x768";
        # grub.nix: "NixOS" and the ESP's mount point with "/" made "-".
        bootloaderId = if (cfg.efiBootloaderId or null) == null then "NixOS-boot" else cfg.efiBootloaderId;
        efiSysMountPoint = efi.efiSysMountPoint or "/boot";
        efiInstallAsRemovable = cfg.efiInstallAsRemovable or false;
      };
}
