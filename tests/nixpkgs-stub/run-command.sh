# runCommand's builder in the nixpkgs stand-in: PATH from nativeBuildInputs then the host, run the script.
PATH=
for p in $nativeBuildInputs; do
  PATH=${PATH:+$PATH:}$p/bin
done
export PATH=${PATH:+$PATH:}$hostPath
eval "$buildCommand"
