# makeDiskImage: argument-compatible with nixpkgs' nixos/lib/make-disk-image.nix.
# Arguments are checked in ./args (pure builtins, rules from builder/rules.json); this file only wires derivations:
# the closure, the channel, the spec file, and the builder's steps run with or without a VM.
{
  pkgs,
  lib,
  config,
  ...
}@args:
let
  argsLib = import ./args;
  a = argsLib.normalize {
    inherit args;
    defaultOVMF = pkgs.OVMF.fd;
    warn = lib.warn;
  };

  builder = import ./package.nix { inherit pkgs; };
  run = "${builder}/bin/make-disk-image";

  toplevel = "${config.system.build.toplevel}";
  channel = if a.copyChannel then "${import ./channel.nix { inherit pkgs lib config; }}" else null;
  basePaths = [ toplevel ] ++ lib.optional (channel != null) channel;
  additionalPaths = argsLib.extraPaths basePaths a.additionalPaths;
  closureInfo = pkgs.closureInfo { rootPaths = basePaths ++ additionalPaths; };

  # The image derivation runs on pkgs' platform; the system may be another one's (an aarch64 configuration
  # with pkgs for x86_64): its closure is only copied, which any platform can do, unless the VM runs it.
  buildSystem = pkgs.stdenv.hostPlatform.system or null;
  targetSystem = config.nixpkgs.hostPlatform.system or buildSystem;
  cross = buildSystem != null && targetSystem != buildSystem;

  # systemd-boot installed by prepare from the system's bootspec, without the VM (nix/systemd-boot.nix).
  systemdBoot = import ./systemd-boot.nix { inherit config targetSystem; };
  # GRUB installed by prepare, without the VM, when nothing in its options needs the system's installer (nix/grub.nix).
  grubOnHost = import ./grub.nix { inherit config targetSystem cross pkgs; args = a; };

  # The disks the bootloader installs to name the machine's disk; in the VM they are linked to /dev/vda.
  grub = config.boot.loader.grub or { };
  limine = config.boot.loader.limine or { };
  spec = argsLib.toSpec {
    args = a;
    inherit toplevel channel additionalPaths;
    closureInfo = "${closureInfo}";
    storeDir = builtins.storeDir;
    grubDevices = if grub.enable or false then grub.devices or [ ] else [ ];
    # NixOS' default biosDevice is "nodev" (nixos/modules/system/boot/loader/limine/limine.nix).
    limineBiosDevice =
      if (limine.enable or false) && (limine.biosSupport or false) then limine.biosDevice or "nodev" else null;
    systemdBoot = systemdBoot.section;
    grub = grubOnHost.section;
  };
  # A file in the store: the derivation depends on every store path the spec names.
  specFile = pkgs.writeText "${a.name}-spec.json" (builtins.toJSON spec);

  # shareRootFilesystem: the root filesystem as its own derivation, built from what it is made of alone
  # (argsLib.rootFilesystemSpec), so the images of one system that differ in format or table (where the root
  # partition is the same size) are one build of it; prepare places it instead of making it again.
  rootSpec = argsLib.rootFilesystemSpec spec;
  rootFilesystem = pkgs.runCommand "root-filesystem.${a.fsType}" { passthru.spec = rootSpec; } ''
    ${run} root-filesystem ${pkgs.writeText "root-filesystem-spec.json" (builtins.toJSON rootSpec)} --out "$out"
  '';
  placeRoot = lib.optionalString a.shareRootFilesystem " --root-filesystem ${rootFilesystem}";

  fileName = argsLib.fileName a;
  needsVM = argsLib.needsVM spec;

  # Why the VM runs, for the refusal of a cross build that needs it.
  vmReasons =
    lib.optional (a.installBootLoader && systemdBoot.section == null && grubOnHost.section == null) (
      if systemdBoot.enabled then
        systemdBoot.reason
      else if grubOnHost.enabled then
        grubOnHost.reason
      else
        "installBootLoader = true with a bootloader other than systemd-boot or GRUB (Limine, ...), whose installer is the system's own switch-to-configuration"
    )
    ++ lib.optional a.touchEFIVars "touchEFIVars = true (the boot entry is written by the system's bootctl into the VM's firmware variables)"
    ++ lib.optional (argsLib.namedOwners a) "contents owned by user or group names (they resolve with the system's own tools)";
  crossRefusal = ''
    makeDiskImage: the image of this ${targetSystem} configuration needs the build VM, which runs the system's own programs, so it must be built on ${targetSystem}; but pkgs is for ${buildSystem}. It needs the VM for:
    ${lib.concatMapStrings (r: "  - ${r}\n") vmReasons}Build it with pkgs for ${targetSystem} (on a builder of that platform), or remove what needs the VM: boot with systemd-boot (boot.loader.systemd-boot.enable = true) or with GRUB without the options named above (EFI only: BIOS GRUB is x86_64's), give contents owners as numbers, leave touchEFIVars = false, or installBootLoader = false.'';
  efiVars = "$out/efi-vars.fd";

  # nixpkgs 25.11 deprecates config.system.build.nixos-enter in favour of the package.
  nixosEnter = if pkgs ? nixos-enter then pkgs.nixos-enter else config.system.build.nixos-enter;

  # What postVM sees, as in nixpkgs, whose preVM sets PATH (the same shell runs postVM) to these tools
  # and defines sectorsToBytes, sectorsToKilobytes and friends (../templates/post-vm-env.sh).
  postVMPath = lib.makeBinPath (
    [
      pkgs.rsync
      pkgs.util-linux
      pkgs.parted
      pkgs.e2fsprogs
      pkgs.gptfdisk
      pkgs.nix
      pkgs.systemdMinimal
      nixosEnter
    ]
    ++ lib.optional (config.system.build ? nixos-install) config.system.build.nixos-install
    ++ pkgs.stdenv.initialPath
  );
  # nixpkgs' preVM also leaves root, bootSize, bootSizeMiB and the root partition's START and SECTORS set for
  # postVM; prepare writes them (builder/pipeline.py pre_vm_variables) to this file in the build directory.
  preVMVariables = "pre-vm-variables.sh";
  userPostVM = ''
    export PATH=${postVMPath}
    source ${../templates/post-vm-env.sh}
    source ./${preVMVariables}
    diskImage=$out/${fileName}
  ''
  + lib.optionalString a.touchEFIVars ''
    efiVars=${efiVars}
  ''
  + a.postVM;

  passthru = {
    inherit spec specFile needsVM builder closureInfo targetSystem;
    filePath = fileName;
    rootFilesystem = if a.shareRootFilesystem then rootFilesystem else null;
  };

  # Everything on the host: no VM, no kvm system feature; prepare and convert in one process. The raw
  # image goes where it costs no extra write: into $out for raw, else memory when it fits
  # (builder/disk/intermediate.py).
  plain = pkgs.runCommand a.name { inherit passthru; } ''
    ${run} prepare ${specFile} --out "$out"${placeRoot} --pre-vm-variables ${preVMVariables}
    ${userPostVM}
  '';

  # nixpkgs' nixos/lib/make-disk-image.nix gives the build VM `-machine q35,smm=on -global
  # driver=cfi.pflash01,property=secure,value=on` whenever `OVMF.systemManagementModeRequired or false`, OVMF
  # being the argument or its default pkgs.OVMF.fd, with or without touchEFIVars. Only the VM derivation
  # reads it, as there: an image without a VM does not look at pkgs.OVMF.
  smmRequired = (if args.OVMF or null != null then args.OVMF else pkgs.OVMF.fd).systemManagementModeRequired or false;

  # prepare on the host, finalize as root in the VM (the image is /dev/vda), then on the host the
  # after-VM step (check, settle) and convert.
  inVM = pkgs.vmTools.runInLinuxVM (
    pkgs.runCommand a.name {
      inherit passthru;
      inherit (a) memSize;
      nativeBuildInputs = [
        builder
        nixosEnter
      ];
      # runCommand would give the VM one vCPU per build core; ext4 and FAT place what the bootloader
      # writes differently then, so a deterministic image gets one.
      enableParallelBuilding = !a.deterministic;
      preVM =
        lib.optionalString (a.installBootLoader && grubOnHost.enabled && grubOnHost.section == null) ''
          echo ${lib.escapeShellArg "makeDiskImage: the build VM installs GRUB: ${grubOnHost.reason}"} >&2
        ''
        + ''
        ${run} prepare ${specFile} --image nixos.raw${placeRoot} --pre-vm-variables ${preVMVariables}
        diskImage=nixos.raw
      ''
      + lib.optionalString a.touchEFIVars ''
        mkdir -p $out
        cp ${a.efiVariables} ${efiVars}
        chmod 0644 ${efiVars}
      '';
      postVM = ''
        ${run} after-vm ${specFile} --image "$diskImage"
        ${run} convert ${specFile} --image "$diskImage" --out "$out"
      ''
      + userPostVM;
      QEMU_OPTS = lib.concatStringsSep " " (
        lib.optionals a.touchEFIVars [
          "-drive if=pflash,format=raw,unit=0,readonly=on,file=${a.efiFirmware}"
          "-drive if=pflash,format=raw,unit=1,file=${efiVars}"
        ]
        ++ lib.optionals smmRequired [
          "-machine q35,smm=on"
          "-global driver=cfi.pflash01,property=secure,value=on"
        ]
      );
    } "${run} finalize ${specFile} --device /dev/vda"
  );
in
if needsVM && cross then
  throw crossRefusal
else if needsVM then
  inVM
else
  plain
