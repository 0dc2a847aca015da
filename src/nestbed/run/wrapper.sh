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
# Exits with COMMAND's exit status; 254 if the wrapper itself cannot work.
set -u
log=$1
limit=$2
shift 2

note() { { echo "$*" >>"$log"; } 2>/dev/null; }

dir=$(mktemp -d) || exit 254
mkfifo "$dir/out" "$dir/err" || exit 254
cat <"$dir/out" &
out_pid=$!
cat <"$dir/err" >&2 &
err_pid=$!
# from here the shell's own stderr is not the test's: no "Killed" job notices in it (fd 3
# keeps it for the notes at the end; the test does not inherit fd 3)
exec 3>&2 2>/dev/null

# autopkgtest-reboot finds the test as the child of this shell
echo $$ 2>/dev/null >/tmp/autopkgtest_script_pid || true
started=$(date +%s)
# exec in a subshell: a shell killed by a signal would print "Killed" into the test's stderr
if [ "$limit" -gt 0 ]; then
    (exec >"$dir/out" 2>"$dir/err" </dev/null 3>&-; exec timeout --kill-after=10 "$limit" "$@") &
else
    (exec >"$dir/out" 2>"$dir/err" </dev/null 3>&-; exec "$@") &
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
if [ "$limit" -gt 0 ] && [ "$status" -eq 124 ] && [ $(( $(date +%s) - started )) -ge "$limit" ]; then
    note "timed-out after $limit s"
fi

# whoever still holds our fifos was started by the test and outlived it
leaked=$(find /proc/[0-9]*/fd -maxdepth 1 \( -lname "$dir/out" -o -lname "$dir/err" \) 2>/dev/null |
    cut -d/ -f3 | sort -u | grep -vx -e "$out_pid" -e "$err_pid" | tr '\n' ' ')
if [ -n "$leaked" ]; then
    note "killing leaked background processes: $leaked"
    # shellcheck disable=SC2086 # one word per pid
    kill -CONT $leaked 2>/dev/null
    # shellcheck disable=SC2086
    kill -KILL $leaked 2>/dev/null
fi
wait "$out_pid" "$err_pid"
rm -rf "$dir"
if [ -s "$log" ]; then
    printf '\000nestbed-wrapper-notes\000' >&3
    cat "$log" >&3
fi
rm -f "$log"
exit "$status"
