#!/bin/sh
# nestbed's in-testbed test wrapper.
#
#   wrapper.sh LOGFILE TIMEOUT COMMAND [ARG...]
#
# Runs COMMAND on our own stdout and stderr when both are pipes (the exec prefix's), else on
# fifos that we copy to them, so that background processes the test leaves holding them can
# be found and killed afterwards (otherwise the runner would wait for EOF forever): whoever
# holds one of them then and is not one of our ancestors (who gave it to us). TIMEOUT seconds
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

# from here the shell's own stderr is not the test's: no "Killed" job notices in it (fd 3
# keeps it for the notes at the end and, without fifos, for the test)
exec 3>&2 2>/dev/null
if [ -p /proc/$$/fd/1 ] && [ -p /proc/$$/fd/3 ]; then
    out=/proc/$$/fd/1 err=/proc/$$/fd/3 fifos=""
    out_pid="" err_pid=""
else
    out="$log.out" err="$log.err" fifos="$out $err"
    mkfifo "$out" "$err" || { rm -f "$out" "$err"; mkfifo "$out" "$err"; } || exit 254
    cat <"$out" &
    out_pid=$!
    cat <"$err" >&3 &
    err_pid=$!
fi

# autopkgtest-reboot finds the test as the child of this shell
echo $$ 2>/dev/null >/tmp/autopkgtest_script_pid || true
# seconds without a date process; a chroot without /proc (autopkgtest-virt-chroot) has date
read -r up _ </proc/uptime || up=$(date +%s)
started=${up%.*}
# exec in a subshell: a shell killed by a signal would print "Killed" into the test's stderr
if [ "$limit" -gt 0 ]; then
    set -- timeout --kill-after=10 "$limit" "$@"
fi
if [ -n "$fifos" ]; then
    (exec >"$out" 2>"$err" </dev/null 3>&-; exec "$@") &
else
    (exec 2>&3 </dev/null 3>&-; exec "$@") &
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

# whoever still holds our output was started by the test and outlived it (-ef: the same
# file), except ourselves, the copying cats, and our ancestors (up to one outside our view)
ours=" $out_pid $err_pid "
pid=$$
while [ "${pid:-0}" -gt 0 ]; do
    ours="$ours$pid "
    parent=""
    while read -r key value; do
        if [ "$key" = PPid: ]; then parent=$value; break; fi
    done <"/proc/$pid/status" || :
    pid=$parent
done
leaked=""
for fd in /proc/[0-9]*/fd/*; do
    if [ "$fd" -ef "$out" ] || [ "$fd" -ef "$err" ]; then
        pid=${fd#/proc/}
        pid=${pid%%/*}
        case "$ours$leaked" in
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
if [ -n "$fifos" ]; then
    wait "$out_pid" "$err_pid"
    rm -f $fifos
fi
if [ -s "$log" ]; then
    printf '\000nestbed-wrapper-notes\000' >&3
    cat "$log" >&3
    rm -f "$log"
fi
[ "$status" -ne 255 ] || status=253
exit "$status"
