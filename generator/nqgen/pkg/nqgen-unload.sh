#!/bin/sh
# nqgen-unload MODULE: unload an nqgen mitigation module (the systemd unit's ExecStop).
# A livepatch module is first disabled through sysfs and waited for until its transition is over and the
# kernel removed /sys/kernel/livepatch/MODULE; only then can it be removed.
set -u
m=${1:?usage: nqgen-unload MODULE}
sys=${NQGEN_SYSFS:-/sys}
[ -d "$sys/module/$m" ] || exit 0
lp="$sys/kernel/livepatch/$m"
if [ -d "$lp" ]; then
	if [ "$(cat "$lp/enabled")" = 1 ]; then
		echo 0 > "$lp/enabled" || { echo "nqgen-unload: $m: cannot disable the livepatch" >&2; exit 1; }
	fi
	i=0
	while [ -d "$lp" ]; do
		i=$((i + 1))
		if [ $i -gt 600 ]; then
			echo "nqgen-unload: $m: livepatch transition not over after 60 s; left loaded" >&2
			exit 1
		fi
		sleep 0.1 2>/dev/null || sleep 1
	done
fi
rmmod "$m"
