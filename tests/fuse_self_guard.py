"""Imported by a test daemon before `provider.service` runs (start_daemon(self_guard=...)):
reports every FUSE request that comes from one of the daemon's OWN threads.

Such a request (a stat, an open... of a path under MOUNT, made by a trio worker thread
or a writer thread) is answered by the daemon's trio thread. While the daemon lives it
works; but a kill -9 after the trio thread has read the request and before it answered
leaves the requesting thread in the kernel's request_wait_answer, in uninterruptible
sleep, for good: the kernel waits for the answer once the request was read, the FUSE
connection aborts only when /dev/fuse is closed, and the daemon's fds are closed only
when its last thread exits. The killed daemon stays a zombie and the mount hangs
(tests/test_crash_trials.py saw it during snapshot creation: the fsfreeze writer
stat'ed MOUNT/volumes/<name>.img).

Each such request is logged as one line "SELF-REQUEST <op> from thread <tid> (<comm>)"
on stderr (the daemon log). With SHADOWPLEX_TEST_SELF_STALL=<seconds> the handler then
blocks the trio thread that long, holding the request in flight, so a test can kill -9
the daemon exactly in that window. The kernel passes the caller's thread id in the
request header (ctx.pid), so /proc/self/task/<tid> tells whether it is ours.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import fuse_mount.operations as _ops

MARK = "SELF-REQUEST"
STALL = float(os.environ.get("SHADOWPLEX_TEST_SELF_STALL", "0") or 0)
# the handlers that take a ctx (RequestContext) as their last argument
OPS = ("lookup", "getattr", "setattr", "open", "opendir", "statfs", "create", "mknod",
       "mkdir", "unlink", "rmdir", "symlink", "rename", "link")


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _wrap(name: str) -> None:
    orig = getattr(_ops.ShadowOperations, name, None)
    if orig is None:
        return

    @functools.wraps(orig)
    async def handler(self: Any, *args: Any, **kw: Any) -> Any:
        ctx = kw.get("ctx", args[-1] if args else None)
        tid = getattr(ctx, "pid", 0)
        if tid and os.path.exists(f"/proc/self/task/{tid}"):
            print(f"{MARK} {name} from thread {tid} ({_comm(tid)})", file=sys.stderr,
                  flush=True)
            if STALL:
                time.sleep(STALL)    # blocks the trio thread: the request stays in flight
        return await orig(self, *args, **kw)

    setattr(_ops.ShadowOperations, name, handler)


for _name in OPS:
    _wrap(_name)
