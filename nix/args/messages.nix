# How argument problems are worded: every message names the argument, shows the value (without forcing
# derivations or failing on functions) and says what is allowed; unknown names get "did you mean".
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elemAt
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
    replaceStrings
    stringLength
    substring
    toJSON
    ;

  lower = replaceStrings (genList (i: substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26) (
    genList (i: substring i 1 "abcdefghijklmnopqrstuvwxyz") 26
  );

  min2 = a: b: if a < b then a else b;
in
rec {
  # Render any value for a message.
  show =
    v:
    if isString v || isInt v || isFloat v || isBool v || v == null then
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

  err = msg: "makeDiskImage: " + msg;
  bad = arg: value: allowed: err "${arg} = ${show value} is not allowed: ${allowed}";
}
