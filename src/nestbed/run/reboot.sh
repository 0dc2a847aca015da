#!/bin/sh
# nestbed's autopkgtest-reboot (and autopkgtest-reboot-prepare), installed as
# /tmp/autopkgtest-reboot{,-prepare} and /sbin/autopkgtest-reboot{,-prepare}.
#
#   autopkgtest-reboot MARK
#
# Records MARK, then ends the running test: the runner sees the test killed, finds the
# mark, reboots the testbed (keeping the scratch dir) and runs the test again with
# AUTOPKGTEST_REBOOT_MARK=MARK. Called as autopkgtest-reboot-prepare, the mark goes to
# the prepare file; nestbed then reboots the testbed itself (the test's own reboot
# command after the call is not reached), which ends in the same state.
set -e
[ -n "${1:-}" ] || { echo "Usage: $0 MARK" >&2; exit 1; }
case "$0" in
    *-prepare) echo "$1" > /run/autopkgtest-reboot-prepare-mark ;;
    *) echo "$1" > /run/autopkgtest-reboot-mark ;;
esac

# the test is the child of the wrapper (its pid in /tmp/autopkgtest_script_pid) that is
# our ancestor: walk up to it, then kill it and everything in its process group
wrapper=$(cat /tmp/autopkgtest_script_pid)
p=$PPID
while :; do
    stat=$(cat "/proc/$p/stat")
    set -- ${stat##*) }  # after the command name: state ppid pgrp ...
    [ "$2" -ne "$wrapper" ] || break
    [ "$2" -gt 1 ] || { echo "$0: not called from a test" >&2; exit 1; }
    p=$2
done
if [ "$3" -eq "$p" ]; then kill -9 "-$p"; else kill -9 "$p"; fi  # dash: no "--"
exit 0  # reached only when the test was not a process group leader
