# The argument checks, from builder/rules.json (the file the builder's spec loader reads too): each
# returns a list of messages, empty when the arguments are fine. Plain builtins, so it evaluates without
# nixpkgs.
{ rules, messages }:
let
  inherit (builtins)
    any
    attrNames
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    genList
    isAttrs
    isBool
    isInt
    isList
    isPath
    isString
    length
    match
    stringLength
    substring
    ;
  inherit (messages)
    show
    didYouMean
    oneOfText
    err
    bad
    ;

  MiB = 1024 * 1024;
  maxImageBytes = rules.limits.maxImageMiB * MiB;
  hasPrefixStr = p: s: substring 0 (stringLength p) s == p;
  matches = re: s: isString s && match re s != null;
  pattern = rules.patterns;
  modeRegex = "${pattern.chmodClause}(,${pattern.chmodClause})*";
  fsTypeNames = rules.order.fsTypes;
  fsFact = fs: rules.fsTypes.${fs} or { };
  tableNames = rules.order.tables;
  efiTables = filter (t: rules.tables.${t}.efiVariables) tableNames;
  formatNames = rules.order.formats;
  contentKeys = rules.contentKeys;
in
rec {
  inherit matches fsTypeNames tableNames formatNames;

  # A contents target as nixpkgs' rsync to $root/$target places it: "//a/./b/" and "a/b" are "/a/b".
  targetPath =
    t: "/" + concatStringsSep "/" (filter (c: isString c && c != "" && c != ".") (builtins.split "/" t));

  # A store path or file argument as a string; paths are copied to the store and keep their context.
  pathString = v: if isPath v || (isAttrs v && v ? outPath) then "${v}" else v;

  isPathLike = v: isPath v || (isAttrs v && v ? outPath) || (isString v && match "/.*" v != null);

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

  pow = base: n: foldl' (acc: _: acc * base) 1 (genList (x: x) n);

  iecScale =
    suffix:
    pow 1024 (
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

  # Whether an IEC size string means more than the largest image (1 EiB), without overflowing: the whole
  # part is compared with 1 EiB / scale (exact, both are powers of two), then any fraction on top of it.
  iecTooLarge =
    s:
    let
      m = match "([0-9]+)(\\.([0-9]+))?(([KMGTPE])(i?B)?)?" s;
      digits = elemAt m 0;
      frac = elemAt m 2;
      bound = maxImageBytes / iecScale (elemAt m 4);
    in
    stringLength digits > 18
    || fromDecimal digits > bound
    || (fromDecimal digits == bound && frac != null && match "0*" frac == null);

  # Bytes meant by an IEC size string, as the builder's units.parse_iec reads it (fraction rounded up).
  parseIEC =
    s:
    let
      m = match "([0-9]+)(\\.([0-9]+))?(([KMGTPE])(i?B)?)?" s;
      frac = elemAt m 2;
      scale = iecScale (elemAt m 4);
      fracBytes =
        if frac == null then
          0
        else
          let
            den = pow 10 (stringLength frac);
          in
          (fromDecimal frac * scale + den - 1) / den;
    in
    fromDecimal (elemAt m 0) * scale + fracBytes;

  # diskSize as a string of digits ("102400"), which nixpkgs' `truncate -s ${diskSize}M` takes as MiB.
  isDigitSize = v: matches pattern.digits v;
  diskSizeMiB = v: if isString v && v != "auto" then fromDecimal v else v;

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
        if isInt v && (v < 0 || v > maxId) || isString v && matches "[0-9]+" v && !idInRange v then
          [
            (bad "${at}.${k}" v "a numeric id from 0 to ${toString maxId} (${toString (maxId + 1)} is (uid_t) -1, which chown reads as \"leave unchanged\")")
          ]
        else if v == null || isInt v || (matches pattern.owner v && stringLength v <= rules.limits.ownerBytes) then
          [ ]
        else
          [
            (bad "${at}.${k}" v "a user/group name (letters, digits, _ . -; at most ${toString rules.limits.ownerBytes} characters) or a numeric id")
          ];
      storeDir = builtins.storeDir;
      # uids and gids are 32-bit and (uid_t) -1 means "no change" (as builder/spec.py's MAX_ID); compared as
      # digit strings, since a longer number is no Nix integer.
      maxId = 4294967294;
      idInRange =
        s:
        let
          digits = builtins.head (builtins.match "0*([0-9]*)" s);
        in
        stringLength digits < 10 || (stringLength digits == 10 && digits <= "4294967294");
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
          [
            (bad "${at}.target" e.target "a path inside the image, such as \"/etc/motd\" (a relative one is placed under /)")
          ]
        else if elem ".." (filter isString (builtins.split "/" e.target)) then
          [ (bad "${at}.target" e.target "a path without \"..\" (it must stay inside the image root)") ]
        else if targetPath e.target == "/" then
          [ (bad "${at}.target" e.target "a path below the image root, not the root itself") ]
        else if
          any (c: isString c && stringLength c > rules.limits.pathComponentBytes) (builtins.split "/" e.target)
        then
          [ (bad "${at}.target" e.target "a path whose components are at most 255 bytes long") ]
        else if
          let
            t = targetPath e.target;
          in
          t == storeDir || hasPrefixStr (storeDir + "/") t || hasPrefixStr (t + "/") storeDir
        then
          [
            (bad "${at}.target" e.target "a path apart from ${storeDir} (not it, not inside it, not above it): the store holds the closure; use additionalPaths for store paths")
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

  # Each argument on its own.
  typeProblems =
    a:
    let
      check = name: ok: allowed: if ok then [ ] else [ (bad name a.${name} allowed) ];
      bool = name: check name (isBool a.${name}) "true or false";
      iec =
        name:
        if !matches pattern.iecSize a.${name} then
          [
            (bad name a.${name} "a size string: digits with an optional K, M, G, T, P or E suffix (powers of 1024), such as \"512M\"")
          ]
        else if iecTooLarge a.${name} then
          [ (bad name a.${name} "a size of at most 1 EiB, the largest ext4") ]
        else
          [ ];
      diskOk =
        a.diskSize == "auto"
        || (isInt a.diskSize && a.diskSize >= 1 && a.diskSize <= rules.limits.maxImageMiB)
        || (isDigitSize a.diskSize && fromDecimal a.diskSize <= rules.limits.maxImageMiB);
      nameOk =
        re: v: matches pattern.${re} v && stringLength v <= rules.limits.nameBytes;
    in
    check "diskSize" diskOk "a positive integer (MiB) up to ${toString rules.limits.maxImageMiB} (1 EiB, the largest ext4), a string of such digits (as nixpkgs' truncate reads it) or \"auto\""
    ++ iec "additionalSpace"
    ++ iec "bootSize"
    ++ (
      if !isList a.contents then
        [ (bad "contents" a.contents "a list of { source, target, mode?, user?, group? }") ]
      else
        builtins.concatLists (genList (i: contentProblems i (elemAt a.contents i)) (length a.contents))
    )
    ++ check "partitionTableType" (elem a.partitionTableType tableNames) (
      "one of ${oneOfText tableNames}"
      + (if isString a.partitionTableType then didYouMean a.partitionTableType tableNames else "")
    )
    ++ bool "installBootLoader"
    ++ bool "touchEFIVars"
    ++ bool "onlyNixStore"
    ++ bool "deterministic"
    ++ bool "copyChannel"
    ++ bool "shareRootFilesystem"
    ++ check "OVMF" (
      a.OVMF == null || isAttrs a.OVMF
    ) "an OVMF package output with firmware and variables, such as pkgs.OVMF.fd"
    ++ check "efiFirmware" (
      a.efiFirmware == null || isPathLike a.efiFirmware
    ) "an absolute path or derivation (the OVMF code image), or null for OVMF.firmware"
    ++ check "efiVariables" (
      a.efiVariables == null || isPathLike a.efiVariables
    ) "an absolute path or derivation (the OVMF variables template), or null for OVMF.variables"
    ++ check "fsType" (elem a.fsType fsTypeNames) (
      "one of ${oneOfText fsTypeNames} (erofs and squashfs only with onlyNixStore = true)"
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
      let
        mib = if isDigitSize a.memSize then fromDecimal a.memSize else a.memSize;
      in
      isInt mib && mib >= rules.limits.memSizeMinMiB && mib <= rules.limits.memSizeMaxMiB
    ) "an integer number of MiB between ${toString rules.limits.memSizeMinMiB} and ${toString rules.limits.memSizeMaxMiB}, or a string of such digits as nixpkgs' toString reads it (at least ${toString rules.limits.memSizeWarningMiB} for the build VM to boot)"
    ++ check "name" (nameOk "derivationName" a.name)
      "a derivation name of 1 to ${toString rules.limits.nameBytes} characters from A-Z a-z 0-9 + . _ ? = -, not starting with \".\""
    ++ check "baseName" (nameOk "fileName" a.baseName)
      "a file name of 1 to ${toString rules.limits.nameBytes} characters from A-Z a-z 0-9 + . _ ? = -"
    ++ check "format" (elem a.format formatNames) (
      "one of ${oneOfText formatNames}" + (if isString a.format then didYouMean a.format formatNames else "")
    )
    ++ check "rootGPUID" (matches pattern.guid a.rootGPUID) "a GUID such as \"F222513B-DED1-49FA-B591-20CE86A2FE7F\""
    ++ check "rootFSUID" (
      a.rootFSUID == null || matches pattern.guid a.rootFSUID
    ) "null or a UUID such as \"F222513B-DED1-49FA-B591-20CE86A2FE7F\""
    ++ (
      if !isList a.additionalPaths then
        [ (bad "additionalPaths" a.additionalPaths "a list of store paths or derivations") ]
      else
        map (p: bad "additionalPaths" p "each entry must be a store path or derivation") (
          filter (p: !isPathLike p) a.additionalPaths
        )
    );

  # The seed's and nixpkgs' asserts, and what the builder needs beyond them (arguments already typed).
  crossProblems =
    a:
    let
      table = rules.tables.${a.partitionTableType};
      fs = fsFact a.fsType;
      # Where the boot partition ends: nixpkgs' round_to_nearest always adds a MiB ("256M" ends at 257 MiB).
      bootEnd = (parseIEC a.bootSize / MiB + 1) * MiB;
      targets = map (e: targetPath e.target) a.contents;
      dups = filter (i: elem (elemAt targets i) (genList (j: elemAt targets j) i)) (
        genList (i: i) (length targets)
      );
    in
    (
      if fs.uuid && a.deterministic && a.rootFSUID == null then
        [
          (err "rootFSUID = null is not allowed with deterministic = true and fsType = ${show a.fsType}: give a UUID, or set deterministic = false")
        ]
      else
        [ ]
    )
    ++ (
      if fs.readOnly && !a.onlyNixStore then
        [
          (err "fsType = ${show a.fsType} is read-only and allowed only with onlyNixStore = true: use \"ext4\", \"btrfs\" or \"xfs\"")
        ]
      else if fs.labelBytes != null && !fs.labelTruncated && stringLength a.label > fs.labelBytes then
        [
          (err "label = ${show a.label} is too long for fsType = ${show a.fsType}: at most ${toString fs.labelBytes} bytes")
        ]
      else
        [ ]
    )
    ++ (
      if a.touchEFIVars && !table.efiVariables then
        [
          (err "touchEFIVars = true is not allowed with partitionTableType = ${show a.partitionTableType}: it needs one of ${oneOfText efiTables}")
        ]
      else
        [ ]
    )
    ++ (
      if !a.onlyNixStore then
        [ ]
      else
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
    )
    ++ (
      if table.bootStartMiB != null && bootEnd <= table.bootStartMiB * MiB then
        [
          (err "bootSize = ${show a.bootSize} is not allowed with partitionTableType = ${show a.partitionTableType}: it is the END offset of the boot partition (rounded as nixpkgs does, to ${
            toString (bootEnd / MiB)
          } MiB), which starts at ${toString table.bootStartMiB} MiB (give more, such as \"256M\")")
        ]
      else
        [ ]
    )
    ++ (
      if table.bootStartMiB != null && isInt a.diskSize && a.diskSize * MiB <= bootEnd then
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

  # What nixpkgs accepts and does, surprisingly: done the same, with an evaluation warning.
  argWarnings =
    args: a:
    let
      fs = fsFact a.fsType;
    in
    (
      if fs.labelTruncated && stringLength a.label > fs.labelBytes then
        [
          (err "label = ${show a.label} is longer than the ${toString fs.labelBytes} bytes ${a.fsType} stores; mke2fs truncates it (the builder keeps the first 16 bytes, whole characters)")
        ]
      else
        [ ]
    )
    ++ (
      if a.memSize < rules.limits.memSizeWarningMiB then
        [
          (err "memSize = ${toString a.memSize} MiB is below ${toString rules.limits.memSizeWarningMiB}: the build VM may not boot")
        ]
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
          unknown = filter (k: !elem k contentKeys) (attrNames (elemAt a.contents i));
        in
        map (
          k:
          err "contents[${toString i}] has an unknown attribute ${show k}${didYouMean k contentKeys}, which is ignored (nixpkgs ignores it too); known: ${oneOfText contentKeys}"
        ) unknown
      ) (length a.contents)
    );
}
