//! PID 1 of the `cargo xtask vm-test` VM: mount, load modules, run the e2e binaries, power off.
//!
//! The host packs `/ambit-vm/plan` into the initramfs, one `KEY VALUE` per line:
//!
//! ```text
//! module /ambit-vm/modules/veth.ko     insmod, in this order
//! nofile 20000 20000                   RLIMIT_NOFILE (soft, hard): the host's, not PID 1's 1024
//! env AMBIT_BIN=/usr/local/bin/ambit   the test binaries' whole environment
//! arg --include-ignored                passed to every test binary, in this order
//! test outbound /ambit-vm/tests/outbound
//! ```
//!
//! Everything goes to the console (the serial port the host reads). Lines the host acts on start
//! with `AMBIT-VM`; the last one is `AMBIT-VM-VERDICT: PASS|FAIL|ERROR ...`, after which the VM
//! powers off. As PID 1 the init also reaps every orphan the tests leave behind (the testbed's
//! daemons run in their own sessions), so it waits with `waitpid(-1)` rather than `Child::wait`.
use std::convert::Infallible;
use std::fs::File;
use std::io::{PipeReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Where the host puts the plan.
const PLAN: &str = "/ambit-vm/plan";
/// PATH for the helpers the init runs itself (`ip`).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a finished test binary's output may keep trickling in (a leaked grandchild can hold
/// the pipe open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let verdict = match setup() {
        Ok(plan) => run_all(&plan),
        Err(e) => Verdict::Error(e),
    };
    verdict.print();
    power_off();
}

/// What the host asked for.
#[derive(Debug, Default)]
struct Plan {
    modules: Vec<PathBuf>,
    nofile: Option<(u64, u64)>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    tests: Vec<(String, PathBuf)>,
}

impl Plan {
    fn parse(text: &str) -> Result<Self, String> {
        let mut plan = Self::default();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "module" => plan.modules.push(value.into()),
                "nofile" => {
                    let limits = value
                        .split_once(' ')
                        .and_then(|(soft, hard)| Some((soft.parse().ok()?, hard.parse().ok()?)));
                    plan.nofile = Some(
                        limits
                            .ok_or_else(|| format!("{PLAN}:{}: nofile needs SOFT HARD", n + 1))?,
                    );
                }
                "arg" => plan.args.push(value.into()),
                "env" => {
                    let (k, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("{PLAN}:{}: env needs KEY=VALUE", n + 1))?;
                    plan.env.push((k.into(), v.into()));
                }
                "test" => {
                    let (name, path) = value
                        .split_once(' ')
                        .ok_or_else(|| format!("{PLAN}:{}: test needs NAME PATH", n + 1))?;
                    plan.tests.push((name.into(), path.into()));
                }
                other => return Err(format!("{PLAN}:{}: unknown key {other:?}", n + 1)),
            }
        }
        Ok(plan)
    }
}

/// The suite's outcome, printed as the verdict line.
#[derive(Debug)]
enum Verdict {
    /// Every binary ran; `broken` lists those that exited non-zero without a failed test.
    Ran {
        passed: u64,
        failed: u64,
        broken: Vec<String>,
    },
    /// The VM could not be prepared; no test ran.
    Error(String),
}

impl Verdict {
    fn print(&self) {
        match self {
            Self::Ran {
                passed,
                failed,
                broken,
            } => {
                let ok = *failed == 0 && broken.is_empty() && *passed > 0;
                let mut why = String::new();
                if !broken.is_empty() {
                    why = format!(" (broken: {})", broken.join(", "));
                } else if *passed == 0 && *failed == 0 {
                    why = " (no test ran)".into();
                }
                let word = if ok { "PASS" } else { "FAIL" };
                say_raw(&format!(
                    "AMBIT-VM-VERDICT: {word} {passed} passed, {failed} failed{why}"
                ));
                say_raw(&format!("{passed} passed, {failed} failed"));
            }
            Self::Error(e) => say_raw(&format!("AMBIT-VM-VERDICT: ERROR {e}")),
        }
    }
}

/// Counts from libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    passed: u64,
    failed: u64,
    results: u64,
}

impl Counts {
    /// Adds `test result: ok. 3 passed; 1 failed; 0 ignored; ...`.
    fn scan(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.results += 1;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Mounts, reads the plan, loads the modules, brings `lo` up.
fn setup() -> Result<Plan, String> {
    mount_all()?;
    say(&format!(
        "init up: kernel {}, {} s since boot",
        read_trimmed("/proc/sys/kernel/osrelease"),
        uptime()
    ));
    let text = std::fs::read_to_string(PLAN).map_err(|e| format!("reading {PLAN}: {e}"))?;
    let plan = Plan::parse(&text)?;
    if let Some((soft, hard)) = plan.nofile {
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)
            .map_err(|e| format!("setrlimit RLIMIT_NOFILE {soft} {hard}: {e}"))?;
    }
    let mut loaded = Vec::new();
    for module in &plan.modules {
        load_module(module)?;
        loaded.push(module_name(module));
    }
    say(&format!(
        "modules loaded: {}; {} s since boot",
        loaded.join(" "),
        uptime()
    ));
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .env_clear()
        .env("PATH", PATH)
        .status()
        .map_err(|e| format!("running ip link set lo up: {e}"))?;
    if !status.success() {
        return Err(format!("ip link set lo up failed ({status})"));
    }
    say(&format!("ready, {} s since boot", uptime()));
    Ok(plan)
}

fn mount_all() -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let table: [(&str, &str, &str, MsFlags, Option<&str>); 9] = [
        ("proc", "/proc", "proc", nosuid | MsFlags::MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NOEXEC, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", nosuid, Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", nosuid, Some("mode=1777")),
        (
            "bpf",
            "/sys/fs/bpf",
            "bpf",
            nosuid | MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "debugfs",
            "/sys/kernel/debug",
            "debugfs",
            nosuid | MsFlags::MS_NOEXEC,
            None,
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        // sysfs provides /sys/fs/{bpf,cgroup} and /sys/kernel/debug; create the rest.
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
            if fstype == "debugfs" {
                continue; // optional: only for looking around after a failure
            }
            return Err(format!("mount -t {fstype} {source} {target}: {e}"));
        }
    }
    Ok(())
}

fn load_module(path: &Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("finit_module {}: {e}", path.display())),
    }
}

fn module_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "?".into(), |s| s.to_string_lossy().into_owned())
}

/// Runs every test binary in order; a failing one does not stop the rest.
fn run_all(plan: &Plan) -> Verdict {
    let (mut passed, mut failed, mut broken) = (0, 0, Vec::new());
    let total = plan.tests.len();
    for (i, (name, path)) in plan.tests.iter().enumerate() {
        say(&format!("RUN {name} ({}/{total})", i + 1));
        let started = Instant::now();
        let (exit, counts) = match run_one(plan, path) {
            Ok(r) => r,
            Err(e) => (e, Counts::default()),
        };
        passed += counts.passed;
        failed += counts.failed;
        let clean = exit == "exit status 0" && counts.results > 0;
        if !clean && counts.failed == 0 {
            broken.push(format!("{name}: {exit}"));
        }
        say(&format!(
            "DONE {name}: {exit}, {} passed, {} failed, {:.1} s",
            counts.passed,
            counts.failed,
            started.elapsed().as_secs_f64()
        ));
    }
    Verdict::Ran {
        passed,
        failed,
        broken,
    }
}

/// Runs one binary with stdout and stderr on one pipe, copied to the console as it arrives.
/// Returns how it ended and the libtest counts.
fn run_one(plan: &Plan, path: &Path) -> Result<(String, Counts), String> {
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("dup pipe: {e}"))?;
    let child = Command::new(path)
        .args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/tmp")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(forward(reader));
    });
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|e| e.to_string())?);
    let exit = wait_reaping(pid);
    let counts = rx.recv_timeout(DRAIN_TIMEOUT).unwrap_or_else(|_| {
        say("output pipe still open (a leaked process holds it); moving on");
        Counts::default()
    });
    Ok((exit, counts))
}

/// Copies `pipe` to the console chunk by chunk (libtest prints `test x ... ` before the verdict
/// word) and counts the `test result:` lines.
fn forward(mut pipe: PipeReader) -> Counts {
    let mut counts = Counts::default();
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let _ = out.write_all(&buf[..n]);
        let _ = out.flush();
        for &b in &buf[..n] {
            if b == b'\n' {
                counts.scan(&String::from_utf8_lossy(&line));
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        counts.scan(&String::from_utf8_lossy(&line));
        let _ = out.write_all(b"\n");
    }
    counts
}

/// Reaps children until `pid` ends; returns how it ended.
fn wait_reaping(pid: Pid) -> String {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return format!("exit status {code}"),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return format!("killed by {sig}"),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return format!("waitpid: {e}"),
        }
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e): Result<Infallible, Errno> = reboot(RebootMode::RB_POWER_OFF);
    say(&format!(
        "power off failed: {e}; the host's timeout ends the VM"
    ));
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Prints an `AMBIT-VM: ` marker line.
fn say(msg: &str) {
    say_raw(&format!("AMBIT-VM: {msg}"));
}

fn say_raw(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn uptime() -> String {
    read_trimmed("/proc/uptime")
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_libtest_result_lines() {
        let mut c = Counts::default();
        c.scan("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 1.00s");
        c.scan("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        c.scan("test foo ... ok");
        assert_eq!((c.passed, c.failed, c.results), (4, 2, 2));
    }

    #[test]
    fn plan_parses_every_key() {
        let plan = Plan::parse(
            "module /m/veth.ko\nnofile 1024 4096\nenv A=b=c\narg --exact\narg\ntest outbound /t/outbound\n",
        )
        .unwrap();
        assert_eq!(plan.modules, [PathBuf::from("/m/veth.ko")]);
        assert_eq!(plan.nofile, Some((1024, 4096)));
        assert_eq!(plan.env, [("A".to_string(), "b=c".to_string())]);
        assert_eq!(plan.args, ["--exact", ""]);
        assert_eq!(plan.tests[0].0, "outbound");
        assert!(Plan::parse("bogus x").is_err());
        assert!(Plan::parse("nofile 12").is_err());
    }
}
