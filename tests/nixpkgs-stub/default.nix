# The nixpkgs stand-in: a lib subset and the pkgs attributes makeDiskImage uses, made from host tools
# (builder /bin/sh, needs `--option sandbox false`). host.json is written by the test that assembles
# this directory: the venv's python, whether the VM stand-in (builder.vm from builderSource) is used, and
# the fixture system directory to use (null: the small closure of system.nix).
{ system }:
let
  host = builtins.fromJSON (builtins.readFile ./host.json);
  hostPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

  lib = import ./lib.nix { inherit nixosSystem; };

  # Every host executable under one bin/, so `${pkg}/bin` works for any tool package.
  hostBin = derivation {
    name = "host-tools";
    inherit system;
    builder = "/bin/sh";
    args = [
      "-ec"
      ''
        PATH=${hostPath}
        mkdir -p $out/bin
        for d in ${builtins.replaceStrings [ ":" ] [ " " ] hostPath}; do
          for f in $d/*; do
            [ -x "$f" ] && [ ! -e "$out/bin/''${f##*/}" ] && ln -s "$f" "$out/bin/" || true
          done
        done
      ''
    ];
  };

  # A derivation plus passthru, like nixpkgs' (passthru never reaches the builder).
  mkDrv =
    attrs:
    let
      passthru = attrs.passthru or { };
      drv = derivation (removeAttrs attrs [ "passthru" ] // { inherit system; });
    in
    drv // passthru // { inherit passthru; };

  writeText =
    name: text:
    mkDrv {
      inherit name text;
      builder = "/bin/sh";
      passAsFile = [ "text" ];
      args = [
        "-ec"
        "PATH=${hostPath}; cp \"$textPath\" \"$out\""
      ];
    };

  # runCommand: nativeBuildInputs' bin on PATH before the host's, then the script.
  runCommand =
    name: env: buildCommand:
    mkDrv (
      env
      // {
        inherit name buildCommand;
        builder = "/bin/bash";
        args = [
          "-e"
          ./run-command.sh
        ];
        hostPath = hostPath;
        nativeBuildInputs = env.nativeBuildInputs or [ ];
      }
    );

  closureInfo =
    { rootPaths }:
    mkDrv {
      name = "closure-info";
      __structuredAttrs = true;
      exportReferencesGraph.closure = rootPaths;
      builder = host.python;
      args = [ ./closure-info.py ];
    };

  # Like nixpkgs' vmTools.runInLinuxVM: takes a derivation, runs preVM on the host, the original
  # builder as root in a VM with the image at /dev/vda, then postVM; requires the kvm feature.
  vmTools.runInLinuxVM =
    drv:
    mkDrv (
      drv.drvAttrs
      // {
        passthru = drv.passthru or { };
        builder = "/bin/bash";
        args = [
          "-e"
          ./vm-run.sh
        ];
        origBuilder = drv.drvAttrs.builder;
        origArgs = drv.drvAttrs.args;
        vmRunner = if host.vmRunner then "${host.python} ${./vm-runner.py} ${./host.json}" else "";
        requiredSystemFeatures = [ "kvm" ];
      }
    );

  # The bootable fixture system (tests/fixtures/system, copied in by the test) when given, else a small closure.
  toplevelFor =
    modules:
    let
      # Not a module system: only plain attribute-set modules are looked at, for the bootloader choice.
      setting = path: builtins.any (m: builtins.isAttrs m && lib.attrByPath path false m) modules;
      systemdBoot = setting [ "boot" "loader" "systemd-boot" "enable" ];
    in
    if host.system == null then
      import ./system.nix { inherit system; }
    else
      (import (./. + "/${host.system}") {
        inherit system;
        systemdBoot = if systemdBoot then "esp" else "none";
        grubDevices = if systemdBoot then "" else "/dev/vda";
      }).toplevel;

  nixosEnter = runCommand "nixos-enter-stand-in" { } ''
    mkdir -p $out/bin
    { echo '#!/bin/sh'; cat ${./nixos-enter.sh}; } > $out/bin/nixos-enter
    chmod +x $out/bin/nixos-enter
  '';

  nixosSystem =
    { system, modules }:
    let
      toplevel = toplevelFor modules;
      grubEnabled = !(builtins.any (m: builtins.isAttrs m && lib.attrByPath [ "boot" "loader" "grub" "enable" ] true m == false) modules);
    in
    {
      config = {
        system.build.toplevel = toplevel;
        system.build.nixos-enter = nixosEnter;
        system.nixos = {
          version = "25.11-stub";
          versionSuffix = "pre-stub";
        };
        boot.loader.grub = {
          enable = grubEnabled;
          devices = [ "/dev/vda" ];
        };
      };
    };

  python3Packages = {
    setuptools = null;
    jinja2 = null;
    jsonschema = null;
    pyparted = null;
    # The venv's Python over the package as setuptools would install it from pyproject.toml: only the
    # listed packages' modules and package-data, console scripts from [project.scripts], wrapped with
    # makeWrapperArgs' PATH prefix. Files outside the packages are not installed, as in a real build.
    buildPythonApplication =
      {
        pname,
        version,
        src,
        makeWrapperArgs ? [ ],
        ...
      }:
      runCommand "${pname}-${version}" {
        inherit src;
        binPath = builtins.elemAt makeWrapperArgs 3;
        python = host.python;
      } "$python ${./install-python-app.py}";
  };
in
{
  inherit
    lib
    writeText
    runCommand
    closureInfo
    vmTools
    python3Packages
    ;
  path = ./.;
  stdenv.hostPlatform.system = system;
  OVMF.fd = {
    firmware = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    variables = "/usr/share/OVMF/OVMF_VARS_4M.fd";
  };
  e2fsprogs = hostBin;
  dosfstools = hostBin;
  mtools = hostBin;
  util-linux = hostBin;
  qemu-utils = hostBin;
  nix = hostBin;
  fakeroot = hostBin;
  btrfs-progs = hostBin;
  xfsprogs = hostBin;
  erofs-utils = hostBin;
  squashfsTools = hostBin;
  libfaketime = hostBin;
  nixfmt-tree = hostBin;
}
