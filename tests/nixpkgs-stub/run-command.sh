# runCommand's builder in the nixpkgs stand-in: PATH from the inputs' bin/ and stdenv's initialPath, as a
# stdenv build has it (never the host's), then the script.
PATH=
for p in $nativeBuildInputs $buildInputs $initialPath; do
  PATH=${PATH:+$PATH:}$p/bin
done
export PATH
eval "$buildCommand"
