# The Python builder packaged from this repository, with the tools it runs on PATH.
{ pkgs }:
let
  inherit (pkgs) lib python3Packages;
  root = ../.;
  # Only what the package needs, so edits to tests or docs do not rebuild images.
  wanted =
    path: type:
    let
      rel = lib.removePrefix (toString root + "/") (toString path);
    in
    !(lib.hasInfix "__pycache__" rel)
    && !(lib.hasSuffix ".so" rel) # a stat shim built in a development checkout; the package builds its own
    && (
      rel == "pyproject.toml"
      || rel == "builder"
      || lib.hasPrefix "builder/" rel
      || rel == "templates"
      || lib.hasPrefix "templates/" rel
    );
  # The tools every build runs, and those of each root filesystem (builder/rules.json's fsTypes).
  rules = builtins.fromJSON (builtins.readFile ../builder/rules.json);
  fsTools = lib.unique (lib.concatMap (fs: fs.tools) rules.fsTypes);
in
python3Packages.buildPythonApplication {
  pname = "make-disk-image";
  version = "0.1.0";
  pyproject = true;
  src = builtins.path {
    path = root;
    name = "make-disk-image-src";
    filter = wanted;
  };
  build-system = [ python3Packages.setuptools ];
  dependencies = [
    python3Packages.jinja2
    python3Packages.jsonschema
    python3Packages.pyparted
  ];
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath (
      [
        pkgs.e2fsprogs
        pkgs.dosfstools
        pkgs.mtools
        pkgs.util-linux
        pkgs.qemu-utils
        pkgs.nix
      ]
      ++ map (name: pkgs.${name}) fsTools
    ))
  ];
  meta = {
    description = "Builds NixOS disk images from a validated JSON spec (makeDiskImage's builder)";
    mainProgram = "make-disk-image";
  };
}
