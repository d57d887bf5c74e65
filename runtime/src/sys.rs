//! The one place with `unsafe`: code that runs in a forked child between
//! `fork` and `exec`, where only async-signal-safe calls are allowed, and
//! the system calls the daemon makes on itself as it starts (closing what
//! it inherited, raising its open-files limit), and the epoll set of
//! sleeping client connections (`traffic::parked`) with their sockets. The group list is
//! looked up before the fork, so the child only makes system calls.
#![allow(unsafe_code)]

use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};

/// An OS account to run a child as, resolved in the daemon.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub home: std::path::PathBuf,
    pub shell: std::path::PathBuf,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

impl RunAs {
    pub fn lookup(name: &str) -> Result<RunAs, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
            .ok_or_else(|| format!("user `{name}` does not exist"))?;
        let c_name =
            std::ffi::CString::new(name).map_err(|_| format!("invalid user name `{name}`"))?;
        let groups =
            nix::unistd::getgrouplist(&c_name, user.gid).unwrap_or_else(|_| vec![user.gid]);
        Ok(RunAs {
            name: user.name,
            home: user.dir,
            shell: user.shell,
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }

    /// What a login of this user would have: HOME, USER, LOGNAME, SHELL and
    /// the standard PATH, not the daemon's (which may be root's).
    pub fn login_env(&self) -> Vec<(&'static str, String)> {
        let path = if self.uid.is_root() {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        } else {
            "/usr/local/bin:/usr/bin:/bin"
        };
        vec![
            ("HOME", self.home.display().to_string()),
            ("USER", self.name.clone()),
            ("LOGNAME", self.name.clone()),
            ("SHELL", self.shell.display().to_string()),
            ("PATH", path.to_owned()),
        ]
    }
}

/// Makes the child join the cgroup whose `cgroup.procs` is `procs` before
/// exec (and before a privilege drop, registered after this, which would
/// forbid the write).
pub fn join_cgroup(command: &mut tokio::process::Command, procs: std::fs::File) {
    // SAFETY: the closure makes one write system call on a descriptor
    // opened before the fork (and closed on exec); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::write(&procs, b"0")?;
            Ok(())
        });
    }
}

/// Makes the child drop to `user` (groups, then group, then user) before exec.
pub fn run_as(command: &mut tokio::process::Command, user: RunAs) {
    // SAFETY: the closure only makes the setgroups, setgid and setuid system
    // calls on data prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            setgroups(&user.groups)?;
            setgid(user.gid)?;
            setuid(user.uid)?;
            Ok(())
        });
    }
}

/// The open-file limits the daemon was started with, which its children
/// get back: a soft limit above 1024 breaks programs that `select()`.
static STARTED_WITH: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raises the daemon's soft limit of open files to its hard limit, as Go
/// programs do: each proxied connection holds two descriptors, and the
/// usual soft limit of 1024 would cap a server at about 500 clients.
/// Returns the soft limit before and after.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = STARTED_WITH.set((soft, hard));
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// Gives the child the open-file limits the daemon was started with.
pub fn restore_open_files_limit(command: &mut tokio::process::Command) {
    let Some(&(soft, hard)) = STARTED_WITH.get() else {
        return;
    };
    // SAFETY: setrlimit is a system call on two integers; nothing is
    // allocated in the forked child.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
}

/// The descriptor a connector finds its channel on (`APM_FD`).
pub const CONNECTOR_FD: i32 = 3;

/// Hands `channel` to the child as descriptor `CONNECTOR_FD`.
pub fn pass_channel(command: &mut tokio::process::Command, channel: std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 and fcntl are async-signal-safe and the closure only
    // reads an integer; `channel` stays open in the parent until after the
    // spawn, so the descriptor is valid in the forked child.
    unsafe {
        command.pre_exec(move || {
            let fd = channel.as_raw_fd();
            let result = if fd == CONNECTOR_FD {
                // dup2 onto itself would keep close-on-exec set.
                nix::libc::fcntl(fd, nix::libc::F_SETFD, 0)
            } else {
                nix::libc::dup2(fd, CONNECTOR_FD)
            };
            if result < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Closes every descriptor above stderr that the process inherited (a
/// shell's `exec 7</secret`, a file its caller forgot to mark
/// close-on-exec): the daemon passes none of them on, and a worker running
/// as another user must not read through one what it could not open.
/// Called first thing in the daemon, before it opens anything itself.
pub fn close_inherited_descriptors() -> std::io::Result<()> {
    // SAFETY: close_range is a system call on integers; nothing in the
    // process holds descriptors above 2 yet, so no owner is left with a
    // closed one.
    let closed = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed == 0 {
        return Ok(());
    }
    // Kernels before 5.9: the descriptors /proc lists, read whole first
    // (the listing has a descriptor of its own).
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in open {
        // SAFETY: as above; a descriptor already gone (the listing's own)
        // gives EBADF, which is ignored.
        unsafe {
            nix::libc::close(fd);
        }
    }
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec in the child, so that
/// it gets stdin, stdout, stderr and, registered after this, the
/// connector's channel, whatever a library of the daemon opened without
/// the flag. (Marked, not closed: the pipe through which the child reports
/// a failed exec must stay open until the exec.)
pub fn only_standard_descriptors(command: &mut tokio::process::Command) {
    // SAFETY: close_range is an async-signal-safe system call on integers;
    // a kernel without it (before 5.11) leaves the flags as they are, which
    // the daemon set on everything it opened.
    unsafe {
        command.pre_exec(|| {
            nix::libc::syscall(
                nix::libc::SYS_close_range,
                3u32,
                u32::MAX,
                nix::libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Lets SIGPIPE end the process, as it does other command-line tools, so
/// `apm … | head` stops quietly. Rust ignores SIGPIPE by default, which the
/// daemon keeps: a client that goes away must not end it.
pub fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing the default disposition runs no handler code; this
    // is called before any thread is started.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

/// The socket `fd`, which `owner` holds open, borrowed for as long as
/// `owner` is: a client connection's socket under the layers (counting,
/// metering, TLS) that own it, which have no way to lend it themselves.
pub(crate) fn socket_of<T: ?Sized>(
    _owner: &T,
    fd: std::os::fd::RawFd,
) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: callers pass the descriptor of a socket that `owner` owns
    // and closes only when dropped, which the borrow outlives not.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// An epoll set of sleeping client connections, which the current tokio
/// runtime watches for events.
pub(crate) struct EpollSet(nix::sys::epoll::Epoll);

impl EpollSet {
    pub(crate) fn watched() -> std::io::Result<tokio::io::unix::AsyncFd<EpollSet>> {
        let epoll = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)?;
        // SAFETY: `EpollSet` owns its descriptor and closes it only when
        // dropped, which `AsyncFd` does after deregistering it.
        let watched = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                EpollSet(epoll),
                tokio::io::Interest::READABLE,
            )
        };
        Ok(watched?)
    }

    pub(crate) fn epoll(&self) -> &nix::sys::epoll::Epoll {
        &self.0
    }
}

impl std::os::fd::AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.0.as_raw_fd()
    }
}
