//! One QEMU guest from start to power-off: process, console, RAM file (handed to the TCG
//! plugin once mapped), gdbstub, and the cleanup of all of them on every exit path.

use crate::gdb::{GdbClient, GdbError, StopReply};
use crate::launch::QemuConfig;
use crate::plugin_link::PluginLink;
use crate::ram::{RamError, RamFile, RamMap};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the memory backend in QEMU's memory tree (see `launch`).
pub const RAM_REGION: &str = "ornament-ram";

/// Why a QEMU guest failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MachineError {
    /// cannot create the private run directory
    RunDir(#[source] std::io::Error),
    /// cannot start QEMU ({binary}); on Debian: apt-get install qemu-system-x86
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited during start-up: {stderr}
    EarlyExit {
        /// What QEMU printed.
        stderr: String,
    },
    /// gdbstub of QEMU failed
    Gdb(#[from] GdbError),
    /// guest RAM file failed
    Ram(#[from] RamError),
    /// the TCG plugin did not come up (QEMU said: {stderr})
    Plugin {
        /// Why.
        #[source]
        source: crate::plugin_link::PluginLinkError,
        /// What QEMU printed.
        stderr: String,
    },
    /// interrupted (Ctrl-C); QEMU was stopped
    Interrupted,
    /// the guest did not finish within {0:?}; QEMU was stopped
    Timeout(Duration),
    /// waiting for QEMU failed
    Wait(#[source] std::io::Error),
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The status line /init wrote on ttyS1 (`ornament-exit N`), if any.
    pub guest_status: Option<i32>,
    /// QEMU's own exit code.
    pub qemu_code: Option<i32>,
    /// The last lines QEMU printed on stderr.
    pub qemu_stderr: String,
}

/// Where the guest console goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// A started QEMU.
#[derive(Debug)]
pub struct QemuMachine {
    child: Option<Child>,
    paths: Option<RunPaths>,
    status_path: PathBuf,
    gdb: GdbClient,
    ram: Arc<RamFile>,
    vcpus: u32,
    console: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

/// A private directory for sockets and files of one run (mode 0700).
pub fn run_dir() -> Result<tempfile::TempDir, MachineError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("ornament-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
        .map_err(MachineError::RunDir)
}

/// A path for the RAM file: in /dev/shm when it exists (it is unlinked as soon as
/// both QEMU and we have mapped it).
fn ram_path(run_dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let name = format!(
        "ornament-ram-{}-{}",
        std::process::id(),
        run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    if shm.is_dir() {
        shm.join(name)
    } else {
        run_dir.join(name)
    }
}

/// Files of one run, chosen before QEMU starts.
#[derive(Debug)]
pub struct RunPaths {
    /// Private directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// gdbstub socket.
    pub gdb_socket: PathBuf,
    /// /init's status channel.
    pub status: PathBuf,
    /// RAM file.
    pub ram: PathBuf,
}

impl Drop for RunPaths {
    fn drop(&mut self) {
        // Normally unlinked right after mapping; this covers the early exits.
        let _ = std::fs::remove_file(&self.ram);
    }
}

impl RunPaths {
    /// Create the private directory and name the files in it.
    pub fn new() -> Result<Self, MachineError> {
        let dir = run_dir()?;
        let gdb_socket = dir.path().join("gdb.sock");
        let status = dir.path().join("status");
        let ram = ram_path(dir.path());
        Ok(Self {
            dir,
            gdb_socket,
            status,
            ram,
        })
    }
}

/// Turns the serial console's `\r\n` line ends into `\n` (a lone `\r` stays).
#[derive(Debug)]
pub struct CrlfToLf<W: Write> {
    inner: W,
    pending_cr: bool,
}

impl<W: Write> CrlfToLf<W> {
    /// Wrap a writer.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending_cr: false,
        }
    }
}

impl<W: Write> Write for CrlfToLf<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 1);
        for &b in buf {
            if self.pending_cr && b != b'\n' {
                out.push(b'\r');
            }
            self.pending_cr = b == b'\r';
            if !self.pending_cr {
                out.push(b);
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    mut r: R,
    mut sink: Option<ConsoleSink>,
    keep: Arc<Mutex<Vec<u8>>>,
    keep_max: usize,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(s) = sink.as_mut() {
                        let _ = s.write_all(&buf[..n]);
                        let _ = s.flush();
                    }
                    let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                    k.extend_from_slice(&buf[..n]);
                    if k.len() > keep_max {
                        let cut = k.len() - keep_max;
                        k.drain(..cut);
                    }
                }
            }
        }
    })
}

impl QemuMachine {
    /// Start QEMU (stopped, `-S`), attach the gdbstub, map the RAM file.
    /// The guest has not run an instruction when this returns; call `resume`.
    /// With `plugin`, QEMU loads ornament's TCG plugin, which connects to that link
    /// before QEMU finishes starting; the link is accepted here.
    pub fn start(
        mut cfg: QemuConfig,
        paths: RunPaths,
        console: Option<ConsoleSink>,
        mut plugin: Option<&mut PluginLink>,
    ) -> Result<Self, MachineError> {
        cfg.gdb_socket = paths.gdb_socket.clone();
        cfg.status_path = paths.status.clone();
        cfg.ram_path = paths.ram.clone();
        cfg.start_paused = true;
        let so = cfg.plugin.as_ref().map(|(so, _)| so.clone());
        if let (Some(link), Some(so)) = (plugin.as_deref(), so) {
            // qemu_args gives ["-plugin", "SO,sock=...,..."]: keep our launch format.
            let args = link.qemu_args(&so, &[]);
            let extra: Vec<String> = args[1].split(',').skip(1).map(str::to_owned).collect();
            cfg.plugin = Some((so, extra));
        }
        let mut cmd = Command::new(&cfg.binary);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and only
        // calls async-signal-safe prctl; it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // QEMU dies with us, even if we are SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!(binary = %cfg.binary.display(), args = ?cfg.args(), "starting QEMU");
        let mut child = cmd.spawn().map_err(|source| MachineError::Spawn {
            binary: cfg.binary.clone(),
            source,
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err_thread = child
            .stderr
            .take()
            .map(|e| spawn_reader(e, None, stderr.clone(), 64 * 1024));
        let console: Option<ConsoleSink> =
            console.map(|c| Box::new(CrlfToLf::new(c)) as ConsoleSink);
        let console_thread = child
            .stdout
            .take()
            .map(|o| spawn_reader(o, console, Arc::new(Mutex::new(Vec::new())), 0));
        let started = Instant::now();
        // From here on, any error must kill QEMU: wrap it first.
        let mut guard = ChildGuard(Some(child));
        if let Some(link) = plugin.as_deref_mut() {
            // QEMU installs plugins before it opens the gdbstub, and ours waits for us.
            // Poll, so that a QEMU that could not load the plugin is reported at once.
            let accepted = loop {
                match link.accept(Duration::from_millis(200)) {
                    Err(crate::plugin_link::PluginLinkError::AcceptTimeout(_))
                        if started.elapsed() < Duration::from_secs(30) =>
                    {
                        let exited = guard
                            .0
                            .as_mut()
                            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                        if exited {
                            if let Some(t) = err_thread {
                                let _ = t.join();
                            }
                            return Err(MachineError::EarlyExit {
                                stderr: tail(&stderr),
                            });
                        }
                    }
                    other => break other,
                }
            };
            if let Err(e) = accepted {
                if let Some(c) = guard.0.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                if let Some(t) = err_thread {
                    let _ = t.join();
                }
                return Err(MachineError::Plugin {
                    source: e,
                    stderr: tail(&stderr),
                });
            }
        }
        let gdb = loop {
            if let Some(c) = guard.0.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    if let Some(t) = err_thread {
                        let _ = t.join();
                    }
                    return Err(MachineError::EarlyExit {
                        stderr: tail(&stderr),
                    });
                }
            }
            match GdbClient::connect(&paths.gdb_socket, Duration::from_millis(200)) {
                Ok(g) => break g,
                Err(GdbError::Connect { .. }) if started.elapsed() < Duration::from_secs(20) => {}
                Err(e) => return Err(e.into()),
            }
        };
        let mut gdb = gdb;
        let mtree = gdb.monitor("info mtree -f")?;
        let map = RamMap::from_mtree(&mtree, RAM_REGION)?;
        let ram = RamFile::map(&paths.ram, map)?;
        // Both QEMU and we hold the mapping now: nothing needs the name.
        let _ = std::fs::remove_file(&paths.ram);
        if let Some(link) = plugin {
            // The plugin reads guest memory from this file from now on (its own page walk);
            // without it, it keeps QEMU's slower accessor. The guest has not set up paging
            // yet, so the plugin takes the paging mode from CR4 at each hit.
            let sent = match ram.wire_regions() {
                Some(regions) => link
                    .send_ram(
                        ram.fd(),
                        &regions,
                        ornament_engine::wire::RamPaging::FromCr4,
                    )
                    .map_err(|e| e.to_string()),
                None => Err(format!(
                    "{} RAM ranges, more than a RAM record carries",
                    ram.ram_map().ranges().len()
                )),
            };
            if let Err(why) = sent {
                tracing::warn!(%why, "guest RAM not given to the plugin; it reads through QEMU");
            }
        }
        let vcpus = u32::try_from(gdb.vcpus()?.len()).unwrap_or(0);
        Ok(Self {
            child: guard.0.take(),
            status_path: paths.status.clone(),
            paths: Some(paths),
            gdb,
            ram: Arc::new(ram),
            vcpus,
            console: console_thread,
            stderr,
            started,
        })
    }

    /// Guest RAM (readable while the guest runs).
    pub fn ram(&self) -> Arc<RamFile> {
        self.ram.clone()
    }

    /// The gdbstub client.
    pub fn gdb(&mut self) -> &mut GdbClient {
        &mut self.gdb
    }

    /// Number of vCPUs QEMU reports.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Let the guest run.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        self.gdb.cont(None)?;
        Ok(())
    }

    /// Wait up to `timeout` for the guest to end; true when it has (QEMU exited or
    /// closed the gdbstub). Unexpected stops are resumed.
    pub fn poll_exit(&mut self, timeout: Duration) -> Result<bool, MachineError> {
        match self.gdb.wait_stop(timeout) {
            Ok(None) => Ok(false),
            Ok(Some(StopReply::Exited(_) | StopReply::Terminated(_))) | Err(GdbError::Closed) => {
                Ok(true)
            }
            Ok(Some(other)) => {
                tracing::warn!(?other, "unexpected stop; resuming");
                self.gdb.cont(None)?;
                Ok(false)
            }
            Err(GdbError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until the guest powers off (or `stop` says to give up, or `timeout`);
    /// QEMU is killed on the way out of an interruption or timeout.
    pub fn wait_in_place(
        &mut self,
        stop: &AtomicBool,
        timeout: Option<Duration>,
    ) -> Result<(), MachineError> {
        let begin = Instant::now();
        loop {
            if stop.load(Ordering::Relaxed) {
                self.kill();
                return Err(MachineError::Interrupted);
            }
            if let Some(t) = timeout {
                if begin.elapsed() > t {
                    self.kill();
                    return Err(MachineError::Timeout(t));
                }
            }
            match self.poll_exit(Duration::from_millis(100)) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.kill();
                    return Err(e);
                }
            }
        }
    }

    /// `wait_in_place`, then `finish`.
    pub fn wait(
        mut self,
        stop: &AtomicBool,
        timeout: Option<Duration>,
    ) -> Result<RunOutcome, MachineError> {
        let r = self.wait_in_place(stop, timeout);
        self.finish_after(r)
    }

    /// Finish after a wait that ended with `r`: collect the outcome, or stop QEMU
    /// and pass the error on.
    pub fn finish_after(mut self, r: Result<(), MachineError>) -> Result<RunOutcome, MachineError> {
        match r {
            Ok(()) => self.finish(),
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    /// Reap QEMU and collect what the run produced.
    pub fn finish(mut self) -> Result<RunOutcome, MachineError> {
        let code = match self.child.take() {
            Some(mut c) => {
                // QEMU exits on its own after power-off; give it a moment.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match c.try_wait().map_err(MachineError::Wait)? {
                        Some(st) => break st.code(),
                        None if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        None => {
                            let _ = c.kill();
                            break c.wait().map_err(MachineError::Wait)?.code();
                        }
                    }
                }
            }
            None => None,
        };
        if let Some(t) = self.console.take() {
            let _ = t.join();
        }
        let guest_status = std::fs::read(&self.status_path)
            .ok()
            .and_then(|s| ornament_engine::report::last_exit_report(&s));
        Ok(RunOutcome {
            guest_status,
            qemu_code: code,
            qemu_stderr: tail(&self.stderr),
        })
    }

    /// Kill QEMU now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        self.kill();
        // RunPaths removes the RAM file (if still named) and the run directory.
        drop(self.paths.take());
    }
}

/// Kills the child on drop unless taken.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    let b = buf.lock().unwrap_or_else(|p| p.into_inner());
    let s = String::from_utf8_lossy(&b);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_line_ends() {
        let mut w = CrlfToLf::new(Vec::new());
        w.write_all(b"a\r\nb\r").expect("vec");
        w.write_all(b"\nc\rd").expect("vec");
        assert_eq!(w.inner, b"a\nb\nc\rd");
    }

    #[test]
    fn run_paths_are_private_and_removed() {
        let p = RunPaths::new().expect("run dir");
        let dir = p.dir.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "run dir must be private");
        assert!(p.gdb_socket.starts_with(&dir));
        drop(p);
        assert!(!dir.exists());
    }
}
