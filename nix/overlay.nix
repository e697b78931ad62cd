# Adds makeDiskImage (the function, bound to this package set) and its builder package.
final: _prev: {
  makeDiskImage = args: import ./make-disk-image.nix ({ pkgs = final; inherit (final) lib; } // args);
  make-disk-image-builder = import ./package.nix { pkgs = final; };
}
