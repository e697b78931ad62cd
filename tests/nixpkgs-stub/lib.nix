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
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  makeBinPath = pkgs: concatStringsSep ":" (map (p: "${p}/bin") pkgs);
  escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  cleanSource = src: {
    outPath = builtins.path {
      path = src;
      name = "source";
      filter = path: type: baseNameOf path != ".git" && baseNameOf path != "result";
    };
  };
}
