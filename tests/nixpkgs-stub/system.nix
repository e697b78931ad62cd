# The stand-in's toplevel until a bootable fixture system is used: a few store paths that refer to each
# other (toplevel -> files -> lib), made with /bin/sh so Nix scans and registers their references.
{ system }:
let
  mk =
    name: script:
    derivation {
      name = "stub-system-${name}";
      inherit system;
      builder = "/bin/sh";
      args = [
        "-ec"
        script
      ];
      PATH = "/usr/bin:/bin";
    };
  lib = mk "lib" ''
    mkdir -p $out/lib
    printf 'stub library\n' > $out/lib/libstub.txt
  '';
  files = mk "files" ''
    mkdir -p $out/bin
    printf '#!/bin/sh\necho hello from the stub system\n' > $out/bin/hello
    chmod 0755 $out/bin/hello
    ln -s ${lib}/lib/libstub.txt $out/lib-link
  '';
in
mk "toplevel" ''
  mkdir -p $out/bin
  ln -s ${files} $out/sw
  printf '#!/bin/sh\nexec %s/bin/hello\n' ${files} > $out/bin/init
  chmod 0755 $out/bin/init
  printf 'stub system, not NixOS\n' > $out/nixos-version
''
