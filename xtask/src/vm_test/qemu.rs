//! Booting qemu-system-x86_64 and watching its serial console: progress, verdict, panics, timeout.
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long qemu gets to exit after the verdict (the init powers off at once).
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// How much more console output to keep after a kernel panic or stall, for its trace.
const TRACE_GRACE: Duration = Duration::from_secs(3);
/// Show a partial line (libtest's `test x ... ` before its result) after this much silence.
const PARTIAL_AFTER: Duration = Duration::from_secs(1);

/// How qemu runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Emulation (`-accel tcg`); slow but works everywhere.
    Tcg,
}

impl Accel {
    /// `AMBIT_VM_ACCEL=kvm|tcg`, else KVM only where it can run a stock kernel: `/dev/kvm`, a
    /// CPU with vmx or svm, and no `kvm_pvm` module (PVM hosts accept KVM, then hang or crawl
    /// with a stock Debian kernel; see the VM recipe).
    pub(crate) fn detect() -> Result<(Self, String)> {
        match std::env::var("AMBIT_VM_ACCEL").as_deref() {
            Ok("kvm") => return Ok((Self::Kvm, "AMBIT_VM_ACCEL=kvm".into())),
            Ok("tcg") => return Ok((Self::Tcg, "AMBIT_VM_ACCEL=tcg".into())),
            Ok(other) => anyhow::bail!("AMBIT_VM_ACCEL={other}: expected kvm or tcg"),
            Err(_) => {}
        }
        if !Path::new("/dev/kvm").exists() {
            return Ok((Self::Tcg, "no /dev/kvm".into()));
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return Ok((
                Self::Tcg,
                "/dev/kvm is PVM, which cannot run stock kernels".into(),
            ));
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw {
            Ok((Self::Kvm, "/dev/kvm with vmx/svm".into()))
        } else {
            Ok((Self::Tcg, "the CPU has no vmx/svm".into()))
        }
    }
}

/// One boot.
#[derive(Debug)]
pub(crate) struct Boot<'a> {
    pub(crate) kernel: &'a Path,
    pub(crate) initrd: &'a Path,
    pub(crate) accel: Accel,
    pub(crate) memory_mib: u32,
    pub(crate) cpus: u32,
    pub(crate) timeout: Duration,
    /// The longest the console may stay silent.
    pub(crate) silence: Duration,
    /// The whole console output is also written here.
    pub(crate) log: &'a Path,
}

/// What the console showed.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The text after `AMBIT-VM-VERDICT: `, e.g. `PASS 42 passed, 0 failed`.
    pub(crate) verdict: Option<String>,
    /// Why the VM was stopped early (panic, stall, timeout), or how it ended without a verdict.
    pub(crate) abort: Option<String>,
    /// From starting qemu to the init's first line.
    pub(crate) boot: Option<Duration>,
    /// From the init being ready to the verdict.
    pub(crate) suite: Option<Duration>,
    /// `test NAME ... FAILED` lines, as `binary: NAME`.
    pub(crate) failed_tests: Vec<String>,
    /// The test binary running last.
    pub(crate) last_binary: Option<String>,
    /// Per test binary that failed: libtest's report from `failures:` to `test result:` (each
    /// failed test's captured output and panic), or its `DONE` line if it ended without one.
    pub(crate) reports: Vec<(String, Vec<String>)>,
}

impl Outcome {
    /// A PASS verdict, no abort.
    pub(crate) fn passed(&self) -> bool {
        self.abort.is_none()
            && self
                .verdict
                .as_deref()
                .is_some_and(|v| v.starts_with("PASS"))
    }
}

/// Boots, streams the console with a `[vm  12.3s]` prefix, and returns what it showed.
pub(crate) fn run(boot: &Boot<'_>) -> Result<Outcome> {
    let mut cmd = command(boot);
    eprintln!("==> {}", shown(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel();
    for pipe in [pipe_of(child.stdout.take()), pipe_of(child.stderr.take())] {
        let tx = tx.clone();
        if let Some(mut pipe) = pipe {
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
    }
    drop(tx);
    let log = File::create(boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
    let mut watch = Watch::new(started, boot.timeout, boot.silence, BufWriter::new(log));
    watch.stream(&rx, &mut child);
    let _ = watch.log.flush();
    let status = child.wait().context("waiting for qemu")?;
    if watch.outcome.verdict.is_none() && watch.outcome.abort.is_none() {
        watch.outcome.abort = Some(format!("qemu exited ({status}) without a verdict"));
    }
    Ok(watch.outcome)
}

fn command(boot: &Boot<'_>) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    match boot.accel {
        Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        // `max` offers AES-NI, PCLMUL and AVX2 (emulated): ring's TLS is unusably slow without.
        Accel::Tcg => c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    c.args(["-m", &boot.memory_mib.to_string()])
        .args(["-smp", &boot.cpus.to_string()])
        // The serial port on stdio and no display: unlike -nographic, SeaBIOS then stays off
        // the console, which carries only the kernel's and the init's lines.
        .args([
            "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio",
        ])
        .args(["-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        // A busy host can starve TCG's vCPU threads for many seconds: stall and soft-lockup
        // reports only after a minute (the defaults, 21 s and 20 s, fire falsely there).
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet rcupdate.rcu_cpu_stall_timeout=60 watchdog_thresh=30",
        ]);
    c
}

fn pipe_of(p: Option<impl Read + Send + 'static>) -> Option<Box<dyn Read + Send>> {
    p.map(|p| Box::new(p) as Box<dyn Read + Send>)
}

struct Watch {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    silence: Duration,
    last_output: Instant,
    log: BufWriter<File>,
    /// The current line so far (without `\r`).
    line: Vec<u8>,
    /// How much of `line` is already on the terminal.
    shown: usize,
    ready: Option<Instant>,
    soft_lockups: u32,
    /// libtest's failure report being collected (from `failures:` on).
    report: Option<Vec<String>>,
    outcome: Outcome,
}

impl Watch {
    /// A watch of a boot that started at `started`, nothing seen yet, logging to `log`.
    fn new(started: Instant, timeout: Duration, silence: Duration, log: BufWriter<File>) -> Self {
        Self {
            started,
            deadline: started + timeout,
            timeout,
            silence,
            last_output: started,
            log,
            line: Vec::new(),
            shown: 0,
            ready: None,
            soft_lockups: 0,
            report: None,
            outcome: Outcome::default(),
        }
    }

    fn stream(&mut self, rx: &Receiver<Vec<u8>>, child: &mut Child) {
        loop {
            let now = Instant::now();
            if now >= self.last_output + self.silence && self.outcome.abort.is_none() {
                let why = format!(
                    "no console output for {:?} (running: {})",
                    self.silence,
                    self.outcome
                        .last_binary
                        .as_deref()
                        .unwrap_or("no test binary yet")
                );
                eprintln!("{}xtask: {why}: stopping the VM", self.prefix());
                self.outcome.abort = Some(why);
                self.deadline = now;
            }
            if now >= self.deadline {
                if self.outcome.abort.is_none() && self.outcome.verdict.is_none() {
                    self.outcome.abort = Some(format!(
                        "timed out after {:?} (running: {})",
                        self.timeout,
                        self.outcome
                            .last_binary
                            .as_deref()
                            .unwrap_or("no test binary yet")
                    ));
                }
                let _ = child.kill(); // our own qemu child
                break;
            }
            let wait = PARTIAL_AFTER
                .min(self.deadline - now)
                .min((self.last_output + self.silence).saturating_duration_since(now));
            match rx.recv_timeout(wait) {
                Ok(chunk) => {
                    self.last_output = Instant::now();
                    self.feed(&chunk);
                }
                Err(RecvTimeoutError::Timeout) => self.show_partial(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if !self.line.is_empty() {
            self.end_line();
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        let _ = self.log.write_all(chunk);
        for &b in chunk {
            match b {
                b'\r' => {}
                b'\n' => self.end_line(),
                _ => self.line.push(b),
            }
        }
    }

    fn prefix(&self) -> String {
        format!("[vm {:6.1}s] ", self.started.elapsed().as_secs_f64())
    }

    fn show_partial(&mut self) {
        if self.line.len() > self.shown {
            let text = strip_escapes(&String::from_utf8_lossy(&self.line[self.shown..]));
            let prefix = if self.shown == 0 {
                self.prefix()
            } else {
                String::new()
            };
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "{prefix}{text}");
            let _ = err.flush();
            self.shown = self.line.len();
        }
    }

    fn end_line(&mut self) {
        let full = strip_escapes(&String::from_utf8_lossy(&self.line));
        let rest = strip_escapes(&String::from_utf8_lossy(
            &self.line[self.shown.min(self.line.len())..],
        ));
        let prefix = if self.shown == 0 {
            self.prefix()
        } else {
            String::new()
        };
        eprintln!("{prefix}{rest}");
        self.line.clear();
        self.shown = 0;
        self.scan(&full);
    }

    fn scan(&mut self, line: &str) {
        let now = Instant::now();
        self.collect_report(line);
        if line.contains("AMBIT-VM: init up") && self.outcome.boot.is_none() {
            self.outcome.boot = Some(self.started.elapsed());
        } else if line.contains("AMBIT-VM: ready") {
            self.ready = Some(now);
        } else if let Some(rest) = after(line, "AMBIT-VM: RUN ") {
            self.outcome.last_binary = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(verdict) = after(line, "AMBIT-VM-VERDICT: ") {
            self.outcome.verdict = Some(verdict.trim().to_string());
            self.outcome.suite = self.ready.map(|r| now - r);
            self.deadline = self.deadline.min(now + EXIT_GRACE);
        } else if let Some(name) = failed_test(line) {
            let binary = self.outcome.last_binary.as_deref().unwrap_or("?");
            self.outcome.failed_tests.push(format!("{binary}: {name}"));
        } else if let Some(why) = self.fatal(line) {
            if self.outcome.abort.is_none() {
                eprintln!("{}xtask: {why}: stopping the VM", self.prefix());
                self.outcome.abort = Some(why);
                self.deadline = self.deadline.min(now + TRACE_GRACE);
            }
        }
    }

    /// A kernel message that means the guest is dead or wedged.
    fn fatal(&mut self, line: &str) -> Option<String> {
        if line.contains("Kernel panic - not syncing") {
            return Some("kernel panic".into());
        }
        let msg = kernel_message(line)?;
        if msg.contains("soft lockup") {
            // TCG on a busy host can starve a vCPU once; twice is a real lockup.
            self.soft_lockups += 1;
            return (self.soft_lockups >= 2).then(|| "repeated soft lockups".into());
        }
        if msg.contains("detected stall") || msg.contains("RCU stall") {
            return Some("RCU stall".into());
        }
        if msg.starts_with("BUG:") || msg.contains(": BUG:") {
            return Some(format!("kernel {msg}"));
        }
        None
    }
}

impl Watch {
    /// Keeps libtest's failure report of the running binary: it starts at the first
    /// `failures:` line and ends with `test result:`. A binary that ends (`AMBIT-VM: DONE`)
    /// unsuccessfully without such a report is listed with its `DONE` line (a crash, a panic
    /// outside a test: its output is in the console above).
    fn collect_report(&mut self, line: &str) {
        let binary = || self.outcome.last_binary.clone().unwrap_or_default();
        if let Some(report) = self.report.as_mut() {
            report.push(line.to_string());
            if line.starts_with("test result:") {
                let lines = self.report.take().unwrap_or_default();
                self.outcome.reports.push((binary(), lines));
            }
        } else if line == "failures:" {
            self.report = Some(vec![line.to_string()]);
        } else if let Some(rest) = after(line, "AMBIT-VM: DONE ") {
            let clean = rest.contains(": exit status 0,");
            if !clean && !self.outcome.reports.iter().any(|(b, _)| *b == binary()) {
                self.outcome
                    .reports
                    .push((binary(), vec![format!("{line} (see the console above)")]));
            }
        }
    }
}

/// The text after `marker`, wherever it is in the line (SeaBIOS escapes may precede it).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// `NAME` of libtest's `test NAME ... FAILED`.
fn failed_test(line: &str) -> Option<&str> {
    line.strip_prefix("test ")?.strip_suffix(" ... FAILED")
}

/// The message of a kernel console line (`[   12.345678] msg`); `None` for other lines.
fn kernel_message(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, msg) = rest.split_once(']')?;
    let (secs, micros) = stamp.trim().split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(secs) && digits(micros)).then(|| msg.trim_start())
}

/// Drops ANSI escape sequences (SeaBIOS clears the screen before the kernel starts).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // parameters and intermediates, then one final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The command line, for the log.
fn shown(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Where a boot's console log goes.
pub(crate) fn log_path(dir: &Path, release: &str) -> PathBuf {
    dir.join(format!("console-{release}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_messages_are_told_from_test_output() {
        assert_eq!(kernel_message("[   12.345678] BUG: x"), Some("BUG: x"));
        assert_eq!(kernel_message("[12.3] ok"), Some("ok"));
        assert_eq!(kernel_message("BUG: printed by a test"), None);
        assert_eq!(kernel_message("[vm 1.0s] x"), None);
    }

    fn watch() -> Watch {
        let minute = Duration::from_secs(60);
        let log = BufWriter::new(File::create("/dev/null").unwrap());
        Watch::new(Instant::now(), minute, minute, log)
    }

    #[test]
    fn failure_reports_and_verdict_are_collected() {
        let mut w = watch();
        for line in [
            "AMBIT-VM: init up: kernel 6.1.0-56-cloud-amd64, 1.5 s since boot",
            "AMBIT-VM: ready, 1.7 s since boot",
            "AMBIT-VM: RUN outbound (1/2)",
            "test a ... ok",
            "test b ... FAILED",
            "failures:",
            "---- b stdout ----",
            "thread 'b' panicked at tests/tests/outbound.rs:1:1:",
            "failures:",
            "    b",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored",
            "AMBIT-VM: DONE outbound: exit status 101, 1 passed, 1 failed, 3.0 s",
            "AMBIT-VM: RUN inbound (2/2)",
            "AMBIT-VM: DONE inbound: killed by SIGSEGV, 0 passed, 0 failed, 0.1 s",
            "AMBIT-VM-VERDICT: FAIL 1 passed, 1 failed (broken: inbound: killed by SIGSEGV)",
        ] {
            w.scan(line);
        }
        let o = &w.outcome;
        assert!(o.boot.is_some() && o.suite.is_some());
        assert!(!o.passed());
        assert_eq!(o.failed_tests, ["outbound: b"]);
        assert_eq!(o.reports.len(), 2);
        assert_eq!(o.reports[0].0, "outbound");
        assert_eq!(o.reports[0].1.len(), 6);
        assert!(o.reports[0].1[2].contains("panicked"));
        assert_eq!(o.reports[1].0, "inbound");
        assert!(o.reports[1].1[0].contains("SIGSEGV"));
    }

    #[test]
    fn a_kernel_panic_aborts_but_one_soft_lockup_does_not() {
        let mut w = watch();
        w.scan("[   30.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 61s! [x:1]");
        assert!(w.outcome.abort.is_none());
        w.scan("[   99.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 62s! [x:1]");
        assert_eq!(w.outcome.abort.as_deref(), Some("repeated soft lockups"));
        let mut w = watch();
        w.scan("[   12.000000] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:");
        assert_eq!(w.outcome.abort.as_deref(), Some("RCU stall"));
        let mut w = watch();
        w.scan("[   12.000000] Kernel panic - not syncing: Attempted to kill init!");
        assert_eq!(w.outcome.abort.as_deref(), Some("kernel panic"));
        w.scan("AMBIT-VM-VERDICT: PASS 1 passed, 0 failed");
        assert!(!w.outcome.passed());
    }

    #[test]
    fn escapes_and_markers() {
        let line = "Booting from ROM..\u{1b}c\u{1b}[?7l\u{1b}[2JAMBIT-VM: init up";
        assert_eq!(strip_escapes(line), "Booting from ROM..AMBIT-VM: init up");
        assert_eq!(after(line, "AMBIT-VM: "), Some("init up"));
        assert_eq!(failed_test("test a::b ... FAILED"), Some("a::b"));
        assert_eq!(failed_test("test a::b ... ok"), None);
    }
}
