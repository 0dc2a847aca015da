"""PID 1 of an unshare container: sets the root file system up, then reaps until killed.

Run by `nestbed.container.container` as the child of ``unshare --fork --pid --mount ...``,
with the host's Python (``-I -S``) and only the standard library, so it keeps working after
the root has been pivoted into the container, where the host's files are gone.

    python3 -I -S init.py overlay|overlay-userxattr|direct ROOTDIR MOUNTPOINT BASEIMAGE DEVICES
                          [OUTSIDE INSIDE]...

``overlay``: ROOTDIR is a pristine, never-written tree; a tmpfs is mounted on MOUNTPOINT (an
empty directory) holding the overlay's upper and work dirs and the merged root. The tmpfs
exists only in the container's mount namespace: when the last process of the container
is gone, so is every write a test made, with nothing left on the host's disk.
``direct``: ROOTDIR is a private writable tree, used as the root itself.
BASEIMAGE, when not empty, is a host file (the exported base image's disk) bound read-only on
/dev/baseimage, with /lib/autopkgtest/baseimage a symlink to it, as in a QEMU testbed.
DEVICES is a comma-separated list of further host device nodes to bind into /dev (``kvm``),
or empty.
Each OUTSIDE INSIDE pair bind-mounts (recursively) the host directory OUTSIDE on INSIDE in the
container. OUTSIDE is bound first on a staging point in the container's own /dev tmpfs; only
after the pivot is INSIDE created and the mount moved there, so INSIDE's symlinks resolve in
the container's tree, never in the host's.

Protocol with the starter: one line ``ready HOSTPID`` on stdout once the root is set up
(the host PID is what ``nsenter --target`` needs); on failure the setup's messages on
stderr and a non-zero exit, 3 when it is the overlay that cannot be mounted. After that
stdout and stderr are /dev/null: nothing holds the starter's pipes. SIGKILL of this process
(from the starter, or unshare's --kill-child when the starter dies) ends every process of
the container: it is the PID namespace's init.
"""

import os
import signal
import subprocess
import sys

SETUP = r"""
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH  # pivot_root, for users without sbin in PATH
mode=$1 rootdir=$2 mnt=$3 baseimage=$4 devices=$5
shift 5
case "$mode" in
(overlay*)
    opts=
    [ "$mode" = overlay-userxattr ] && opts=,userxattr
    mount -t tmpfs -o mode=0755 nestbed-unshare "$mnt"
    mkdir "$mnt/upper" "$mnt/work" "$mnt/root"
    mount -t overlay -o "lowerdir=$rootdir,upperdir=$mnt/upper,workdir=$mnt/work$opts" \
        nestbed-unshare "$mnt/root" || exit 3  # the starter may fall back to direct mode
    root=$mnt/root
    ;;
(direct)
    root=$rootdir
    mount --bind "$root" "$root"  # pivot_root needs a mount point
    ;;
(*)
    echo "unknown mode $mode" >&2; exit 2
    ;;
esac
mkdir -p "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid,size=16m nestbed-dev "$root/dev"
# the minimal device nodes, bound from the host (no mknod in a user namespace)
for f in null zero full random urandom tty $(echo "$devices" | tr , ' '); do
    : > "$root/dev/$f"
    mount --bind "/dev/$f" "$root/dev/$f"
done
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,noexec,nosuid devpts \
    "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev nestbed-shm "$root/dev/shm"
# the base image: read-only in this namespace, whoever the test runs as
if [ -n "$baseimage" ]; then
    : > "$root/dev/baseimage"
    mount --bind "$baseimage" "$root/dev/baseimage"
    mount -o remount,bind,ro "$root/dev/baseimage"
fi
# --bind: each OUTSIDE on a staging point on the container's /dev tmpfs, moved after the pivot
n=0
mkdir "$root/dev/.nestbed-bind"
for arg in "$@"; do
    [ $((n % 2)) = 0 ] && mkdir "$root/dev/.nestbed-bind/$n" &&
        mount --rbind "$arg" "$root/dev/.nestbed-bind/$n"
    n=$((n + 1))
done
# a /proc of the container's own PID namespace (mounted from inside it)
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys" 2>/dev/null || true
mount -t tmpfs -o mode=1777,nosuid,nodev nestbed-tmp "$root/tmp"
# the host's tree leaves the namespace: not even a chroot escape reaches it
cd "$root"
pivot_root . .
umount -l .
n=0
for arg in "$@"; do
    if [ $((n % 2)) = 1 ]; then
        mkdir -p "$arg" || { echo "--bind: cannot create $arg in the container" >&2; exit 1; }
        mount --move "/dev/.nestbed-bind/$((n - 1))" "$arg"
        rmdir "/dev/.nestbed-bind/$((n - 1))"
    fi
    n=$((n + 1))
done
rmdir /dev/.nestbed-bind
if [ -n "$baseimage" ] && [ ! -e /lib/autopkgtest/baseimage ]; then
    mkdir -p /lib/autopkgtest
    ln -sfn /dev/baseimage /lib/autopkgtest/baseimage
fi
# a name of its own (its own UTS namespace) that resolves, or sudo and others complain
echo nestbed-unshare > /proc/sys/kernel/hostname
echo nestbed-unshare > /etc/hostname
grep -qs '[[:space:]]nestbed-unshare$' /etc/hosts || echo '127.0.1.1 nestbed-unshare' >> /etc/hosts
"""

# Only SIGCHLD is taken. A PID namespace's init gets no signal it has no handler for, so a
# test's `kill 1` does nothing; SIGKILL from outside (the starter) still ends it.
_HANDLED = (signal.SIGCHLD,)
# exit status when the overlay cannot be mounted (the file system of ROOTDIR, an old kernel)
OVERLAY_FAILED = 3


def main() -> int:
    if len(sys.argv) < 6 or len(sys.argv) % 2:
        sys.stderr.write(
            "usage: init.py MODE ROOTDIR MOUNTPOINT BASEIMAGE DEVICES [OUTSIDE INSIDE]...\n"
        )
        return 2
    mode, rootdir, mnt, baseimage, devices = sys.argv[1:6]
    # /proc is still the host's here, so this is our PID as the host sees it
    host_pid = int(os.readlink("/proc/self"))
    setup = subprocess.run(
        ["sh", "-c", SETUP, "sh", mode, rootdir, mnt, baseimage, devices, *sys.argv[6:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    if setup.returncode != 0:
        sys.stderr.write(setup.stderr.decode("utf-8", "replace"))
        sys.stderr.flush()
        return OVERLAY_FAILED if setup.returncode == OVERLAY_FAILED else 1
    os.chdir("/")
    # SIGCHLD is taken synchronously: none is lost between a reap and the next wait
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
    sys.stdout.write(f"ready {host_pid}\n")
    sys.stdout.flush()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        while True:  # reap every child, ours and the orphans re-parented to us
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        signal.sigwait(_HANDLED)


if __name__ == "__main__":
    sys.exit(main())
