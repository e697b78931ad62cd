# nixpkgs' nixos/lib/eval-config.nix entry point (used by default.nix), answered by the stand-in's nixosSystem.
{ system, modules, ... }:
(import ../../default.nix { inherit system; }).lib.nixosSystem { inherit system modules; }
