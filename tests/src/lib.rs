//! Shared helpers for the real-guest tests in `tests/tests/`: finding the
//! `ornament` binary, gating on what the host has, running guests with limits.
#![forbid(unsafe_code)]

pub mod browser;
pub mod ecs;
pub mod otlp;
pub mod schema;
pub mod signals;
pub mod threads;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Seconds any test guest may run before ornament stops it.
pub const GUEST_TIMEOUT_SECS: u64 = 300;

pub use ornament_test_gate as gate;
pub use ornament_test_gate::in_ci;

/// [`gate::require`] as a yes/no for tests that gate by hand: true when the test
/// should go on; false (outside CI, after the `SKIPPED` line) when it must return at
/// once. Under CI a missing requirement panics. `requirement` is a `bool`, an
/// `Option`, or a `Result` whose error says why.
pub fn require<R: gate::Requirement>(what: &str, requirement: R) -> bool {
    gate::require(what, requirement).is_some()
}

/// Gate a real-guest test on what booting the default image under QEMU needs: QEMU, and
/// what building the image takes (each as [`require_host!`]).
#[macro_export]
macro_rules! require_qemu_guest {
    () => {
        $crate::require_host!("qemu-system-x86_64", $crate::has_qemu());
        $crate::require_host!(
            "apt-get, dpkg-deb and busybox-static",
            $crate::can_build_images()
        );
    };
}

/// Gate a test on a prerequisite: `require_host!("QEMU", has_qemu());` The one rule of
/// [`ornament_test_gate`]: under CI a missing prerequisite fails the test, outside CI
/// the test prints `SKIPPED: ... needs ...` and returns.
#[macro_export]
macro_rules! require_host {
    ($what:expr, $present:expr $(,)?) => {
        $crate::gate::require!($what, $present)
    };
}

/// Can this user open /dev/kvm read-write (hardware KVM or PVM)? The error says why not.
pub fn has_kvm() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

/// The QEMU binary tests run: `$ORNAMENT_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu_binary() -> String {
    std::env::var("ORNAMENT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Is QEMU ([`qemu_binary`]) runnable? The error names the binary and why not.
pub fn has_qemu() -> std::io::Result<()> {
    let q = qemu_binary();
    let out = Command::new(&q)
        .arg("--version")
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {q}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "`{q} --version` failed: {}",
            out.status
        )))
    }
}

/// The package of catalogue image `image`'s reference kernel (the one whose profile is
/// committed), for `--kernel-package`: tests that check facts of that very kernel
/// (its release in messages, its committed profile) pin it; the catalogue itself
/// resolves to the newest kernel of the flavour.
pub fn reference_package(image: &str) -> &'static str {
    ornament_images::catalog::reference(image).package
}

/// Can images be built (apt-get and dpkg-deb present, busybox-static installed)?
/// The error names the first thing missing.
pub fn can_build_images() -> std::io::Result<()> {
    for tool in ["apt-get", "dpkg-deb"] {
        Command::new(tool)
            .arg("--version")
            .output()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {tool}: {e}")))?;
    }
    if Path::new("/bin/busybox").exists() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "/bin/busybox is missing (apt-get install busybox-static)",
        ))
    }
}

/// A bench's line comparing a figure with its stated target:
/// `target <what> <target>: <figure> met` (or `missed`).
pub fn target_line(what: &str, target: &str, figure: &str, met: bool) -> String {
    let verdict = if met { "met" } else { "missed" };
    format!("target {what} {target}: {figure} {verdict}")
}

/// The `ornament` binary: `$ORNAMENT_BIN`, else beside the test executable's
/// `deps/` directory (where `cargo build` puts it).
pub fn ornament_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ORNAMENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join("ornament");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace` before `cargo test` (or set ORNAMENT_BIN)",
        bin.display()
    );
    bin
}

/// For benchmarks, which cargo builds without the workspace's binaries: build the
/// `ornament` binary and the TCG plugin in the profile of the running executable (a no-op
/// when they are fresh), so a bench never measures a stale build. Does nothing when
/// `$ORNAMENT_BIN` names the binary.
pub fn build_workspace_binaries() {
    if std::env::var_os("ORNAMENT_BIN").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("bench executable path");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(["build", "--workspace", "--bins", "--lib"]);
    if release {
        c.arg("--release");
    }
    let st = c.status().expect("run cargo build");
    assert!(st.success(), "cargo build --workspace failed");
}

/// A finished `ornament` invocation.
#[derive(Debug)]
pub struct Ran {
    /// Exit code.
    pub code: Option<i32>,
    /// stdout.
    pub stdout: String,
    /// stderr (guest console, ornament's messages).
    pub stderr: String,
    /// Process id ornament ran as.
    pub pid: u32,
}

impl Ran {
    fn new(o: Output, pid: u32) -> Self {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            pid,
        }
    }
}

/// `ornament run --engine qemu --timeout GUEST_TIMEOUT_SECS EXTRA... -- CMD...` on the
/// default image, as [`ornament`] runs it.
pub fn run_in_guest(extra: &[&str], cmd: &[&str]) -> (Ran, tempfile::TempDir) {
    let timeout = GUEST_TIMEOUT_SECS.to_string();
    let mut args = vec!["run", "--engine", "qemu", "--timeout", &timeout];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    ornament(&args)
}

/// Run `ornament ARGS` with a private runtime/temp directory; returns the result
/// and that directory (to check that nothing was left in it).
pub fn ornament(args: &[&str]) -> (Ran, tempfile::TempDir) {
    ornament_env(args, &[])
}

/// As `ornament`, with extra environment variables.
pub fn ornament_env(args: &[&str], env: &[(&str, &str)]) -> (Ran, tempfile::TempDir) {
    let rt = tempfile::tempdir().expect("runtime dir");
    let mut c = Command::new(ornament_bin());
    c.args(args)
        .env("XDG_RUNTIME_DIR", rt.path())
        .env("TMPDIR", rt.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().expect("run ornament");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for ornament");
    (Ran::new(out, pid), rt)
}

/// Fail if anything of run `r` is left: files in its runtime `dir`, a process
/// that mentions `dir`, or its RAM file in /dev/shm.
pub fn assert_nothing_left(r: &Ran, dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("read runtime dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let needle = dir.to_string_lossy().into_owned();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&needle),
            "process {} still running: {cmdline}",
            p.path().display()
        );
    }
    let shm: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("ornament-ram-{}-", r.pid)))
                .collect()
        })
        .unwrap_or_default();
    assert!(shm.is_empty(), "RAM files left in /dev/shm: {shm:?}");
}

/// The processes (pid, command line) whose command line mentions `needle`, other
/// than this test process.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != me && cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Poll `cond` every 50 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Send `signal` (a name for kill(1): INT, KILL, ...) to `target` (a pid, or `-PGID`).
pub fn send_signal(signal: &str, target: &str) {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{signal} {target} failed");
}

/// An `ornament` started in the background, in its own process group (as a shell
/// starts a job), with a private runtime/temp directory and its output in files;
/// SIGKILLed if the test fails.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    /// Process id (and process group id) of ornament.
    pub pid: u32,
    rt: Option<tempfile::TempDir>,
    logs: tempfile::TempDir,
}

impl Background {
    /// Start `ornament ARGS` with extra environment variables.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_in(tempfile::tempdir().expect("runtime dir"), args, env)
    }

    /// As `start`, with the runtime directory `rt` (to run again where a run was killed).
    pub fn start_in(rt: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::os::unix::process::CommandExt;
        let logs = tempfile::tempdir().expect("log dir");
        let file = |name: &str| std::fs::File::create(logs.path().join(name)).expect("log file");
        let mut c = Command::new(ornament_bin());
        c.args(args)
            .env("XDG_RUNTIME_DIR", rt.path())
            .env("TMPDIR", rt.path())
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .process_group(0);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("start ornament");
        Background {
            pid: child.id(),
            child: Some(child),
            rt: Some(rt),
            logs,
        }
    }

    /// Its private runtime directory.
    pub fn rt(&self) -> &Path {
        self.rt.as_ref().expect("runtime dir").path()
    }

    /// Take the runtime directory (after `kill9`, to start again in it).
    pub fn into_rt(mut self) -> tempfile::TempDir {
        self.rt.take().expect("runtime dir")
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    /// Wait until stderr contains `needle`; panics (with stderr) after `timeout`.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.stderr().contains(needle) || self.has_exited()
        });
        assert!(
            ok && self.stderr().contains(needle),
            "{needle:?} not on stderr within {timeout:?}:\n{}",
            self.stderr()
        );
    }

    /// Has ornament exited?
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The QEMU processes of this run (their command line names its runtime directory).
    pub fn qemu_pids(&self) -> Vec<u32> {
        processes_mentioning(&self.rt().to_string_lossy())
            .into_iter()
            .filter(|(pid, cmd)| *pid != self.pid && cmd.contains("qemu"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// SIGKILL ornament (only ornament, not its process group) and reap it.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL ornament");
        c.wait().expect("reap ornament");
    }

    /// Wait (at most `timeout`) for ornament to exit; what it did.
    pub fn wait(mut self, timeout: Duration) -> (Ran, tempfile::TempDir) {
        let mut child = self.child.take().expect("running");
        let ok = wait_until(timeout, || child.try_wait().ok().flatten().is_some());
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ornament did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
        }
        let status = child.wait().expect("reap ornament");
        let ran = Ran {
            code: status.code(),
            stdout: std::fs::read_to_string(self.logs.path().join("stdout")).unwrap_or_default(),
            stderr: self.stderr(),
            pid: self.pid,
        };
        (ran, self.rt.take().expect("runtime dir"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
