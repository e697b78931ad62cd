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
  # nixpkgs' grub.nix has no package option: `grubPkgs = if cfg.forcei686 then pkgs.pkgsi686Linux else pkgs;
  # realGrub = grubPkgs.grub2` (a zfs override with zfsSupport, which keeps the VM here), from the system's own
  # module argument pkgs, which nixos/modules/misc/nixpkgs.nix sets as config._module.args.pkgs. A `package`
  # attribute (not a NixOS option) is read only when present; forcei686 keeps the VM.
  systemPkgs = (config._module or { }).args.pkgs or { };
  package = cfg.package or (systemPkgs.grub2 or null);
  # grub.nix's defaults of the options the generated grub.cfg (install-grub.pl at f5271680) does not read:
  # any other value keeps the VM. An absent attribute reads as its default.
  unread = {
    forcei686 = false;
    timeoutStyle = "menu";
    entryOptions = "--class nixos --unrestricted";
    subEntryOptions = "--class nixos";
    gfxpayloadEfi = "keep";
    gfxpayloadBios = "text";
    configurationName = "";
  };
  unreadReasons =
    builtins.concatMap (
      name: if (cfg.${name} or unread.${name}) != unread.${name} then [ "boot.loader.grub.${name}" ] else [ ]
    ) (builtins.attrNames unread)
    # grub.nix: splashMode "stretch" and backgroundColor null by default, and `mkDefault "normal"` and
    # `mkDefault "#2F302F"` with its default splash image: either pair is a default (the first nixos-rebuild
    # writes them), any other colour keeps the VM.
    ++ (if !(builtins.elem (cfg.splashMode or "stretch") [ "stretch" "normal" ]) then [ "boot.loader.grub.splashMode" ] else [ ])
    ++ (if !(builtins.elem (cfg.backgroundColor or null) [ null "#2F302F" ]) then [ "boot.loader.grub.backgroundColor" ] else [ ]);
  # grub.nix: font defaults to "${realGrub}/share/grub/unicode.pf2", the font copied here.
  fontReasons =
    if package != null && cfg ? font && (cfg.font == null || toString cfg.font != "${package}/share/grub/unicode.pf2") then
      [ "boot.loader.grub.font" ]
    else
      [ ];
  # grub.nix: `timeout = if config.boot.loader.timeout == null then -1 else config.boot.loader.timeout`;
  # install-grub.pl writes `set timeout=` with Perl's int() of it (-1: wait for a key).
  timeout = if (config.boot.loader.timeout or 5) == null then -1 else config.boot.loader.timeout or 5;
  # boot.loader.grub.default is `apply = toString`; install-grub.pl takes Perl's int() of it ("007" is 7).
  # Digits only (a name such as "saved" keeps the VM), and at most nine of them after leading zeros.
  defaultText = toString (cfg.default or "0");
  defaultDigits = builtins.match "0*([0-9]{1,9})" defaultText;
  defaultIndex =
    builtins.foldl' (n: c: n * 10 + (builtins.getAttr c { "0" = 0; "1" = 1; "2" = 2; "3" = 3; "4" = 4; "5" = 5; "6" = 6; "7" = 7; "8" = 8; "9" = 9; })) 0
      (builtins.genList (i: builtins.substring i 1 (builtins.head defaultDigits)) (builtins.stringLength (builtins.head defaultDigits)));

  given = name: value: if value != { } && value != "" && value != null && value != [ ] && value != false then [ name ] else [ ];
  # Every option the host path does not reproduce, by its NixOS name: the build log and the cross refusal name them.
  vmReasons =
    (if package == null then [ "boot.loader.grub: no GRUB package (the configuration's _module.args.pkgs has no grub2)" ] else [ ])
    ++ unreadReasons
    ++ fontReasons
    ++ (if builtins.any (m: (m.efiBootloaderId or null) != null) (cfg.mirroredBoots or [ ]) then [ "boot.loader.grub.mirroredBoots.*.efiBootloaderId" ] else [ ])
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
    ++ (if (cfg.storePath or "/nix/store") != "/nix/store" then [ "boot.loader.grub.storePath" ] else [ ])
    ++ (if defaultDigits == null then [ "boot.loader.grub.default = ${defaultText} (not a menu index of at most nine digits)" ] else [ ])
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
        inherit timeout;
        default = defaultIndex;
        extraConfig = cfg.extraConfig or "";
        extraEntries = cfg.extraEntries or "";
        extraEntriesBeforeNixOS = cfg.extraEntriesBeforeNixOS or false;
        extraPerEntryConfig = cfg.extraPerEntryConfig or "";
        splashImage = if (cfg.splashImage or null) == null then null else "${cfg.splashImage}";
        configurationLimit = cfg.configurationLimit or 100;
        fsIdentifier = cfg.fsIdentifier or "uuid";
        gfxmodeEfi = cfg.gfxmodeEfi or "auto";
        gfxmodeBios = cfg.gfxmodeBios or "1024x768";
        # grub.nix: "NixOS" and the ESP's mount point with "/" made "-" (mirroredBoots.*.efiBootloaderId keeps the VM).
        bootloaderId = "NixOS-boot";
        efiSysMountPoint = efi.efiSysMountPoint or "/boot";
        efiInstallAsRemovable = cfg.efiInstallAsRemovable or false;
      };
}
