//! Syscalls the agent needs beyond std and socket2: netns entry, cookies, bpffs and cgroup2 mounts, signal masks, owner-only unix sockets.
#![expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE), setpriority and sigwait on realtime signals have no safe wrapper"
)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors of the syscall layer; each names the call and its object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening a network namespace failed.
    #[error("cannot open network namespace {}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// setns(CLONE_NEWNET) failed.
    #[error("setns into network namespace {} failed", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The helper thread that entered the namespace panicked.
    #[error("thread inside network namespace {} panicked", path.display())]
    ThreadPanic { path: PathBuf },
    /// A socket option failed.
    #[error("{opt} failed")]
    Sockopt {
        opt: &'static str,
        #[source]
        source: io::Error,
    },
    /// Setting the calling thread's nice value failed.
    #[error("setpriority(nice {nice}) of thread {tid} failed")]
    Priority {
        nice: i32,
        tid: i32,
        #[source]
        source: io::Error,
    },
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted (checked /proc/self/mountinfo)")]
    NoCgroup2,
    /// Reading /proc/self/mountinfo failed.
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
    /// Joining a cgroup failed.
    #[error("cannot join cgroup {}", path.display())]
    JoinCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Mounting bpffs failed.
    #[error("cannot mount bpffs at {}", path.display())]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A signal-mask call failed.
    #[error("{call} failed")]
    Signals {
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An opened network namespace (holding the fd keeps the namespace alive while we use it).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::OpenNetns {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The namespace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file (for sk_lookup attachment).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on a fresh thread that has entered this namespace; sockets it creates stay in the
    /// namespace after the thread ends. setns(CLONE_NEWNET) affects only the calling thread, so
    /// the agent's own threads never change namespace.
    pub fn run<R, F>(&self, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let fd = self.file.try_clone().map_err(|source| Error::OpenNetns {
            path: self.path.clone(),
            source,
        })?;
        let path = self.path.clone();
        let handle = std::thread::Builder::new()
            .name("ambit-netns".into())
            .spawn(move || -> Result<R, Error> {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| Error::Setns { path, source })?;
                Ok(f())
            })
            .map_err(|source| Error::OpenNetns {
                path: self.path.clone(),
                source,
            })?;
        handle.join().map_err(|_| Error::ThreadPanic {
            path: self.path.clone(),
        })?
    }
}

/// The network-namespace cookie of the namespace `sock` lives in (`SO_NETNS_COOKIE`); the same
/// value `bpf_get_netns_cookie` returns in the kernel programs.
pub fn netns_cookie(sock: &impl AsRawFd) -> Result<u64, Error> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; the kernel writes at
    // most `len` bytes into `cookie` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::Sockopt {
            opt: "SO_NETNS_COOKIE",
            source: io::Error::last_os_error(),
        });
    }
    Ok(cookie)
}

/// Sets the nice value of the calling thread only (Linux applies `setpriority(PRIO_PROCESS)`
/// to one thread when given its thread id); a negative value needs `CAP_SYS_NICE`.
pub fn set_thread_nice(nice: i32) -> Result<(), Error> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        return Err(Error::Priority {
            nice,
            tid,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A set of signal numbers (realtime ones included, which `nix::sys::signal::Signal` lacks).
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

/// The realtime signals, `SIGRTMIN..=SIGRTMAX` (as the C library reserves them).
pub fn realtime_signals() -> std::ops::RangeInclusive<i32> {
    libc::SIGRTMIN()..=libc::SIGRTMAX()
}

/// Blocks `signals` in the calling thread; threads it starts afterwards inherit the mask, so
/// only a thread that waits for them with [`wait_signal`] ever receives them.
pub fn block_signals(signals: &[i32]) -> Result<SignalSet, Error> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given, which is ours and large enough.
    if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
        return Err(signals_err("sigemptyset"));
    }
    // SAFETY: initialised by sigemptyset above.
    let mut set = unsafe { set.assume_init() };
    for &signo in signals {
        // SAFETY: writes only into `set`; an invalid number is refused with EINVAL.
        if unsafe { libc::sigaddset(&mut set, signo) } != 0 {
            return Err(signals_err("sigaddset"));
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Signals {
            call: "pthread_sigmask",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(SignalSet(set))
}

/// Waits for one of `set`'s signals (blocked with [`block_signals`]) and returns its number.
pub fn wait_signal(set: &SignalSet) -> Result<i32, Error> {
    let mut signo: libc::c_int = 0;
    // SAFETY: both pointers are to live values of ours, of the types sigwait expects.
    let rc = unsafe { libc::sigwait(&set.0, &mut signo) };
    if rc != 0 {
        return Err(Error::Signals {
            call: "sigwait",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(signo)
}

fn signals_err(call: &'static str) -> Error {
    Error::Signals {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Where the cgroup2 filesystem is mounted (found in /proc/self/mountinfo, never assumed).
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::Mountinfo)?;
    mount_of_type(&info, "cgroup2").ok_or(Error::NoCgroup2)
}

/// Whether a bpffs is mounted exactly at `dir`.
pub fn is_bpffs(dir: &Path) -> Result<bool, Error> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::Mountinfo)?;
    let found = mounts_of_type(&info, "bpf").any(|m| m == dir);
    Ok(found)
}

/// Mounts bpffs at `dir` unless one is already there.
pub fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    if is_bpffs(dir)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::MountBpffs {
        path: dir.to_path_buf(),
        source,
    })
}

/// Binds a non-blocking unix socket at `path` that only its owner may connect to (mode 0600):
/// creates the directory, replaces a stale socket. The callers' errors name the socket.
pub fn bind_owner_only(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Moves the calling process into the cgroup v2 directory `dir` (created if missing).
pub fn join_cgroup(dir: &Path) -> Result<(), Error> {
    let err = |source| Error::JoinCgroup {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).map_err(err)
}

fn mounts_of_type<'a>(mountinfo: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
    mountinfo.lines().filter_map(move |line| {
        let (left, right) = line.split_once(" - ")?;
        let fs = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fs == fstype).then(|| PathBuf::from(unescape(mountpoint)))
    })
}

fn mount_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mounts_of_type(mountinfo, fstype).next()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_thread_nice_changes_only_the_calling_thread() {
        let nice_of = |tid: i32| -> i32 {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            // Fields after the parenthesised name: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(16).unwrap().parse().unwrap()
        };
        let main = nix::unistd::gettid().as_raw();
        let before = nice_of(main);
        let (tid, nice) = std::thread::spawn(move || {
            // Lowering one's priority needs no privilege.
            set_thread_nice(before + 3).unwrap();
            let tid = nix::unistd::gettid().as_raw();
            (tid, nice_of(tid))
        })
        .join()
        .unwrap();
        assert_ne!(tid, main);
        assert_eq!(nice, before + 3);
        assert_eq!(nice_of(main), before, "the calling thread only");
    }

    #[test]
    fn finds_cgroup2_wherever_it_is_mounted() {
        let info = "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    33 25 0:29 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of_type(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let info2 = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of_type(info2, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(mount_of_type("garbage line\n", "cgroup2"), None);
    }
}
