"""The confinement a decoder process puts itself in before it reads its first untrusted byte.

``confine(spec)`` (Linux):

- resource limits: address space ``decode_memory_mb`` (a decode that needs more fails with
  MemoryError in the worker, not in the replica), CPU seconds ``decode_cpu_s`` (SIGXCPU kills a
  runaway; the pool replaces a worker at half of it), no file writes (RLIMIT_FSIZE 0; pipes are
  not files), no core dumps, open files capped at what it has now plus a few;
- no decoder outlives its replica: its job pipe closes when the replica dies and it exits at the
  end of file (a parent-death signal would fire when the *thread* that started it ends);
- with ``decode_seccomp`` (pyseccomp over libseccomp): socket, connect, bind, listen, accept,
  send/recv on sockets, exec, new processes (``clone`` without ``CLONE_THREAD``, ``fork``,
  ``vfork``; ``clone3`` answers ENOSYS so libc falls back to ``clone``), ptrace, other processes'
  memory, changing limits (``setrlimit``/``prlimit64``), mounting, opening a file for writing
  (or creating, truncating), and removing, renaming, linking or re-owning files all fail with
  EPERM. Everything else a decoder needs (read, write on its pipes, mmap, brk, futex) stays allowed.

Returns what was applied, for the worker's ready message (the pool logs it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource

from visionray.serve.config import SanitizerSpec

_DENIED = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg", "sendmmsg",
    "recvfrom", "recvmsg", "recvmmsg", "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv",
    "process_vm_writev", "setrlimit", "prlimit64", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "kexec_load", "init_module", "finit_module", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "rmdir", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat", "truncate",
)
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC)  # an open with any of these is refused
_CLONE_THREAD = 0x00010000
EXTRA_FILES = 8  # descriptors a worker may open beyond those it holds when confined


class SandboxError(RuntimeError):
    """The confinement the spec asks for cannot be applied on this host."""


def _set_limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _load_seccomp():
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # pyseccomp loads libseccomp.so.2 with ctypes at import
        raise SandboxError(f"sanitizer.decode_seccomp is on but libseccomp is not loadable ({exc}); install "
                           "libseccomp2 (Debian/Ubuntu) or set decode_seccomp: false to rely on rlimits only") from None
    return pyseccomp


def _seccomp(seccomp) -> None:
    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in _DENIED:
        try:
            flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):  # a syscall this architecture does not have
            continue
    for flag in _WRITE_FLAGS:  # files are opened read-only or not at all
        flt.add_rule(seccomp.ERRNO(errno.EPERM), "openat", seccomp.Arg(2, seccomp.MASKED_EQ, flag, flag))
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            flt.add_rule(seccomp.ERRNO(errno.EPERM), "open", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
    flt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    flt.load()


def confine(spec: SanitizerSpec) -> dict[str, object]:
    """Apply the limits to this process (see the module doc); raises ``SandboxError``."""
    seccomp = _load_seccomp() if spec.decode_seccomp else None  # mapped before the address-space limit
    open_fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
    _set_limit(resource.RLIMIT_AS, spec.decode_memory_mb * 2**20)
    _set_limit(resource.RLIMIT_CPU, spec.decode_cpu_s)
    _set_limit(resource.RLIMIT_FSIZE, 0)
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NOFILE, open_fds + EXTRA_FILES)
    if seccomp is not None:
        _seccomp(seccomp)
    return {"memory_mb": spec.decode_memory_mb, "cpu_s": spec.decode_cpu_s, "nofile": open_fds + EXTRA_FILES,
            "seccomp": spec.decode_seccomp}
