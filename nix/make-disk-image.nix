# makeDiskImage: argument-compatible with nixpkgs' nixos/lib/make-disk-image.nix.
# Arguments are checked in ./args.nix (pure builtins); this file only wires derivations:
# the closure, the channel, the spec file, and the builder run with or without a VM.
{
  pkgs,
  lib,
  config,
  ...
}@args:
let
  argsLib = import ./args.nix;
  a = argsLib.normalize {
    inherit args;
    defaultOVMF = pkgs.OVMF.fd;
  };

  builder = import ./package.nix { inherit pkgs; };
  run = "${builder}/bin/make-disk-image";

  toplevel = "${config.system.build.toplevel}";
  channel = if a.copyChannel then "${import ./channel.nix { inherit pkgs lib config; }}" else null;
  basePaths = [ toplevel ] ++ lib.optional (channel != null) channel;
  additionalPaths = argsLib.extraPaths basePaths a.additionalPaths;
  closureInfo = pkgs.closureInfo { rootPaths = basePaths ++ additionalPaths; };

  grub = config.boot.loader.grub or { };
  spec = argsLib.toSpec {
    args = a;
    inherit toplevel channel additionalPaths;
    closureInfo = "${closureInfo}";
    storeDir = builtins.storeDir;
    grubDevices = if grub.enable or false then grub.devices or [ ] else [ ];
  };
  # A file in the store: the derivation depends on every store path the spec names.
  specFile = pkgs.writeText "${a.name}-spec.json" (builtins.toJSON spec);

  fileName = argsLib.fileName a;
  needsVM = argsLib.needsVM a;
  efiVars = "$out/efi-vars.fd";

  passthru = {
    inherit spec specFile needsVM builder closureInfo;
    filePath = fileName;
  };

  # The host part after the image exists: convert into $out, then the user's postVM with $diskImage set.
  convert = ''
    ${run} convert ${specFile} --image "$diskImage" --out "$out"
    diskImage=$out/${fileName}
  '';

  # Everything on the host: no VM, no kvm system feature; prepare and convert in one process.
  plain = pkgs.runCommand a.name {
    inherit passthru;
  } (''
    ${run} prepare ${specFile} --image nixos.raw --out "$out"
    diskImage=$out/${fileName}
  '' + a.postVM);

  # prepare on the host, finalize as root in the VM (the image is /dev/vda), convert on the host.
  inVM = pkgs.vmTools.runInLinuxVM (
    pkgs.runCommand a.name {
      inherit passthru;
      inherit (a) memSize;
      nativeBuildInputs = [ builder ] ++ lib.optional (config.system.build ? nixos-enter) config.system.build.nixos-enter;
      preVM = ''
        ${run} prepare ${specFile} --image nixos.raw
        diskImage=nixos.raw
      '' + lib.optionalString a.touchEFIVars ''
        mkdir -p $out
        cp ${a.efiVariables} ${efiVars}
        chmod 0644 ${efiVars}
      '';
      # pin-vm-writes: deterministic builds get the VM's times, journal, free space and FAT entries pinned.
      postVM = ''
        ${run} pin-vm-writes ${specFile} --image "$diskImage"
      '' + convert + a.postVM;
      QEMU_OPTS = lib.optionalString a.touchEFIVars (
        "-drive if=pflash,format=raw,unit=0,readonly=on,file=${a.efiFirmware}"
        + " -drive if=pflash,format=raw,unit=1,file=${efiVars}"
      );
    } "${run} finalize ${specFile} --device /dev/vda"
  );
in
if needsVM then inVM else plain
