# Stands in for nixpkgs in tests (`--override-input nixpkgs path:<assembled copy>`): just enough of
# lib and pkgs for this flake's outputs, built from host tools. Not nixpkgs; see default.nix.
{
  outputs =
    { self }:
    let
      pkgsFor = system: import ./default.nix { inherit system; };
    in
    {
      lib = (pkgsFor "x86_64-linux").lib;
      legacyPackages = {
        x86_64-linux = pkgsFor "x86_64-linux";
        aarch64-linux = pkgsFor "aarch64-linux";
      };
    };
}
