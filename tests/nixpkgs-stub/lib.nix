# The subset of nixpkgs' lib this flake uses, in builtins, with nixpkgs' semantics.
{ nixosSystem }:
let
  inherit (builtins) filter concatStringsSep stringLength substring listToAttrs attrNames;
in
rec {
  inherit nixosSystem;
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  mapAttrs = builtins.mapAttrs;
  filterAttrs = pred: set: listToAttrs (map (n: { name = n; value = set.${n}; }) (filter (n: pred n set.${n}) (attrNames set)));
  attrByPath =
    path: default: set:
    if path == [ ] then
      set
    else if builtins.isAttrs set && set ? ${builtins.head path} then
      attrByPath (builtins.tail path) default set.${builtins.head path}
    else
      default;
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalString = cond: s: if cond then s else "";
  optionalAttrs = cond: set: if cond then set else { };
  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
  hasSuffix =
    suf: s:
    stringLength s >= stringLength suf
    && substring (stringLength s - stringLength suf) (stringLength suf) s == suf;
  removePrefix = pre: s: if hasPrefix pre s then substring (stringLength pre) (stringLength s) s else s;
  hasInfix = infix: s: builtins.match ".*${escapeRegex infix}.*" s != null;
  escapeRegex = builtins.replaceStrings
    [ "\\" "." "*" "+" "?" "(" ")" "[" "]" "{" "}" "|" "^" "$" ]
    [ "\\\\" "\\." "\\*" "\\+" "\\?" "\\(" "\\)" "\\[" "\\]" "\\{" "\\}" "\\|" "\\^" "\\$" ];
  concatStrings = concatStringsSep "";
  concatMapStrings = f: list: concatStringsSep "" (map f list);
  concatMap = builtins.concatMap;
  unique = builtins.foldl' (acc: e: if builtins.elem e acc then acc else acc ++ [ e ]) [ ];
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  makeBinPath = pkgs: concatStringsSep ":" (map (p: "${p}/bin") pkgs);
  escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  # nixpkgs' lib.warn on a Nix without builtins.warn (colours left out): the message on stderr, then the value.
  warn = msg: builtins.trace "evaluation warning: ${msg}";
  concatStringsSep = builtins.concatStringsSep;
  # The module system's own representations (lib/modules.nix, lib/options.nix), so a module's
  # definitions can be read as nixpkgs' evalModules would see them.
  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
    type = types.bool;
  };
  types =
    let
      t = name: extra: { _type = "option-type"; inherit name; } // extra;
    in
    {
      bool = t "bool" { };
      str = t "str" { };
      lines = t "lines" { };
      path = t "path" { };
      package = t "package" { };
      anything = t "anything" { };
      attrs = t "attrs" { };
      ints.positive = t "positiveInt" { };
      enum = values: t "enum" { inherit values; };
      either = a: b: t "either" { inherit a b; };
      oneOf = ts: t "oneOf" { inherit ts; };
      strMatching = pattern: t "strMatching" { inherit pattern; };
      nullOr = a: t "nullOr" { inherit a; };
      listOf = a: t "listOf" { inherit a; };
      attrsOf = a: t "attrsOf" { inherit a; };
    };
  cleanSource = src: {
    outPath = builtins.path {
      path = src;
      name = "source";
      filter = path: type: baseNameOf path != ".git" && baseNameOf path != "result";
    };
  };
}
