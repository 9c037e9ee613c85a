#!/bin/sh
# nqgen-status: the nqgen mitigation modules loaded on this host (POSIX sh: the host needs no Python).
# For each loaded nq_* module: strategy, target kernel, parameters, live counters, livepatch state, and a
# WARNING when the kernel already carries the upstream fix, when the module was made for another kernel, or
# when the loaded module is not the one nqgen installed.
# Exit status: 0 loaded, no warning; 1 a warning was printed; 3 no nqgen module is loaded.
set -u
sys=${NQGEN_SYSFS:-/sys}
share=${NQGEN_SHARE:-/usr/share/nqgen}
running=${NQGEN_RELEASE:-$(uname -r)}
warned=0
found=0

warn() {
	echo "  WARNING: $*"
	warned=1
}

values() {
	# "name=value" for every readable file in a directory, on one line
	out=""
	for f in "$1"/*; do
		[ -f "$f" ] && [ -r "$f" ] || continue
		out="$out ${f##*/}=$(cat "$f" 2>/dev/null | tr '\n' ' ' | sed 's/ *$//')"
	done
	echo "${out# }"
}

echo "running kernel: $running"
for d in "$sys"/module/nq_*; do
	[ -d "$d" ] || continue
	m=${d##*/}
	found=1
	STRATEGY="" RELEASE="" FIX_PRESENT="" SRCVERSION="" NQGEN_VERSION="" UNLOAD=""
	if [ -r "$share/$m.env" ]; then
		. "$share/$m.env"
	fi
	echo "$m: $(cat "$d/initstate" 2>/dev/null || echo loaded)"
	echo "  strategy: ${STRATEGY:-unknown (no $share/$m.env)}${NQGEN_VERSION:+ (nqgen $NQGEN_VERSION)}"
	echo "  target kernel: ${RELEASE:-unknown}"
	p=""
	[ -d "$d/parameters" ] && p=$(values "$d/parameters")
	echo "  parameters: ${p:-none}"
	c=""
	[ -d "$sys/kernel/$m" ] && c=$(values "$sys/kernel/$m")
	echo "  counters: ${c:-none}"
	lp="$sys/kernel/livepatch/$m"
	if [ -d "$lp" ]; then
		echo "  livepatch: enabled=$(cat "$lp/enabled" 2>/dev/null) transition=$(cat "$lp/transition" 2>/dev/null)"
	elif [ "$UNLOAD" = livepatch ]; then
		echo "  livepatch: not registered (disabled; the module can be removed)"
	fi
	if [ -n "$RELEASE" ] && [ "$RELEASE" != "$running" ]; then
		warn "$m was generated for $RELEASE, the running kernel is $running"
	fi
	loaded_src=$(cat "$d/srcversion" 2>/dev/null || true)
	if [ -n "$SRCVERSION" ] && [ -n "$loaded_src" ] && [ "$loaded_src" != "$SRCVERSION" ]; then
		warn "the loaded $m (srcversion $loaded_src) is not the one nqgen installed ($SRCVERSION)"
	fi
	if [ "$FIX_PRESENT" = 1 ] && [ "$RELEASE" = "$running" ]; then
		warn "$running already carries the upstream fix (56b14ecec97f): this mitigation is not needed"
	fi
done
if [ $found = 0 ]; then
	echo "no nqgen module is loaded"
	exit 3
fi
exit $warned
