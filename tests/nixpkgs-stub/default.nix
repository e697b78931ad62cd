# The nixpkgs stand-in: a lib subset and the pkgs attributes makeDiskImage uses, made from host tools
# (needs `--option sandbox false`). host.json is written by the test that assembles this directory: the
# venv's python, whether the VM stand-in (builder.vm from builderSource) is used, and the fixture system
# directory to use (null: the small closure of system.nix).
#
# As strict as nixpkgs where a user can see it: each package holds only the programs of the Debian
# packages it stands for (pkgs.parted has parted, not mkfs.ext4), and runCommand, preVM and postVM see
# PATH made of their inputs and stdenv's initialPath only, never the host's, as a stdenv build does.
{ system }:
let
  host = builtins.fromJSON (builtins.readFile ./host.json);

  lib = import ./lib.nix { inherit nixosSystem; };

  # The programs (bin/, sbin/ entries) of some Debian packages, linked under $out/bin. Packages that are
  # not installed are skipped (make, for instance), so a missing tool fails where nixpkgs' would not.
  debianTools =
    name: debs:
    derivation {
      name = "stub-${name}";
      inherit system;
      builder = "/bin/sh";
      args = [
        "-ec"
        ''
          PATH=/usr/bin:/bin
          mkdir -p $out/bin
          for deb in ${builtins.concatStringsSep " " debs}; do
            dpkg-query -L "$deb" 2>/dev/null || true
          done | while read -r f; do
            case "$f" in */bin/*|*/sbin/*) ;; *) continue ;; esac
            [ -f "$f" ] && [ -x "$f" ] || continue
            # /bin/bash -> /usr/bin/bash: merged-/usr names, which the build VM's guest has.
            real="$(readlink -f "''${f%/*}")/''${f##*/}"
            [ -e "$out/bin/''${f##*/}" ] || ln -s "$real" "$out/bin/"
          done
          # nixpkgs' gawk provides awk (Debian's comes through the alternatives system, not the package).
          for a in gawk mawk; do
            if [ -e "$out/bin/$a" ] && [ ! -e "$out/bin/awk" ]; then ln -s "$(readlink "$out/bin/$a")" "$out/bin/awk"; fi
          done
        ''
      ];
    };

  # What each nixpkgs attribute stands for among Debian's packages.
  tools = builtins.mapAttrs debianTools {
    coreutils = [ "coreutils" ];
    findutils = [ "findutils" ];
    diffutils = [ "diffutils" ];
    gnused = [ "sed" ];
    gnugrep = [ "grep" ];
    gawk = [ "gawk" "mawk" ];
    gnutar = [ "tar" ];
    gzip = [ "gzip" ];
    bzip2 = [ "bzip2" ];
    xz = [ "xz-utils" ];
    gnumake = [ "make" ];
    bash = [ "bash" ];
    patch = [ "patch" ];
    file = [ "file" ];
    util-linux = [ "util-linux" "util-linux-extra" "mount" "fdisk" "bsdutils" ];
    e2fsprogs = [ "e2fsprogs" ];
    dosfstools = [ "dosfstools" ];
    mtools = [ "mtools" ];
    parted = [ "parted" ];
    gptfdisk = [ "gdisk" ];
    rsync = [ "rsync" ];
    nix = [ "nix-bin" ];
    systemdMinimal = [ "systemd" ];
    qemu-utils = [ "qemu-utils" ];
    fakeroot = [ "fakeroot" ];
    btrfs-progs = [ "btrfs-progs" ];
    xfsprogs = [ "xfsprogs" ];
    erofs-utils = [ "erofs-utils" ];
    squashfsTools = [ "squashfs-tools" ];
    libfaketime = [ "faketime" "libfaketime" ];
    nixfmt-tree = [ ];
  };

  # stdenv's initialPath (pkgs/stdenv/generic/common-path.nix): on PATH in every stdenv build.
  initialPath = with tools; [
    coreutils
    findutils
    diffutils
    gnused
    gnugrep
    gawk
    gnutar
    gzip
    bzip2
    gnumake
    bash
    patch
    xz
    file
  ];

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
      builder = "${tools.bash}/bin/bash";
      passAsFile = [ "text" ];
      args = [
        "-ec"
        # Not cp as the last command: bash would exec it, and Nix 2.8 (no sandbox) then at times kills
        # the finished builder before reaping it ("failed due to signal 9").
        "${tools.coreutils}/bin/cp \"$textPath\" \"$out\"; exit 0"
      ];
    };

  # runCommand: PATH from nativeBuildInputs, buildInputs and stdenv's initialPath, then the script.
  # Like nixpkgs' runCommand it asks for parallel building (vmTools then gives the VM that many CPUs).
  runCommand =
    name: env: buildCommand:
    mkDrv (
      {
        enableParallelBuilding = true;
      }
      // env
      // {
        inherit name buildCommand;
        builder = "${tools.bash}/bin/bash";
        args = [
          "-e"
          ./run-command.sh
        ];
        nativeBuildInputs = env.nativeBuildInputs or [ ];
        buildInputs = env.buildInputs or [ ];
        initialPath = initialPath;
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
        builder = "${tools.bash}/bin/bash";
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

  # The configuration's settings the stand-in reads: from plain attribute-set modules only (this is not
  # the module system), the first definition of `path` or `default`.
  settingOf =
    modules: path: default:
    let
      defined = builtins.filter (m: builtins.isAttrs m && lib.attrByPath path null m != null) modules;
    in
    if defined == [ ] then default else lib.attrByPath path null (builtins.head defined);

  # The bootable fixture system (tests/fixtures/system, copied in by the test) when given, else a small
  # closure. For an aarch64-linux configuration it is the aarch64 fixture (Debian's arm64 parts), whose
  # derivations still say x86_64-linux: they only copy files, so this x86_64 machine builds them, where a
  # real aarch64 NixOS closure would come from a binary cache or an aarch64 builder.
  fixtureFor =
    system: modules:
    let
      systemdBoot = settingOf modules [ "boot" "loader" "systemd-boot" "enable" ] false;
      xbootldr = settingOf modules [ "boot" "loader" "systemd-boot" "xbootldrMountPoint" ] null != null;
    in
    if host.system == null then
      { toplevel = import ./system.nix { inherit system; }; systemd = null; }
    else
      import (./. + "/${host.system}") ({
        system = "x86_64-linux";
        arch = if system == "aarch64-linux" then "aarch64" else "x86_64";
        systemdBoot = if !systemdBoot then "none" else if xbootldr then "xbootldr" else "esp";
        grubDevices = if systemdBoot then "" else "/dev/vda";
      }
      # GRUB with efiSupport is installed by prepare (see nixosSystem): the fixture then names GRUB as its loader.
      // (if settingOf modules [ "boot" "loader" "grub" "efiSupport" ] false then { loader = "grub"; } else { }));

  # nixos-enter's stand-in, with its own PATH as nixpkgs' package has (util-linux, coreutils).
  nixosEnter = runCommand "nixos-enter-stand-in" { } ''
    mkdir -p $out/bin
    {
      echo '#!${tools.bash}/bin/bash'
      echo 'export PATH=${lib.makeBinPath [ tools.util-linux tools.coreutils ]}'
      cat ${./nixos-enter.sh}
    } > $out/bin/nixos-enter
    chmod +x $out/bin/nixos-enter
  '';

  nixosSystem =
    { system, modules }:
    let
      fixture = fixtureFor system modules;
      setting = settingOf modules;
      grubEnabled = setting [ "boot" "loader" "grub" "enable" ] true;
      grubEfi = setting [ "boot" "loader" "grub" "efiSupport" ] false;
    in
    {
      config = {
        # The module argument pkgs (nixos/modules/misc/nixpkgs.nix sets config._module.args.pkgs), where
        # nixpkgs' grub.nix finds GRUB: grub2, whose `override { efiSupport = true; }` is the EFI variant. Here
        # grub2 is the fixture's GRUB (Debian's modules for BIOS and EFI in NixOS's layout, so override gives
        # it back), present only when the fixture was made with GRUB as its loader (efiSupport): GRUB is then
        # installed by prepare (nix/grub.nix), while the BIOS-only jobs, whose fixture has no GRUB package,
        # keep the VM-installed GRUB the tests here boot (nix/grub.nix without a grub2 keeps the VM).
        _module.args.pkgs =
          if grubEfi && fixture ? grub then { grub2 = fixture.grub // { override = _: fixture.grub; }; } else { };
        system.build.toplevel = fixture.toplevel;
        # Deprecated in nixpkgs 25.11 (a warning; pkgs.nixos-enter replaces it); here an error, so any use shows.
        system.build.nixos-enter = throw "config.system.build.nixos-enter is deprecated: use pkgs.nixos-enter";
        system.nixos = {
          version = "25.11-stub";
          versionSuffix = "pre-stub";
          # Entry titles say what the system is: the fixture, not NixOS.
          distroName = "Fixture system";
        };
        nixpkgs.hostPlatform.system = system;
        # systemd's package: the fixture's systemd-boot EFI binary, where NixOS's systemd has it.
        systemd.package = fixture.systemd;
        boot.loader = {
          timeout = setting [ "boot" "loader" "timeout" ] 5;
          grub = {
            enable = grubEnabled;
            devices = [ "/dev/vda" ];
            efiSupport = grubEfi;
            efiInstallAsRemovable = setting [ "boot" "loader" "grub" "efiInstallAsRemovable" ] false;
          };
          systemd-boot = {
            enable = setting [ "boot" "loader" "systemd-boot" "enable" ] false;
            xbootldrMountPoint = setting [ "boot" "loader" "systemd-boot" "xbootldrMountPoint" ] null;
            editor = setting [ "boot" "loader" "systemd-boot" "editor" ] true;
            consoleMode = setting [ "boot" "loader" "systemd-boot" "consoleMode" ] "keep";
            extraInstallCommands = setting [ "boot" "loader" "systemd-boot" "extraInstallCommands" ] "";
          };
          efi.efiSysMountPoint = setting [ "boot" "loader" "efi" "efiSysMountPoint" ] "/boot";
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
tools
// {
  inherit
    lib
    writeText
    runCommand
    closureInfo
    vmTools
    python3Packages
    ;
  nixos-enter = nixosEnter;
  # qemu for NixOS tests (nixos/lib/qemu-common.nix reads its stdenv).
  qemu_test = debianTools "qemu-test" [ "qemu-system-x86" "qemu-system-arm" ] // {
    stdenv.hostPlatform.isLinux = true;
    stdenv.system = system;
  };
  path = ./.;
  stdenv = {
    hostPlatform.system = system;
    inherit initialPath;
  };
  # Debian's OVMF as pkgs.OVMF.fd; like nixpkgs' default OVMF it needs no system management mode.
  OVMF.fd = {
    firmware = "/usr/share/OVMF/OVMF_CODE_4M.fd";
    variables = "/usr/share/OVMF/OVMF_VARS_4M.fd";
    systemManagementModeRequired = false;
  };
}
