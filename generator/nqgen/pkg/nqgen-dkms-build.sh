#!/bin/sh
# nqgen-dkms-build KERNELVER KERNEL_SOURCE_DIR: the build step of an nqgen DKMS module.
# The C in this directory was generated from one kernel's own symbols (nqgen-target.env). For that kernel it
# is built as it is. For any other kernel it is never rebuilt blindly: nqgen re-runs its profile and
# feasibility check against that kernel and regenerates the C, or the build fails and says why
# (exit 77 where the strategy cannot work there).
set -u
kver=$1
kdir=$2
here=$(pwd)
. ./nqgen-target.env
if [ "$kver" = "$RELEASE" ]; then
	exec make -C "$kdir" M="$here" modules
fi
nqgen=${NQGEN:-$(command -v nqgen 2>/dev/null || true)}
if [ -z "$nqgen" ]; then
	echo "nqgen-dkms: $MODULE was generated for $RELEASE from that kernel's own symbols and is not rebuilt" \
		"blindly for $kver: install nqgen (or set NQGEN) so the build can re-run nqgen's feasibility check" \
		"for $kver, or generate a module for $kver yourself" >&2
	exit 1
fi
tmp=$(mktemp -d)
# shellcheck disable=SC2086 # NQGEN may be a command with arguments ("python3 -m nqgen")
$nqgen --strategy "$STRATEGY" --kdir "$kdir" --out "$tmp/out"
rc=$?
if [ $rc -eq 77 ]; then
	echo "nqgen-dkms: the $STRATEGY strategy is not valid on $kver (nqgen's reason above): $MODULE not built" >&2
	rm -rf "$tmp"
	exit 77
fi
if [ $rc -ne 0 ]; then
	echo "nqgen-dkms: nqgen could not generate $STRATEGY for $kver (exit $rc): $MODULE not built" >&2
	rm -rf "$tmp"
	exit $rc
fi
cp "$tmp/out/$STRATEGY"/* "$here"/
rm -rf "$tmp"
echo "nqgen-dkms: nqgen checked $kver and regenerated $MODULE for it (was generated for $RELEASE)"
exec make -C "$kdir" M="$here" modules
