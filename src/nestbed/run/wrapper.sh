#!/bin/sh
# nestbed's in-testbed test wrapper.
#
#   wrapper.sh LOGFILE TIMEOUT COMMAND [ARG...]
#
# Runs COMMAND with its stdout and stderr on fifos that we copy to our own stdout and
# stderr, so that background processes the test leaves holding them can be found and
# killed afterwards (otherwise the runner would wait for EOF forever). TIMEOUT seconds
# (0: none) are enforced by coreutils' timeout on the test's own process group. Our own
# messages go to LOGFILE, never into the test's output while it runs: stderr output decides
# verdicts. Once the test and its output are done they follow on stderr after a marker,
# NUL "nestbed-wrapper-notes" NUL, which the runner takes off again (saving a round trip).
# Exits with COMMAND's exit status, except that a COMMAND exiting 255 gives 253 (as
# autopkgtest's exec prefixes do: 254 and 255 stay the wrapper's and the exec prefix's own
# failures, a testbed failure); 254 if the wrapper itself cannot work.
#
# Every process started here costs ~50 ms in an emulated VM: shell builtins wherever they do.
set -u
log=$1
limit=$2
shift 2

note() { { echo "$*" >>"$log"; } 2>/dev/null; }

out="$log.out" err="$log.err"
mkfifo "$out" "$err" 2>/dev/null || { rm -f "$out" "$err"; mkfifo "$out" "$err"; } || exit 254
cat <"$out" &
out_pid=$!
cat <"$err" >&2 &
err_pid=$!
# from here the shell's own stderr is not the test's: no "Killed" job notices in it (fd 3
# keeps it for the notes at the end; the test does not inherit fd 3)
exec 3>&2 2>/dev/null

# autopkgtest-reboot finds the test as the child of this shell
echo $$ 2>/dev/null >/tmp/autopkgtest_script_pid || true
# seconds without a date process; a chroot without /proc (autopkgtest-virt-chroot) has date
read -r up _ </proc/uptime || up=$(date +%s)
started=${up%.*}
# exec in a subshell: a shell killed by a signal would print "Killed" into the test's stderr
if [ "$limit" -gt 0 ]; then
    (exec >"$out" 2>"$err" </dev/null 3>&-; exec timeout --kill-after=10 "$limit" "$@") &
else
    (exec >"$out" 2>"$err" </dev/null 3>&-; exec "$@") &
fi
child=$!
# the runner being stopped stops the test (timeout passes the signal to its process group)
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
# wait returns early when a trapped signal arrives: wait again until the test is reaped
while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break
done
if [ "$limit" -gt 0 ] && [ "$status" -eq 124 ]; then
    read -r up _ </proc/uptime || up=$(date +%s)
    if [ $(( ${up%.*} - started )) -ge "$limit" ]; then note "timed-out after $limit s"; fi
fi

# whoever still holds our fifos was started by the test and outlived it (-ef: the same file)
leaked=""
for fd in /proc/[0-9]*/fd/*; do
    if [ "$fd" -ef "$out" ] || [ "$fd" -ef "$err" ]; then
        pid=${fd#/proc/}
        pid=${pid%%/*}
        case " $out_pid $err_pid $leaked" in
            *" $pid "*) ;;
            *) leaked="$leaked$pid " ;;
        esac
    fi
done
if [ -n "$leaked" ]; then
    note "killing leaked background processes: $leaked"
    # shellcheck disable=SC2086 # one word per pid
    kill -CONT $leaked 2>/dev/null
    # shellcheck disable=SC2086
    kill -KILL $leaked 2>/dev/null
fi
wait "$out_pid" "$err_pid"
if [ -s "$log" ]; then
    printf '\000nestbed-wrapper-notes\000' >&3
    cat "$log" >&3
fi
rm -f "$log" "$out" "$err"
[ "$status" -ne 255 ] || status=253
exit "$status"
