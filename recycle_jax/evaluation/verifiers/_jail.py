"""The kernel half of the sandbox: namespaces, a minimal read-only root, no privilege.

Called by the harness (_harness.py) before the program starts (trusted code: nothing the
program wrote has run yet). `enter(view, tmp_bytes, uid)` makes new mount, pid, network,
IPC and UTS namespaces (plus a user namespace when the caller is not root), forks, and returns in the
child, which is pid 1 of the new pid namespace (when it exits, the kernel kills every
process the program started) after it has:
  - built a new root on a read-only tmpfs holding only read-only binds of the shared
    libraries, the interpreter's prefix (its site-packages hidden), /etc/ld.so.cache and
    the /dev/null, zero, random, urandom devices; no /proc, /sys, home, project, shell
    (unless the interpreter is the distribution's own, under /usr) or site-packages;
  - hidden the extension modules that run native code or escape the interpreter
    (`_ctypes`, `_xxsubinterpreters`, the `_test*` modules) behind empty files;
  - mounted a private tmpfs of `tmp_bytes` at /tmp, noexec (nothing written can be run
    or loaded as native code), and made it the working directory;
  - pivoted into that root and detached the old one;
  - dropped every privilege: as root, to a distinct unprivileged uid and gid (`uid`, no
    supplementary groups; RLIMIT_NPROC then counts this program's processes only); in a
    user namespace (or as a root with no other uid mapped: `uid` None), the capability
    bounding set, so nothing it executes gets a capability;
  - set no_new_privs and a seccomp filter that denies ptrace, reading or writing other
    processes' memory (process_vm_*), stealing their descriptors (pidfd_getfd), new
    namespaces, mounts, memfd/execveat, keyrings, bpf, perf, io_uring and module loading.
The calling process stays outside the pid namespace: it only waits and exits with pid 1's
status. Linux x86_64 and aarch64 (the seccomp filter names their syscall numbers).
"""
import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (0x08000000, 0x10000000,
                                                          0x20000000, 0x40000000)
CLONE_NEWTIME = 0x00000080
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 24, 22, 38
SECCOMP_MODE_FILTER = 2

DEVICES = ("null", "zero", "random", "urandom")


def _ok(ret: int, what: str) -> None:
  if ret != 0:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else os.fsencode(s)
  _ok(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
      f"mount {src} on {dst}")


def _prctl(option: int, arg: int = 0) -> None:
  _ok(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


# ----------------------------------------------------------------------------- seccomp
_ARCH = {  # audit arch, syscalls denied with EPERM, clone, clone3 (ENOSYS: glibc falls back)
    "x86_64": (0xC000003E, dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, pidfd_getfd=438,
        unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, memfd_create=319, execveat=322, bpf=321, perf_event_open=298,
        keyctl=250, add_key=248, request_key=249, userfaultfd=323, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, kexec_load=246, kexec_file_load=320,
        init_module=175, finit_module=313, delete_module=176, open_by_handle_at=304,
        name_to_handle_at=303, personality=135, acct=163, swapon=167, swapoff=168,
        reboot=169, syslog=103, quotactl=179), 56, 435),
    "aarch64": (0xC00000B7, dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, pidfd_getfd=438,
        unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51,
        open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, memfd_create=279, execveat=281, bpf=280, perf_event_open=241,
        keyctl=219, add_key=217, request_key=218, userfaultfd=282, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, kexec_load=104, kexec_file_load=294,
        init_module=105, finit_module=273, delete_module=106, open_by_handle_at=265,
        name_to_handle_at=264, personality=92, acct=89, swapon=224, swapoff=225,
        reboot=142, syslog=116, quotactl=60), 220, 435),
}
_NAMESPACES = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
               | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)


def seccomp_program(machine: str) -> bytes:
  """The BPF filter (struct sock_filter[]) for `machine`, as bytes."""
  if machine not in _ARCH:
    raise OSError(f"the sandbox's seccomp filter knows {' and '.join(_ARCH)}, not {machine}")
  arch, denied, clone, clone3 = _ARCH[machine]
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  allow, kill = 0x7FFF0000, 0x80000000
  eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
  # (code, jt label or offset, jf label or offset, k); labels resolved below.
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
  if machine == "x86_64":
    prog.append((jge, "EPERM", 0, 0x40000000))  # the x32 ABI's numbers
  prog += [(jeq, "EPERM", 0, nr) for nr in sorted(denied.values())]
  prog += [(jeq, "ENOSYS", 0, clone3), (jeq, 0, "ALLOW", clone), (ld, 0, 0, 16),
           (jset, "EPERM", "ALLOW", _NAMESPACES)]
  labels = {"ALLOW": len(prog), "EPERM": len(prog) + 1, "ENOSYS": len(prog) + 2}
  prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, enosys)]
  rel = lambda i, j: labels[j] - i - 1 if isinstance(j, str) else j
  return b"".join(struct.pack("HBBI", code, rel(i, jt), rel(i, jf), k)
                  for i, (code, jt, jf, k) in enumerate(prog))


def _install_seccomp() -> None:
  prog = seccomp_program(os.uname().machine)
  buf = ctypes.create_string_buffer(prog)

  class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
  fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
  _ok(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


# ----------------------------------------------------------------------------- the view
def _ro_remount(path: str, source: str) -> None:
  """Bind mounts start writable: remount read-only, keeping the source's locked flags."""
  st = os.statvfs(source)
  flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
  flags |= (MS_NODEV if st.f_flag & os.ST_NODEV else 0) | (
      MS_NOEXEC if st.f_flag & os.ST_NOEXEC else 0)
  _mount(None, path, None, flags)


def _bind(fd_source: tuple[int, str], root: str, dest: str, is_dir: bool) -> None:
  fd, source = fd_source
  target = root + dest
  if is_dir:
    os.makedirs(target, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    open(target, "w").close()
  _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
  _ro_remount(target, f"/proc/self/fd/{fd}")


def _build_root(view: dict, tmp_bytes: int) -> None:
  """view: {"dirs": [abs paths], "files": [abs paths], "links": {path: target},
  "hidden_dirs": [abs paths inside dirs], "hidden_files": [...]}. Sources are opened
  before the root tmpfs hides anything."""
  opened = {p: (os.open(p, os.O_PATH), p) for p in view["dirs"] + view["files"]}
  _mount(None, "/", None, MS_REC | MS_PRIVATE)
  root = "/tmp"  # any directory: the new root tmpfs is mounted over it
  _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  for p in view["dirs"]:
    _bind(opened[p], root, p, True)
  for p in view["files"]:
    _bind(opened[p], root, p, False)
  for link, target in view["links"].items():
    os.makedirs(os.path.dirname(root + link), exist_ok=True)
    os.symlink(target, root + link)
  empty_dir, empty_file = root + "/.empty", root + "/.empty_file"
  os.mkdir(empty_dir, 0o555)
  open(empty_file, "w").close()
  for p in view["hidden_dirs"]:
    _mount(empty_dir, root + p, None, MS_BIND)
    _ro_remount(root + p, empty_dir)
  for p in view["hidden_files"]:
    _mount(empty_file, root + p, None, MS_BIND)
    _ro_remount(root + p, empty_file)
  os.makedirs(root + "/dev", exist_ok=True)
  for d in DEVICES:
    open(f"{root}/dev/{d}", "w").close()
    _mount(f"/dev/{d}", f"{root}/dev/{d}", None, MS_BIND)
  os.makedirs(root + "/tmp", exist_ok=True)
  _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
         f"size={tmp_bytes},mode=1777")
  for fd, _ in opened.values():
    os.close(fd)
  os.chdir(root)
  _ok(_libc.syscall(155 if os.uname().machine == "x86_64" else 41, b".", b"."), "pivot_root")
  _ok(_libc.umount2(b".", MNT_DETACH), "umount the old root")
  _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/tmp")


def _drop_privileges(uid: int | None) -> None:
  if uid is not None:  # real root: become an unprivileged user (no capabilities left)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
  else:  # root of our own user namespace: nothing it executes gets a capability
    for cap in range(64):
      if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
        break
  _prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL; cleared by setresuid, so set after it
  _prctl(PR_SET_NO_NEW_PRIVS, 1)
  _install_seccomp()


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def enter(view: dict, tmp_bytes: int, uid: int | None) -> None:
  """Returns in pid 1 of the new namespaces, confined (see the module docstring); the
  calling process never returns: it waits for pid 1 and exits with its status.
  uid: the unprivileged uid to become when running as root (ignored otherwise)."""
  root = os.geteuid() == 0
  flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
  if not root:
    real_uid, real_gid = os.getuid(), os.getgid()
    _ok(_libc.unshare(CLONE_NEWUSER), "unshare a user namespace")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {real_uid} 1")
    _write("/proc/self/gid_map", f"0 {real_gid} 1")
  _ok(_libc.unshare(flags), "unshare namespaces")
  pid = os.fork()
  if pid:
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status)
             else 128 + os.WTERMSIG(status))
  _build_root(view, tmp_bytes)
  _drop_privileges(uid if root else None)
