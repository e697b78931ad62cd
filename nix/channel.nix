# The nixos channel nixpkgs' make-disk-image installs: a copy of pkgs.path named nixos-<version>.
{
  pkgs,
  lib,
  config,
}:
pkgs.runCommand "nixos-${config.system.nixos.version}" { } ''
  mkdir -p $out
  cp -prd ${(lib.cleanSource pkgs.path).outPath} $out/nixos
  chmod -R u+w $out/nixos
  if [ ! -e $out/nixos/nixpkgs ]; then
    ln -s . $out/nixos/nixpkgs
  fi
  rm -rf $out/nixos/.git
  echo -n ${lib.escapeShellArg config.system.nixos.versionSuffix} > $out/nixos/.version-suffix
''
