#!/bin/bash
# Guest side of one tests/vm/run: copied into the control share for each run
# and started from there by the image's batchly-vm-bootstrap, as root, with
# the control share's guest path as $1. Not part of the image, so changing it
# needs no rebuild.
#
# Reads (all NUL-separated, written by tests/vm/run):
#   shares  9p tag, guest path, tag, path, ...   mounted in that order
#   cwd     the working directory
#   env     NAME=VALUE entries: the command's whole environment
#   argv    the command and its arguments
# Writes: stdout, stderr (the command's), command-started, command-finished
# (guest uptimes), then status (its exit status), or error (why it could not
# be run).
set -u
ctl=$1

fail() {
    printf '%s\n' "$*" >"$ctl/error"
    echo "batchly-vm: $*" >&2
    exit 1
}

# Shares as the command will see them. cache=mmap: no caching, so every write
# reaches the host at once, but shared writable mmap still works.
mapfile -d '' -t shares <"$ctl/shares" || fail "cannot read the share list"
for ((i = 0; i + 1 < ${#shares[@]}; i += 2)); do
    tag=${shares[i]}
    dir=${shares[i + 1]}
    mkdir -p "$dir" || fail "cannot create the mount point $dir"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=mmap "$tag" "$dir" ||
        fail "cannot mount share $tag at $dir"
done

mapfile -d '' -t argv <"$ctl/argv" || fail "cannot read the command"
mapfile -d '' -t envv <"$ctl/env" || fail "cannot read the environment"
IFS= read -r -d '' cwd <"$ctl/cwd" || fail "cannot read the working directory"
[ "${#argv[@]}" -gt 0 ] || fail "no command given"
cd "$cwd" || fail "cannot change to the working directory $cwd"

cut -d' ' -f1 /proc/uptime >"$ctl/command-started"
env -i "${envv[@]}" "${argv[@]}" </dev/null >"$ctl/stdout" 2>"$ctl/stderr"
rc=$?
# Written back through mmap but not yet synced: push it to the host before
# the host is told the command is done.
sync
cut -d' ' -f1 /proc/uptime >"$ctl/command-finished"
echo "$rc" >"$ctl/status.tmp" && mv -f "$ctl/status.tmp" "$ctl/status"
