# For users without flakes: the same outputs, nixpkgs from nix/pin.json (the flake.lock pin).
#   nix-build -A image
#   import (builtins.fetchTarball ".../archive/<rev>.tar.gz") { } -> makeDiskImage etc.
{
  pin ? builtins.fromJSON (builtins.readFile ./nix/pin.json),
  nixpkgs ? builtins.fetchTarball {
    inherit (pin) url sha256;
  },
  system ? builtins.currentSystem,
  pkgs ? import nixpkgs {
    inherit system;
    config = { };
    overlays = [ ];
  },
}:
let
  inherit (pkgs) lib;
  example = import (nixpkgs + "/nixos/lib/eval-config.nix") {
    inherit system;
    modules = [ ./nix/example/configuration.nix ];
  };
in
{
  makeDiskImage = import ./nix/make-disk-image.nix;
  overlay = import ./nix/overlay.nix;
  nixosModule = import ./nix/module.nix;
  builder = import ./nix/package.nix { inherit pkgs; };
  image = import ./nix/make-disk-image.nix (
    {
      inherit pkgs lib;
      inherit (example) config;
    }
    // import ./nix/example/image.nix
  );
}
