# makeDiskImage's argument handling, in builtins only so it evaluates without nixpkgs: nixpkgs'
# defaults (./defaults.nix), every check of the seed and of nixpkgs as an evaluation error that names the
# argument, the value and what is allowed (./checks.nix, worded by ./messages.nix, with the rules of
# builder/rules.json that the builder's spec loader reads too), and the spec (builder/spec.schema.json)
# built from the checked arguments.
let
  inherit (builtins)
    any
    attrNames
    concatStringsSep
    elem
    filter
    foldl'
    isAttrs
    removeAttrs
    sort
    ;
  # builder/rules.json keeps tables, fsTypes and formats as lists (nixpkgs' order); here also by name.
  rulesFile = builtins.fromJSON (builtins.readFile ../../builder/rules.json);
  byName = list: builtins.listToAttrs (map (e: { inherit (e) name; value = e; }) list);
  rules = rulesFile // {
    tables = byName rulesFile.tables;
    fsTypes = byName rulesFile.fsTypes;
    formats = byName rulesFile.formats;
    order = {
      tables = map (e: e.name) rulesFile.tables;
      fsTypes = map (e: e.name) rulesFile.fsTypes;
      formats = map (e: e.name) rulesFile.formats;
    };
  };
  messages = import ./messages.nix;
  inherit (import ./defaults.nix) defaults knownArgs;
  checks = import ./checks.nix { inherit rules messages; };
  inherit (messages) err bad didYouMean;
  inherit (checks) pathString matches;

  fail = problems: throw (concatStringsSep "\n" problems);
in
rec {
  inherit rules defaults knownArgs;
  inherit (messages) editDistance closest;
  inherit (checks) parseIEC;
  tableTypes = checks.tableNames;
  formats = checks.formatNames;
  fsTypes = checks.fsTypeNames;

  # Check the user's arguments and return them complete (defaults applied, paths as strings), warning
  # where nixpkgs does something surprising. `defaultOVMF` is only forced when touchEFIVars needs it and
  # neither OVMF nor efiFirmware/efiVariables is given.
  normalize =
    {
      args,
      defaultOVMF ? throw (err "touchEFIVars = true needs efiFirmware and efiVariables (or OVMF)"),
      warn ? msg: builtins.trace "evaluation warning: ${msg}",
    }:
    let
      unknown = filter (n: !elem n knownArgs) (attrNames args);
      unknownProblems = map (
        n:
        err "unknown argument ${n}${didYouMean n knownArgs}; known arguments: ${
          concatStringsSep ", " (sort (x: y: x < y) knownArgs)
        }"
      ) unknown;
      missingProblems = map (n: err "argument ${n} is required (makeDiskImage { inherit pkgs lib config; ... })") (
        filter (n: !(args ? ${n})) [
          "pkgs"
          "lib"
          "config"
        ]
      );
      base =
        defaults
        // removeAttrs args [
          "pkgs"
          "lib"
          "config"
        ];
      # Placeholders for the derived defaults, so only values the caller gave are type-checked.
      typed = base // {
        label = args.label or "nixos";
        rootFSUID = args.rootFSUID or null;
      };
      withDerived = base // {
        diskSize = checks.diskSizeMiB base.diskSize;
        # nixpkgs hands memSize to vmTools, which reads it through toString: "2048" is 2048 MiB.
        memSize = if builtins.isString base.memSize then checks.fromDecimal base.memSize else base.memSize;
        label = args.label or (if base.onlyNixStore then "nix-store" else "nixos");
        rootFSUID =
          if args ? rootFSUID then
            args.rootFSUID
          else if (rules.fsTypes.${base.fsType} or { }).uuid or false then
            base.rootGPUID
          else
            null;
      };
      phase1 = unknownProblems ++ missingProblems ++ checks.typeProblems typed;
      phase2 = checks.crossProblems withDerived;
      ovmf = if base.OVMF != null then base.OVMF else defaultOVMF;
      efiFile =
        argName: attr:
        if !withDerived.touchEFIVars then
          (if withDerived.${argName} == null then null else pathString withDerived.${argName})
        else if withDerived.${argName} != null then
          pathString withDerived.${argName}
        else if isAttrs ovmf && ovmf ? ${attr} then
          pathString ovmf.${attr}
        else
          throw (bad "OVMF" ovmf "an OVMF output with a ${attr} attribute, such as pkgs.OVMF.fd");
      result = withDerived // {
        # Like nixpkgs' rsync to $root/$target: a relative target is placed under /.
        contents = map (e: {
          source = pathString e.source;
          target = checks.targetPath e.target;
          mode = e.mode or null;
          user = if (e.user or null) == null then null else toString e.user;
          group = if (e.group or null) == null then null else toString e.group;
        }) withDerived.contents;
        configFile = if withDerived.configFile == null then null else pathString withDerived.configFile;
        efiFirmware = efiFile "efiFirmware" "firmware";
        efiVariables = efiFile "efiVariables" "variables";
        additionalPaths = map pathString withDerived.additionalPaths;
      };
    in
    if phase1 != [ ] then
      fail phase1
    else if phase2 != [ ] then
      fail phase2
    else
      foldl' (value: w: warn w value) (removeAttrs result [ "OVMF" ]) (checks.argWarnings args withDerived);

  # Owners given by name resolve in the image, with its own tools: only in the VM. A contents entry of
  # normalized arguments or of the spec (user and group strings or null).
  namedOwners =
    a:
    any (
      e: e.user != null && !(matches rules.patterns.numericOwner e.user && matches rules.patterns.numericOwner e.group)
    ) a.contents;

  # The facts builder/rules.json's vmStage rules decide the VM on, from a spec (builder.spec.Spec.vm_facts).
  vmFacts = spec: {
    inherit (spec) installBootLoader touchEFIVars onlyNixStore;
    systemdBoot = spec.bootLoader.systemdBoot != null;
    grub = spec.bootLoader ? grub;
    namedOwners = namedOwners spec;
  };

  # Whether a vmStage rule holds: one of its alternatives has all its facts ("!fact": not), as
  # builder.rules.vm_stage reads the same rules.
  vmStage =
    rule: facts:
    any (builtins.all (
      term:
      let
        negated = builtins.substring 0 1 term == "!";
        name = if negated then builtins.substring 1 (builtins.stringLength term) term else term;
        value = if facts ? ${name} then facts.${name} else vmStage name facts;
      in
      value != negated
    )) rules.vmStage.${rule};

  # Whether the build VM runs finalize for this spec (builder.spec.Spec.needs_vm).
  needsVM = spec: vmStage "needsVM" (vmFacts spec);

  # Whether prepare installs systemd-boot itself from the bootspec (builder.spec.Spec.installs_systemd_boot).
  systemdBootOnHost = spec: vmStage "systemdBootOnHost" (vmFacts spec);

  # Whether prepare installs GRUB itself (builder.spec.Spec.installs_grub; nix/grub.nix gave a section).
  grubOnHost = spec: vmStage "grubOnHost" (vmFacts spec);

  # additionalPaths without those already among the base roots, as nixpkgs' subtractLists does.
  extraPaths = basePaths: paths: filter (p: !elem p basePaths) paths;

  # The output file name nixpkgs gives the image: <baseName>.<extension of the format>.
  fileName = a: "${a.baseName}.${rules.formats.${a.format}.extension}";

  # Why systemd-boot cannot be installed into this layout (a message), or null. As in the builder
  # (builder/boot/systemd_boot_config.py), checked only when prepare installs it: the VM path fails as
  # nixpkgs' does. The mount points are where nixpkgs' VM script mounts the FAT partitions (rules.json).
  systemdBootProblem =
    args: section:
    let
      table = args.partitionTableType;
      esp = rules.tables.${table}.espMountPoint;
      xbootldr = rules.tables.${table}.xbootldrMountPoint;
    in
    if section == null || !args.installBootLoader || args.onlyNixStore then
      null
    else if esp == null then
      "config.boot.loader.systemd-boot.enable = true is not allowed with partitionTableType = ${messages.show table}: systemd-boot needs an EFI system partition (use \"efi\", \"efixbootldr\" or \"hybrid\")"
    else if section.efiSysMountPoint != esp then
      "config.boot.loader.efi.efiSysMountPoint = ${messages.show section.efiSysMountPoint} is not allowed with partitionTableType = ${messages.show table}, which mounts the ESP at ${esp} (set it to ${messages.show esp})"
    else if section.xbootldrMountPoint != xbootldr then
      "config.boot.loader.systemd-boot.xbootldrMountPoint = ${messages.show section.xbootldrMountPoint} is not allowed with partitionTableType = ${messages.show table} (it must be ${messages.show xbootldr})"
    else
      null;

  # shareRootFilesystem: the spec the root filesystem alone is built from (`make-disk-image root-filesystem`),
  # from an image's spec. It keeps what the root filesystem's bytes are made from -- the system (toplevel,
  # closureInfo, channel, additionalPaths), contents, configFile, onlyNixStore, fsType, label, rootFSUID,
  # deterministic, additionalSpace or a fixed diskSize with the root partition it leaves, and the mount points
  # prepare makes on the root when it installs systemd-boot itself (builder.spec.Spec.installs_systemd_boot) --
  # and gives everything else one value, so images differing only in the rest are one derivation. Tables stand
  # for each other when the root build cannot tell them apart: with diskSize = "auto" the root is sized from
  # its contents alone; with a fixed diskSize the root partition depends on the label kind and where the root
  # starts (rules.json rootStartMiB, null: at the end of bootSize).
  rootFilesystemSpec =
    spec:
    let
      table = rules.tables.${spec.partitionTableType};
      fixed = spec.diskSize != "auto";
      mountPoints = systemdBootOnHost spec;
      same =
        t:
        (!fixed || (t.label == table.label && t.rootStartMiB == table.rootStartMiB))
        && (!mountPoints || (t.espMountPoint == table.espMountPoint && t.xbootldrMountPoint == table.xbootldrMountPoint));
      canonical = builtins.head (filter (n: same rules.tables.${n}) rules.order.tables);
      # The boot partition's end as a canonical string ("256M" and "256MiB" both end at 257 MiB).
      bootEndMiB = checks.parseIEC spec.bootSize / (1024 * 1024) + 1;
    in
    spec
    // {
      name = "root-filesystem";
      baseName = "root";
      format = "raw";
      partitionTableType = canonical;
      bootSize =
        if fixed && rules.tables.${canonical}.rootStartMiB == null then
          "${toString (bootEndMiB - 1)}M"
        else
          defaults.bootSize;
      additionalSpace = if fixed then defaults.additionalSpace else spec.additionalSpace;
      installBootLoader = mountPoints;
      touchEFIVars = false;
      efiFirmware = null;
      efiVariables = null;
      postVM = "";
      memSize = defaults.memSize;
      rootGPUID = defaults.rootGPUID;
      bootLoader = {
        grubDevices = [ ];
        limineBiosDevice = null;
        systemdBoot = if mountPoints then spec.bootLoader.systemdBoot else null;
      };
    };

  # The spec document (builder/spec.schema.json) from normalized arguments and what nixpkgs computed.
  toSpec =
    {
      args,
      toplevel,
      closureInfo,
      channel,
      additionalPaths,
      storeDir,
      grubDevices,
      limineBiosDevice ? null,
      # nix/systemd-boot.nix's section: systemd-boot installed by prepare, without the VM.
      systemdBoot ? null,
      # nix/grub.nix's section: GRUB installed by prepare, without the VM.
      grub ? null,
    }:
    let
      badDevices = filter (d: !matches "nodev|/dev/[^[:cntrl:]]+" d) grubDevices;
    in
    if badDevices != [ ] then
      throw (bad "config.boot.loader.grub.devices" grubDevices "device paths under /dev, or \"nodev\"")
    # "nodev" is NixOS' default biosDevice: nixpkgs' make-disk-image.nix builds it (its `ln -s /dev/vda nodev`
    # links nothing that matters) and limine-install.py then installs Limine's stage 2 only, saying so.
    else if limineBiosDevice != null && !matches "nodev|/dev/[^[:cntrl:]]+" limineBiosDevice then
      throw (bad "config.boot.loader.limine.biosDevice" limineBiosDevice "a device path under /dev, or \"nodev\"")
    else if systemdBootProblem args systemdBoot != null then
      throw (err (systemdBootProblem args systemdBoot))
    else
      {
        specVersion = 1;
        inherit (args)
          name
          baseName
          format
          partitionTableType
          fsType
          label
          diskSize
          additionalSpace
          bootSize
          contents
          installBootLoader
          touchEFIVars
          efiFirmware
          efiVariables
          configFile
          postVM
          memSize
          onlyNixStore
          deterministic
          rootGPUID
          rootFSUID
          copyChannel
          ;
        system = {
          inherit
            toplevel
            closureInfo
            channel
            additionalPaths
            storeDir
            ;
        };
        bootLoader = {
          inherit grubDevices limineBiosDevice systemdBoot;
        }
        # Only when set: the spec of an image without it stays what it was.
        // (if grub == null then { } else { inherit grub; });
        sourceDateEpoch = 1;
        enterCommand = "nixos-enter";
      }
      # Only when set: the spec of an image without it stays what it was, and with it the identifiers
      # vdi, vpc and vmdk derive from the spec (builder/disk/image_ids.py).
      // (if args.shareRootFilesystem then { shareRootFilesystem = true; } else { });
}
