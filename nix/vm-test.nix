# NixOS VM test (machines with KVM): the example system, configured through the module, is built
# into an image; the test boots that image and checks that it installed a working NixOS.
{
  pkgs,
  nixosSystem,
  module,
}:
let
  system = pkgs.stdenv.hostPlatform.system;
  machine = nixosSystem {
    inherit system;
    modules = [
      ./example/configuration.nix
      module
      (
        { modulesPath, ... }:
        {
          imports = [ (modulesPath + "/testing/test-instrumentation.nix") ];
          makeDiskImage = import ./example/image.nix // {
            enable = true;
          };
        }
      )
    ];
  };
  image = machine.config.system.build.diskImage;
  # nixpkgs' own qemu command for this platform, with KVM when present and TCG otherwise.
  qemu-common = import (pkgs.path + "/nixos/lib/qemu-common.nix") {
    inherit (pkgs) lib;
    inherit pkgs;
  };
  qemu = qemu-common.qemuBinary pkgs.qemu_test;
in
pkgs.testers.runNixOSTest {
  name = "make-disk-image-boot";
  nodes = { };
  testScript = ''
    import os
    import subprocess

    overlay = os.path.join(os.environ.get("TMPDIR", "/tmp"), "overlay.qcow2")
    subprocess.run(
        ["${pkgs.qemu-utils}/bin/qemu-img", "create", "-f", "qcow2", "-F", "qcow2",
         "-b", "${image}/${image.filePath}", overlay],
        check=True,
    )
    image = create_machine(
        "${qemu} -m 1024 "
        + f"-drive file={overlay},if=virtio",
        name="image",
    )
    image.start()
    image.wait_for_unit("multi-user.target")
    image.succeed("test -e /etc/NIXOS")
    image.succeed("test \"$(readlink -f /run/current-system)\" = \"$(readlink -f /nix/var/nix/profiles/system)\"")
    image.succeed("nix-store --verify --check-contents")
    image.succeed("findmnt -n -o FSTYPE / | grep -qx ext4")
    image.shutdown()
  '';
}
