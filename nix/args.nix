# Argument handling for makeDiskImage, in builtins only so it evaluates without nixpkgs:
# defaults as in nixpkgs' make-disk-image.nix, every check of the seed and of nixpkgs as an
# evaluation error that names the argument, the value and what is allowed, and the spec
# (builder/spec.schema.json) built from the checked arguments.
let
  inherit (builtins)
    all
    any
    attrNames
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    match
    removeAttrs
    replaceStrings
    sort
    stringLength
    substring
    toJSON
    ;

  # --- small helpers --------------------------------------------------------

  # Whether string s starts with prefix p.
  hasPrefixStr = p: s: substring 0 (stringLength p) s == p;

  # A contents target with repeated and trailing slashes and "." components removed ("//a/./b/" -> "/a/b").
  targetPath =
    t: "/" + concatStringsSep "/" (filter (c: isString c && c != "" && c != ".") (builtins.split "/" t));

  # Render any value for an error message without forcing derivations or failing on functions.
  show =
    v:
    if isString v then
      toJSON v
    else if isInt v || isFloat v || isBool v || v == null then
      toJSON v
    else if isPath v then
      toString v
    else if isFunction v then
      "<function>"
    else if isList v then
      "[ " + concatStringsSep " " (map show v) + " ]"
    else if isAttrs v && (v.type or null) == "derivation" then
      "<derivation ${v.name or "?"}>"
    else if isAttrs v then
      "{ " + concatStringsSep " " (map (n: n + " = ...;") (attrNames v)) + " }"
    else
      "<value>";

  lower = replaceStrings (genList (i: substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26) (
    genList (i: substring i 1 "abcdefghijklmnopqrstuvwxyz") 26
  );

  min2 = a: b: if a < b then a else b;

  # Levenshtein distance between two strings (case-insensitive), one DP row at a time.
  editDistance =
    a': b':
    let
      a = lower a';
      b = lower b';
      lb = stringLength b;
      charsB = genList (j: substring j 1 b) lb;
      step =
        prev: i:
        let
          ch = substring (i - 1) 1 a;
          cell =
            acc: j:
            acc
            ++ [
              (min2 (min2 (elemAt prev j + 1) (elemAt acc (j - 1) + 1)) (
                elemAt prev (j - 1) + (if ch == elemAt charsB (j - 1) then 0 else 1)
              ))
            ];
        in
        foldl' cell [ i ] (genList (j: j + 1) lb);
      last = foldl' step (genList (j: j) (lb + 1)) (genList (i: i + 1) (stringLength a));
    in
    elemAt last lb;

  # The known name closest to `name`, or null when none is reasonably close.
  closest =
    name: candidates:
    let
      scored = map (c: {
        inherit c;
        d = editDistance name c;
      }) candidates;
      best = foldl' (x: y: if y.d < x.d then y else x) (head scored) scored;
      limit = if stringLength name < 6 then 2 else stringLength name / 3 + 1;
    in
    if candidates == [ ] || best.d > limit then null else best.c;

  didYouMean =
    name: candidates:
    let
      c = closest name candidates;
    in
    if c == null then "" else " (did you mean ${show c}?)";

  oneOfText = values: concatStringsSep ", " (map show values);

  # A store path or file argument as a string; paths are copied to the store and keep their context.
  pathString =
    v:
    if isPath v then
      "${v}"
    else if isAttrs v && v ? outPath then
      "${v}"
    else
      v;

  isPathLike = v: isPath v || (isAttrs v && v ? outPath) || (isString v && match "/.*" v != null);

  matches = re: s: isString s && match re s != null;

  iecRegex = "([0-9]+)(\\.([0-9]+))?(([KMGTPE])(i?B)?)?";
  guidRegex = "[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}";
  fileNameRegex = "[A-Za-z0-9+._?=-]+";
  ownerRegex = "[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*\\$?";
  # What rsync's --chmod accepts (nixpkgs copies contents with rsync -a --chmod=MODE): comma-separated
  # clauses, each [DF]* + octal <= 07777, or [DFugoa]* (not both D and F) + -+= + [rwxXst]* or one of u g o.
  # The same language as builder/chmod.py's MODE_REGEX (tests/test_chmod.py runs both on one table).
  modeClauseRegex = "(([Dugoa]*|[Fugoa]*)[-+=]([rwxXst]*|[ugo])|(D*|F*)0*[0-7]{1,4})";
  modeRegex = "${modeClauseRegex}(,${modeClauseRegex})*";

  pow = base: n: foldl' (acc: _: acc * base) 1 (genList (x: x) n);

  # Bytes meant by an IEC size string, as the builder's sizes.parse_iec reads it (fraction rounded up).
  parseIEC =
    s:
    let
      m = match iecRegex s;
      whole = fromDecimal (elemAt m 0);
      frac = elemAt m 2;
      suffix = elemAt m 4;
      scale = pow 1024 (
        if suffix == null then
          0
        else
          {
            K = 1;
            M = 2;
            G = 3;
            T = 4;
            P = 5;
            E = 6;
          }
          .${suffix}
      );
      fracBytes =
        if frac == null then
          0
        else
          let
            den = pow 10 (stringLength frac);
            num = fromDecimal frac * scale;
          in
          (num + den - 1) / den;
    in
    whole * scale + fracBytes;

  # Decimal digits to an int (leading zeros allowed, unlike fromJSON).
  fromDecimal =
    s:
    foldl' (acc: d: acc * 10 + d) 0 (
      genList (
        i:
        {
          "0" = 0;
          "1" = 1;
          "2" = 2;
          "3" = 3;
          "4" = 4;
          "5" = 5;
          "6" = 6;
          "7" = 7;
          "8" = 8;
          "9" = 9;
        }
        .${substring i 1 s}
      ) (stringLength s)
    );

  MiB = 1024 * 1024;

  # diskSize as a string of digits ("102400"), which nixpkgs' `truncate -s ${diskSize}M` takes as MiB.
  # At most 13 digits: 1 EiB is 1099511627776 MiB, and longer numbers would overflow Nix integers.
  isDigitSize = v: matches "0*[1-9][0-9]{0,12}" v;
  diskSizeMiB = v: if isString v && v != "auto" then fromDecimal v else v;

  # --- the interface ----------------------------------------------------------

  tableTypes = [
    "legacy"
    "legacy+boot"
    "legacy+gpt"
    "efi"
    "efixbootldr"
    "hybrid"
    "none"
  ];
  efiVarTables = [
    "hybrid"
    "efi"
    "efixbootldr"
    "legacy+gpt"
  ];
  # Where the boot partition starts: bootSize (its END offset) must lie beyond it.
  bootStart = {
    "legacy+boot" = 1;
    efi = 8;
    hybrid = 8;
    efixbootldr = 100;
  };
  # Writable qemu-img formats the builder accepts; qcow2-compressed is qcow2 written with -c.
  formats = [
    "raw"
    "qcow2"
    "qcow2-compressed"
    "vdi"
    "vpc"
    "vmdk"
    "vhdx"
    "qed"
    "qcow"
    "parallels"
  ];
  # ext2 and ext3 as nixpkgs takes them (mkfs.${fsType}); the others are beyond nixpkgs.
  fsTypes = [ "ext4" "ext3" "ext2" "btrfs" "xfs" "erofs" "squashfs" ];
  extFsTypes = [ "ext4" "ext3" "ext2" ];
  # Read-only root filesystems: only with onlyNixStore. Label limits in bytes (squashfs stores no label).
  readOnlyFsTypes = [ "erofs" "squashfs" ];
  uuidFsTypes = extFsTypes ++ [ "btrfs" "xfs" "erofs" ];
  labelMax = { ext4 = 16; ext3 = 16; ext2 = 16; btrfs = 255; xfs = 12; erofs = 16; squashfs = 255; };
  # Below this the build VM may not boot; nixpkgs passes any memSize to qemu, so only a warning.
  memSizeWarning = 128;

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
  };

  # label and rootFSUID have defaults that depend on other arguments.
  knownArgs = [
    "pkgs"
    "lib"
    "config"
    "label"
    "rootFSUID"
  ]
  ++ attrNames defaults;

  contentKeys = [
    "source"
    "target"
    "mode"
    "user"
    "group"
  ];

  err = msg: "makeDiskImage: " + msg;
  bad = arg: value: allowed: err "${arg} = ${show value} is not allowed: ${allowed}";

  # Problems with one `contents` entry (index i), each a full message.
  contentProblems =
    i: e:
    let
      at = "contents[${toString i}]";
      owner =
        k:
        let
          v = e.${k} or null;
        in
        if v == null || isInt v || matches ownerRegex v then
          [ ]
        else
          [
            (bad "${at}.${k}" v "a user/group name (letters, digits, _ . -) or a numeric id")
          ];
    in
    if !isAttrs e then
      [ (bad at e "each entry is an attribute set { source, target, mode?, user?, group? }") ]
    else
      (
        if !(e ? source) then
          [ (err "${at} has no source (the file or directory to copy; `*` globs into target)") ]
        else if !isPathLike e.source then
          [ (bad "${at}.source" e.source "an absolute path, a path literal or a derivation") ]
        else
          [ ]
      )
      ++ (
        if !(e ? target) then
          [ (err "${at} has no target (the absolute path in the image)") ]
        else if !isString e.target || e.target == "" then
          [ (bad "${at}.target" e.target "a path inside the image, such as \"/etc/motd\" (a relative one is placed under /)") ]
        else if elem ".." (filter isString (builtins.split "/" e.target)) then
          [ (bad "${at}.target" e.target "a path without \"..\" (it must stay inside the image root)") ]
        else if targetPath e.target == "/" then
          [ (bad "${at}.target" e.target "a path below the image root, not the root itself") ]
        else if builtins.any (c: isString c && stringLength c > 255) (builtins.split "/" e.target) then
          [ (bad "${at}.target" e.target "a path whose components are at most 255 bytes long") ]
        else if
          let
            t = targetPath e.target;
          in
          t == builtins.storeDir || hasPrefixStr (builtins.storeDir + "/") t || hasPrefixStr (t + "/") builtins.storeDir
        then
          [
            (bad "${at}.target" e.target "a path apart from ${builtins.storeDir} (not it, not inside it, not above it): the store holds the closure; use additionalPaths for store paths")
          ]
        else
          [ ]
      )
      ++ (
        let
          m = e.mode or null;
        in
        if m == null || matches modeRegex m then
          [ ]
        else
          [
            (bad "${at}.mode" m "an rsync --chmod string such as \"0644\", \"u+x\", \"a=r,u+w\" or \"D755,F644\" (nixpkgs copies contents with rsync -a --chmod; rsync refuses this one)")
          ]
      )
      ++ owner "user"
      ++ owner "group"
      ++ (
        if ((e.user or null) == null) != ((e.group or null) == null) then
          [
            (err "${at}: user = ${show (e.user or null)} and group = ${show (e.group or null)} are not allowed: set both user and group, or neither")
          ]
        else
          [ ]
      );

  # Normalised target used to find duplicates: no trailing or repeated slashes.
  normTarget =
    t:
    "/" + concatStringsSep "/" (filter (p: isString p && p != "" && p != ".") (builtins.split "/" t));

  # Single-argument checks: a list of messages, empty when the argument is fine.
  typeProblems =
    a:
    let
      check = name: ok: allowed: if ok then [ ] else [ (bad name a.${name} allowed) ];
      bool = name: check name (isBool a.${name}) "true or false";
      iec =
        name:
        check name (matches iecRegex a.${name})
          "a size string: digits with an optional K, M, G, T, P or E suffix (powers of 1024), such as \"512M\"";
    in
    (
      if a.diskSize == "auto" || (isInt a.diskSize && a.diskSize >= 1) || isDigitSize a.diskSize then
        [ ]
      else
        [
          (bad "diskSize" a.diskSize "a positive integer (MiB), a string of digits (MiB, as nixpkgs' truncate reads it) or \"auto\"")
        ]
    )
    ++ iec "additionalSpace"
    ++ iec "bootSize"
    ++ (
      if !isList a.contents then
        [ (bad "contents" a.contents "a list of { source, target, mode?, user?, group? }") ]
      else
        builtins.concatLists (genList (i: contentProblems i (elemAt a.contents i)) (length a.contents))
    )
    ++ check "partitionTableType" (elem a.partitionTableType tableTypes) (
      "one of ${oneOfText tableTypes}"
      + (if isString a.partitionTableType then didYouMean a.partitionTableType tableTypes else "")
    )
    ++ bool "installBootLoader"
    ++ bool "touchEFIVars"
    ++ bool "onlyNixStore"
    ++ bool "deterministic"
    ++ bool "copyChannel"
    ++ check "OVMF" (
      a.OVMF == null || isAttrs a.OVMF
    ) "an OVMF package output with firmware and variables, such as pkgs.OVMF.fd"
    ++ check "efiFirmware" (
      a.efiFirmware == null || isPathLike a.efiFirmware
    ) "an absolute path or derivation (the OVMF code image), or null for OVMF.firmware"
    ++ check "efiVariables" (
      a.efiVariables == null || isPathLike a.efiVariables
    ) "an absolute path or derivation (the OVMF variables template), or null for OVMF.variables"
    ++ check "fsType" (elem a.fsType fsTypes) (
      "one of ${oneOfText fsTypes} (erofs and squashfs only with onlyNixStore = true)"
    )
    ++ check "label" (
      isString a.label
      && stringLength a.label >= 1
      && stringLength a.label <= 255
      && matches "[^/[:cntrl:]]+" a.label
    ) "a filesystem label of 1 to 16 characters (ext4; xfs 12, btrfs 255) without \"/\" or control characters"
    ++ check "configFile" (
      a.configFile == null || isPathLike a.configFile
    ) "null or a path (copied to /etc/nixos/configuration.nix)"
    ++ check "postVM" (isString a.postVM) "a string of shell commands (run after the image is in $out)"
    ++ check "memSize" (
      isInt a.memSize && a.memSize >= 1 && a.memSize <= 1048576
    ) "an integer number of MiB between 1 and 1048576 (at least 128 for the build VM to boot)"
    ++ check "name" (
      matches fileNameRegex a.name && stringLength a.name <= 200 && !matches "\\..*" a.name
    ) "a derivation name of 1 to 200 characters from A-Z a-z 0-9 + . _ ? = -, not starting with \".\""
    ++ check "baseName" (
      matches fileNameRegex a.baseName && stringLength a.baseName <= 200
    ) "a file name of 1 to 200 characters from A-Z a-z 0-9 + . _ ? = -"
    ++ check "format" (elem a.format formats) (
      "one of ${oneOfText formats}" + (if isString a.format then didYouMean a.format formats else "")
    )
    ++ check "rootGPUID" (matches guidRegex a.rootGPUID) "a GUID such as \"F222513B-DED1-49FA-B591-20CE86A2FE7F\""
    ++ check "rootFSUID" (
      a.rootFSUID == null || matches guidRegex a.rootFSUID
    ) "null or a UUID such as \"F222513B-DED1-49FA-B591-20CE86A2FE7F\""
    ++ (
      if !isList a.additionalPaths then
        [ (bad "additionalPaths" a.additionalPaths "a list of store paths or derivations") ]
      else
        map (p: bad "additionalPaths" p "each entry must be a store path or derivation") (
          filter (p: !isPathLike p) a.additionalPaths
        )
    );

  # The seed's and nixpkgs' asserts, and what the builder needs beyond them.
  crossProblems =
    a:
    let
      table = a.partitionTableType;
      boot = parseIEC a.bootSize;
      # Where the boot partition ends: nixpkgs' round_to_nearest always adds a MiB ("256M" ends at 257 MiB).
      bootEnd = (boot / MiB + 1) * MiB;
      targets = map (e: normTarget e.target) a.contents;
      dups = filter (i: elem (elemAt targets i) (genList (j: elemAt targets j) i)) (
        genList (i: i) (length targets)
      );
    in
    (
      if elem a.fsType uuidFsTypes && a.deterministic && a.rootFSUID == null then
        [
          (err "rootFSUID = null is not allowed with deterministic = true and fsType = ${show a.fsType}: give a UUID, or set deterministic = false")
        ]
      else
        [ ]
    )
    ++ (
      if elem a.fsType readOnlyFsTypes && !a.onlyNixStore then
        [
          (err "fsType = ${show a.fsType} is read-only and allowed only with onlyNixStore = true: use \"ext4\", \"btrfs\" or \"xfs\"")
        ]
      else if
        isString a.label
        && labelMax ? ${a.fsType}
        && !elem a.fsType extFsTypes
        && stringLength a.label > labelMax.${a.fsType}
      then
        [
          (err "label = ${show a.label} is too long for fsType = ${show a.fsType}: at most ${toString labelMax.${a.fsType}} bytes")
        ]
      else
        [ ]
    )
    ++ (
      if a.touchEFIVars && !elem table efiVarTables then
        [
          (err "touchEFIVars = true is not allowed with partitionTableType = ${show table}: it needs one of ${oneOfText efiVarTables}")
        ]
      else
        [ ]
    )
    ++ (
      if a.onlyNixStore then
        (
          if a.contents != [ ] then
            [
              (err "contents = ${show a.contents} is not allowed with onlyNixStore = true: the image holds only the store, give contents = []")
            ]
          else
            [ ]
        )
        ++ (
          if a.configFile != null then
            [
              (err "configFile = ${show a.configFile} is not allowed with onlyNixStore = true: give configFile = null")
            ]
          else
            [ ]
        )
        ++ (
          if a.installBootLoader then
            [
              (err "installBootLoader = true is not allowed with onlyNixStore = true: pass installBootLoader = false (there is no system to boot)")
            ]
          else
            [ ]
        )
      else
        [ ]
    )
    ++ (
      if bootStart ? ${table} && bootEnd <= bootStart.${table} * MiB then
        [
          (err "bootSize = ${show a.bootSize} is not allowed with partitionTableType = ${show table}: it is the END offset of the boot partition (rounded as nixpkgs does, to ${
            toString (bootEnd / MiB)
          } MiB), which starts at ${
            toString bootStart.${table}
          } MiB (give more, such as \"256M\")")
        ]
      else
        [ ]
    )
    ++ (
      if bootStart ? ${table} && isInt a.diskSize && a.diskSize * MiB <= bootEnd then
        [
          (err "diskSize = ${toString a.diskSize} is not allowed with bootSize = ${show a.bootSize}: the root partition starts after the boot partition (give a diskSize larger than bootSize + 1 MiB, or \"auto\")")
        ]
      else
        [ ]
    )
    ++ map (
      i:
      err "contents[${toString i}].target = ${show (elemAt a.contents i).target} is not allowed: it duplicates an earlier entry's target"
    ) dups;

  fail = problems: throw (concatStringsSep "\n" problems);

  # What nixpkgs accepts and does, surprisingly: done the same, with an evaluation warning.
  argWarnings =
    args: a:
    (
      if elem a.fsType extFsTypes && stringLength a.label > labelMax.${a.fsType} then
        [
          (err "label = ${show a.label} is longer than the ${toString labelMax.${a.fsType}} bytes ${a.fsType} stores; mke2fs truncates it (the builder keeps the first 16 bytes, whole characters)")
        ]
      else
        [ ]
    )
    ++ (
      if a.memSize < memSizeWarning then
        [ (err "memSize = ${toString a.memSize} MiB is below ${toString memSizeWarning}: the build VM may not boot") ]
      else
        [ ]
    )
    ++ (
      if !a.deterministic && args ? rootFSUID && args.rootFSUID != null then
        [
          (err "rootFSUID = ${show args.rootFSUID} is ignored with deterministic = false: like nixpkgs, the filesystem gets a random UUID")
        ]
      else
        [ ]
    )
    ++ builtins.concatLists (
      genList (
        i:
        let
          e = elemAt a.contents i;
          unknown = filter (k: !elem k contentKeys) (attrNames e);
        in
        map (
          k:
          err "contents[${toString i}] has an unknown attribute ${show k}${didYouMean k contentKeys}, which is ignored (nixpkgs ignores it too); known: ${oneOfText contentKeys}"
        ) unknown
      ) (length a.contents)
    );

  # Check the user's arguments and return them complete (defaults applied, paths as strings).
  # `defaultOVMF` is only forced when touchEFIVars needs it and neither OVMF nor efiFirmware/efiVariables is given.
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
      missing = filter (n: !(args ? ${n})) [
        "pkgs"
        "lib"
        "config"
      ];
      missingProblems = map (
        n: err "argument ${n} is required (makeDiskImage { inherit pkgs lib config; ... })"
      ) missing;
      given = removeAttrs args [
        "pkgs"
        "lib"
        "config"
      ];
      base = defaults // given;
      a0 = base // {
        # Placeholders for the derived defaults, so only values the caller gave are checked here.
        label = if args ? label then args.label else "nixos";
        rootFSUID = if args ? rootFSUID then args.rootFSUID else null;
      };
      phase1 = unknownProblems ++ missingProblems ++ typeProblems a0;
      withDerived = base // {
        diskSize = diskSizeMiB base.diskSize;
        label =
          if args ? label then
            args.label
          else if base.onlyNixStore then
            "nix-store"
          else
            "nixos";
        rootFSUID =
          if args ? rootFSUID then
            args.rootFSUID
          else if elem base.fsType uuidFsTypes then
            base.rootGPUID
          else
            null;
      };
      phase2 = crossProblems withDerived;
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
          target = targetPath e.target;
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
      foldl' (value: w: warn w value) (removeAttrs result [ "OVMF" ]) (argWarnings args withDerived);

  # Whether finalize must run as root in a VM (mirrors builder.spec.Spec.needs_vm).
  # Owners given by name resolve in the image, with its own tools: only in the VM.
  namedOwners = a: any (e: e.user != null && !(matches "[0-9]+" e.user && matches "[0-9]+" (toString e.group))) a.contents;

  # Whether the build VM runs (finalize). systemdBootOnHost: prepare installs systemd-boot from the
  # bootspec (nix/systemd-boot.nix gave a section), so the bootloader alone needs no VM.
  needsVM =
    a:
    {
      systemdBootOnHost ? false,
    }:
    !a.onlyNixStore && ((a.installBootLoader && !systemdBootOnHost) || a.touchEFIVars || namedOwners a);

  # additionalPaths without those already among the base roots, as nixpkgs' subtractLists does.
  extraPaths = basePaths: paths: filter (p: !elem p basePaths) paths;

  # The output file name nixpkgs gives the image.
  fileName =
    a:
    a.baseName
    + "."
    + (
      {
        raw = "img";
        qcow2 = "qcow2";
        qcow2-compressed = "qcow2";
        vdi = "vdi";
        vpc = "vhd";
      }
      .${a.format} or a.format
    );

  # The spec document (builder/spec.schema.json) from normalized arguments and what nixpkgs computed.
  # Where nixpkgs' make-disk-image.nix mounts the FAT partitions of each layout: ESP and XBOOTLDR.
  systemdBootMounts = {
    efi = {
      esp = "/boot";
      xbootldr = null;
    };
    hybrid = {
      esp = "/boot";
      xbootldr = null;
    };
    efixbootldr = {
      esp = "/efi";
      xbootldr = "/boot";
    };
  };

  # Why systemd-boot cannot be installed into this layout (a message), or null. As in the builder
  # (builder/sdbootconfig.py), checked only when prepare installs it: the VM path fails as nixpkgs' does.
  systemdBootProblem =
    args: section:
    let
      table = args.partitionTableType;
      mounts = systemdBootMounts.${table} or null;
    in
    if section == null || !args.installBootLoader || args.onlyNixStore then
      null
    else if mounts == null then
      "config.boot.loader.systemd-boot.enable = true is not allowed with partitionTableType = ${show table}: systemd-boot needs an EFI system partition (use \"efi\", \"efixbootldr\" or \"hybrid\")"
    else if section.efiSysMountPoint != mounts.esp then
      "config.boot.loader.efi.efiSysMountPoint = ${show section.efiSysMountPoint} is not allowed with partitionTableType = ${show table}, which mounts the ESP at ${mounts.esp} (set it to ${show mounts.esp})"
    else if section.xbootldrMountPoint != mounts.xbootldr then
      "config.boot.loader.systemd-boot.xbootldrMountPoint = ${show section.xbootldrMountPoint} is not allowed with partitionTableType = ${show table} (it must be ${show mounts.xbootldr})"
    else
      null;

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
    }:
    let
      badDevices = filter (d: !matches "nodev|/dev/[^[:cntrl:]]+" d) grubDevices;
    in
    if badDevices != [ ] then
      throw (bad "config.boot.loader.grub.devices" grubDevices "device paths under /dev, or \"nodev\"")
    else if limineBiosDevice != null && !matches "/dev/[^[:cntrl:]]+" limineBiosDevice then
      throw (bad "config.boot.loader.limine.biosDevice" limineBiosDevice "a device path under /dev")
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
        };
        sourceDateEpoch = 1;
        enterCommand = "nixos-enter";
      };
in
{
  inherit
    knownArgs
    defaults
    normalize
    needsVM
    namedOwners
    extraPaths
    fileName
    toSpec
    editDistance
    closest
    parseIEC
    tableTypes
    formats
    fsTypes
    ;
}
