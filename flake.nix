{
  description = "makeDiskImage: NixOS disk images from a validated spec; a drop-in for nixpkgs' make-disk-image.nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      makeDiskImage = import ./nix/make-disk-image.nix;

      exampleSystem =
        system: modules:
        lib.nixosSystem {
          inherit system;
          modules = [ ./nix/example/configuration.nix ] ++ modules;
        };

      # The example system as an image; `args` overrides nix/example/image.nix, `modules` extend the system.
      # `system` is the configuration's platform; pkgs (the build machine's) may be another one's, when
      # nothing needs the build VM (makeDiskImage refuses the rest at evaluation).
      exampleImage =
        pkgs:
        {
          args ? { },
          modules ? [ ],
          system ? pkgs.stdenv.hostPlatform.system,
        }:
        makeDiskImage (
          {
            inherit pkgs;
            inherit (pkgs) lib;
            inherit (exampleSystem system modules) config;
          }
          // import ./nix/example/image.nix
          // args
        );

      # EFI layouts boot with systemd-boot from the ESP; hybrid keeps GRUB for BIOS and adds EFI.
      espModule = {
        fileSystems."/boot" = {
          device = "/dev/disk/by-label/ESP";
          fsType = "vfat";
        };
      };
      systemdBoot = {
        imports = [ espModule ];
        boot.loader.grub.enable = false;
        boot.loader.systemd-boot.enable = true;
      };
      grubHybrid = {
        imports = [ espModule ];
        boot.loader.grub.efiSupport = true;
        boot.loader.grub.efiInstallAsRemovable = true;
      };

      # aarch64 has no BIOS: there the example boots systemd-boot from an ESP (its serial port is ttyAMA0).
      aarch64Example = {
        args.partitionTableType = "efi";
        modules = [
          systemdBoot
          { boot.kernelParams = [ "console=ttyAMA0" ]; }
        ];
      };

      # Hydra jobs: the example in several layouts and formats. The legacy jobs are one configuration with
      # diskSize = "auto", so their root filesystems are the same bytes: with shareRootFilesystem it is
      # built once, its own derivation, and each job places it (the others' systems or roots differ).
      variants = {
        legacy-qcow2.args.shareRootFilesystem = true;
        legacy-raw.args = {
          format = "raw";
          shareRootFilesystem = true;
        };
        legacy-gpt-vdi.args = {
          partitionTableType = "legacy+gpt";
          format = "vdi";
          shareRootFilesystem = true;
        };
        efi-qcow2-compressed = {
          args = {
            partitionTableType = "efi";
            format = "qcow2-compressed";
          };
          modules = [ systemdBoot ];
        };
        hybrid-vpc = {
          args = {
            partitionTableType = "hybrid";
            format = "vpc";
          };
          modules = [ grubHybrid ];
        };
        # bootctl registers its boot entry in the variables the VM's OVMF writes to $out/efi-vars.fd.
        efi-vars-qcow2 = {
          args = {
            partitionTableType = "efi";
            touchEFIVars = true;
          };
          modules = [
            systemdBoot
            { boot.loader.efi.canTouchEfiVariables = true; }
          ];
        };
        store-only-raw.args = {
          onlyNixStore = true;
          installBootLoader = false;
          partitionTableType = "none";
          format = "raw";
        };
      };
    in
    {
      lib = {
        inherit makeDiskImage;
      };

      overlays.default = import ./nix/overlay.nix;

      nixosModules.default = import ./nix/module.nix;

      packages = forAllSystems (
        pkgs:
        rec {
          builder = import ./nix/package.nix { inherit pkgs; };
          # x86_64: GRUB on an MBR disk; aarch64: systemd-boot on an ESP.
          image = exampleImage pkgs (if pkgs.stdenv.hostPlatform.system == "x86_64-linux" then { } else aarch64Example);
          default = image;
        }
        # The aarch64 example built on x86_64 without a VM and without emulation: pkgs is x86_64's, the
        # configuration aarch64's (its closure substituted or built by an aarch64 builder, only copied here);
        # systemd-boot is installed from the system's bootspec by prepare.
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          image-aarch64 = exampleImage pkgs (aarch64Example // { system = "aarch64-linux"; });
        }
      );

      checks = forAllSystems (
        pkgs:
        {
          # Evaluates the example image and writes its spec: argument handling and wiring, no image build.
          eval = pkgs.writeText "make-disk-image-example-spec.json" (
            builtins.unsafeDiscardStringContext (
              builtins.toJSON self.packages.${pkgs.stdenv.hostPlatform.system}.image.spec
            )
          );
        }
        # Boots the x86_64 image; needs the NixOS test framework and KVM (`nix flake check` on such a machine).
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux" && pkgs ? testers && pkgs.testers ? runNixOSTest) {
          boot = import ./nix/vm-test.nix {
            inherit pkgs;
            inherit (lib) nixosSystem;
            module = self.nixosModules.default;
          };
        }
      );

      hydraJobs = lib.mapAttrs (
        _: variant: lib.genAttrs [ "x86_64-linux" ] (system: exampleImage nixpkgs.legacyPackages.${system} variant)
      ) variants;

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
