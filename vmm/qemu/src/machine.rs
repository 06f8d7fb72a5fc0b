//! One QEMU guest from start to power-off: process, console, RAM file (handed to the TCG
//! plugin once mapped), gdbstub, and the cleanup of all of them on every exit path.
//!
//! Nothing of a run keeps a name once QEMU has started: guest RAM is a memfd that QEMU
//! inherits, and the run directory (gdbstub socket, status file, initramfs) is removed as
//! soon as QEMU has opened what is in it, so a SIGKILL leaves at most a directory from
//! start-up, which the next start removes (`debris`).

use crate::debris;
use crate::gdb::{GdbClient, GdbError, StopReply};
use crate::launch::QemuConfig;
use crate::plugin_link::PluginLink;
use crate::ram::{RamError, RamFile, RamMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
    /// QEMU {end} during start-up{stderr}
    EarlyExit {
        /// How QEMU ended.
        end: QemuEnd,
        /// What QEMU printed.
        stderr: QemuSaid,
    },
    /// QEMU {end} while the guest ran (QEMU itself died: not a guest kernel panic){stderr}
    QemuDied {
        /// How QEMU ended.
        end: QemuEnd,
        /// What QEMU printed.
        stderr: QemuSaid,
    },
    /// the guest kernel panicked: {message}
    GuestPanic {
        /// The kernel's panic line from the console.
        message: String,
    },
    /// cannot create the guest RAM memfd
    Memfd(#[source] std::io::Error),
    /// cannot open the status file {0} that QEMU writes
    Status(PathBuf, #[source] std::io::Error),
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

/// How a QEMU process ended, in words: "exited with code N" or "was killed by signal N (NAME)".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuEnd(pub ExitStatus);

impl std::fmt::Display for QemuEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(c), _) => write!(f, "exited with code {c}"),
            (None, Some(s)) => write!(f, "was killed by signal {s} ({})", signal_name(s)),
            (None, None) => write!(f, "ended ({:?})", self.0),
        }
    }
}

/// QEMU's last lines on stderr, shown after "; QEMU said:" (nothing when it said nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuSaid(pub String);

impl std::fmt::Display for QemuSaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.trim() {
            "" => Ok(()),
            said => write!(f, "; QEMU said:\n{said}"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "another signal",
    }
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
    /// /init's status channel, opened before its name was removed.
    status: File,
    gdb: GdbClient,
    ram: Arc<RamFile>,
    vcpus: u32,
    console: Option<JoinHandle<()>>,
    err_thread: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The kernel's panic line, once the console showed one.
    panic: Arc<Mutex<Option<String>>>,
    started: Instant,
}

/// A private directory for sockets and files of one run (mode 0700), in
/// `$XDG_RUNTIME_DIR` (else the temporary directory), named with this process's pid and
/// start time. Run directories (and `/dev/shm` RAM files of older versions) whose owner
/// is gone are removed first.
pub fn run_dir() -> Result<tempfile::TempDir, MachineError> {
    sweep_debris();
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(&debris::Owner::me().run_dir_prefix())
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(runtime_base())
        .map_err(MachineError::RunDir)
}

/// Where run directories go: `$XDG_RUNTIME_DIR`, else the temporary directory.
pub fn runtime_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Remove what killed runs left: their run directories, and the `/dev/shm` RAM files
/// of older versions. Cheap (two directory listings); every start calls it.
pub fn sweep_debris() {
    debris::sweep_run_dirs(&runtime_base());
    debris::sweep_legacy_ram_files(Path::new("/dev/shm"));
}

/// Guest RAM: an anonymous memfd (no name anywhere in the file system). QEMU inherits
/// it and opens it as `/proc/self/fd/N`; we map it, and the plugin gets it over its socket.
fn ram_memfd() -> Result<OwnedFd, MachineError> {
    // SAFETY: memfd_create takes a NUL-terminated name (a C string literal) and flags;
    // it returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::memfd_create(c"ornament-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MachineError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Files of one run, chosen before QEMU starts.
#[derive(Debug)]
pub struct RunPaths {
    /// Private directory (removed on drop, and as soon as QEMU has started).
    pub dir: tempfile::TempDir,
    /// gdbstub socket.
    pub gdb_socket: PathBuf,
    /// /init's status channel.
    pub status: PathBuf,
    /// Guest RAM (a memfd, close-on-exec; QEMU gets it at spawn).
    pub ram: OwnedFd,
}

impl RunPaths {
    /// Create the private directory and name the files in it, and the RAM memfd.
    pub fn new() -> Result<Self, MachineError> {
        let dir = run_dir()?;
        let gdb_socket = dir.path().join("gdb.sock");
        let status = dir.path().join("status");
        let ram = ram_memfd()?;
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

/// The start of the kernel's panic message on the console.
const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// How long a panicked guest may go on (printing its trace, rebooting by `panic=`)
/// before QEMU is stopped: with `panic=0` the kernel would spin forever.
const PANIC_GRACE: Duration = Duration::from_secs(2);
/// Longest console line kept while looking for the panic line.
const LINE_MAX: usize = 512;

/// Finds the kernel's panic line in the console stream: a line that starts with
/// `Kernel panic - not syncing`, after the printk time stamp `[    1.234567] ` if any.
#[derive(Debug, Default)]
struct PanicScan {
    line: Vec<u8>,
}

impl PanicScan {
    /// Feed console bytes; the panic line (from the mark on, control bytes dropped) when
    /// one ends in them.
    fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        let mut found = None;
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                if found.is_none() {
                    found = Self::panic_line(&self.line);
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
        found
    }

    fn panic_line(line: &[u8]) -> Option<String> {
        let mut rest = line;
        if let Some(after) = rest.strip_prefix(b"[") {
            let end = after.iter().position(|&b| b == b']')?;
            if !after[..end]
                .iter()
                .all(|&b| b == b' ' || b == b'.' || b.is_ascii_digit())
            {
                return None;
            }
            rest = after[end + 1..].strip_prefix(b" ")?;
        }
        rest.starts_with(PANIC_MARK).then(|| {
            rest.iter()
                .filter(|b| (0x20..0x7f).contains(*b))
                .map(|&b| char::from(b))
                .collect()
        })
    }
}

/// What a console reader does besides keeping and forwarding the bytes: look for the
/// kernel's panic line and, once seen, stop QEMU after `PANIC_GRACE` (through a pidfd,
/// so a reaped and reused pid is never signalled).
struct PanicWatch {
    scan: PanicScan,
    seen: Arc<Mutex<Option<String>>>,
    qemu: Option<OwnedFd>,
}

fn spawn_reader<R: Read + Send + 'static>(
    mut r: R,
    mut sink: Option<ConsoleSink>,
    keep: Arc<Mutex<Vec<u8>>>,
    keep_max: usize,
    mut panic: Option<PanicWatch>,
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
                    if let Some(w) = panic.as_mut() {
                        if let Some(line) = w.scan.feed(&buf[..n]) {
                            let mut seen = w.seen.lock().unwrap_or_else(|p| p.into_inner());
                            if seen.is_none() {
                                tracing::debug!(%line, "guest kernel panic on the console");
                                *seen = Some(line);
                                if let Some(fd) = w.qemu.take() {
                                    std::thread::spawn(move || {
                                        std::thread::sleep(PANIC_GRACE);
                                        pidfd_kill(&fd);
                                    });
                                }
                            }
                        }
                    }
                    if keep_max > 0 {
                        let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                        k.extend_from_slice(&buf[..n]);
                        if k.len() > keep_max {
                            let cut = k.len() - keep_max;
                            k.drain(..cut);
                        }
                    }
                }
            }
        }
    })
}

/// A pidfd for our (not yet reaped) child, or None where the kernel has no pidfd_open.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(pid, 0) takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILL the process of a pidfd (nothing when it has already ended).
fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(fd, sig, NULL, 0) on a pidfd we own; the result is ignored
    // (ESRCH when the process has already exited).
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

impl QemuMachine {
    /// Start QEMU (stopped, `-S`), attach the gdbstub, map the RAM file.
    /// The guest has not run an instruction when this returns; call `resume`.
    /// With `plugin`, QEMU loads ornament's TCG plugin, which connects to that link
    /// before QEMU finishes starting; the link is accepted here.
    /// The run directory is gone when this returns (QEMU and we hold what was in it).
    /// Whatever fails after QEMU was spawned, a QEMU that died on its own is reported
    /// with its exit code or signal and its own message.
    pub fn start(
        mut cfg: QemuConfig,
        paths: RunPaths,
        console: Option<ConsoleSink>,
        mut plugin: Option<&mut PluginLink>,
    ) -> Result<Self, MachineError> {
        cfg.gdb_socket = paths.gdb_socket.clone();
        cfg.status_path = paths.status.clone();
        let ram_fd = paths.ram.as_raw_fd();
        cfg.ram_path = PathBuf::from(format!("/proc/self/fd/{ram_fd}"));
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
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe prctl, setpgid and fcntl on integers; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // QEMU dies with us, even if we are SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own process group: a Ctrl-C to ours is ours to handle (we stop
                // QEMU), not a second, racing death of QEMU.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The RAM memfd stays open across exec (QEMU opens /proc/self/fd/N).
                if libc::fcntl(ram_fd, libc::F_SETFD, 0) != 0 {
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
            .map(|e| spawn_reader(e, None, stderr.clone(), 64 * 1024, None));
        let console: Option<ConsoleSink> =
            console.map(|c| Box::new(CrlfToLf::new(c)) as ConsoleSink);
        let panic = Arc::new(Mutex::new(None));
        let watch = PanicWatch {
            scan: PanicScan::default(),
            seen: panic.clone(),
            qemu: pidfd_open(child.id()),
        };
        let console_thread = child
            .stdout
            .take()
            .map(|o| spawn_reader(o, console, Arc::new(Mutex::new(Vec::new())), 0, Some(watch)));
        let started = Instant::now();
        // From here on, any error must kill QEMU: wrap it first.
        let mut guard = ChildGuard(Some(child));
        let mut err_thread = err_thread;
        let attached = Self::attach(&mut guard, &paths, plugin.as_deref_mut(), started);
        let (gdb, ram) = match attached {
            Ok(v) => v,
            Err(e) => {
                // QEMU may have died on its own (a bad option, too much memory): that,
                // with its own words, is the story, not the gdbstub or plugin error it caused.
                let ended = guard.0.as_mut().and_then(|c| {
                    let deadline = Instant::now() + Duration::from_secs(1);
                    loop {
                        match c.try_wait() {
                            Ok(Some(st)) => break Some(st),
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(20))
                            }
                            _ => break None,
                        }
                    }
                });
                drop(guard);
                if let Some(t) = err_thread.take() {
                    let _ = t.join();
                }
                return Err(match (ended, e) {
                    (_, MachineError::EarlyExit { end, .. }) => MachineError::EarlyExit {
                        end,
                        stderr: QemuSaid(tail(&stderr)),
                    },
                    (Some(st), _) => MachineError::EarlyExit {
                        end: QemuEnd(st),
                        stderr: QemuSaid(tail(&stderr)),
                    },
                    (None, MachineError::Plugin { source, .. }) => MachineError::Plugin {
                        source,
                        stderr: tail(&stderr),
                    },
                    (None, e) => e,
                });
            }
        };
        // QEMU has opened its serial file and read the kernel and initramfs; the gdbstub
        // is connected. Keep the status file open and remove the run directory.
        let status =
            File::open(&paths.status).map_err(|e| MachineError::Status(paths.status.clone(), e))?;
        drop(paths);
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
        let mut gdb = gdb;
        let vcpus = u32::try_from(gdb.vcpus()?.len()).unwrap_or(0);
        Ok(Self {
            child: guard.0.take(),
            status,
            gdb,
            ram: Arc::new(ram),
            vcpus,
            console: console_thread,
            err_thread,
            stderr,
            panic,
            started,
        })
    }

    /// The part of `start` after the spawn: the plugin's connection, the gdbstub (whose
    /// socket is unlinked once connected), and guest RAM.
    fn attach(
        guard: &mut ChildGuard,
        paths: &RunPaths,
        plugin: Option<&mut PluginLink>,
        started: Instant,
    ) -> Result<(GdbClient, RamFile), MachineError> {
        let exited = |guard: &mut ChildGuard| {
            guard
                .0
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|st| MachineError::EarlyExit {
                    end: QemuEnd(st),
                    stderr: QemuSaid::default(),
                })
        };
        if let Some(link) = plugin {
            // QEMU installs plugins before it opens the gdbstub, and ours waits for us.
            // Poll, so that a QEMU that could not load the plugin is reported at once.
            let accepted = loop {
                match link.accept(Duration::from_millis(200)) {
                    Err(crate::plugin_link::PluginLinkError::AcceptTimeout(_))
                        if started.elapsed() < Duration::from_secs(30) =>
                    {
                        if let Some(e) = exited(guard) {
                            return Err(e);
                        }
                    }
                    other => break other,
                }
            };
            accepted.map_err(|source| MachineError::Plugin {
                source,
                stderr: String::new(),
            })?;
        }
        let mut gdb = loop {
            if let Some(e) = exited(guard) {
                return Err(e);
            }
            match GdbClient::connect(&paths.gdb_socket, Duration::from_millis(200)) {
                Ok(g) => break g,
                Err(GdbError::Connect { .. }) if started.elapsed() < Duration::from_secs(20) => {}
                Err(e) => return Err(e.into()),
            }
        };
        // Connected: nothing needs the socket's name any more.
        let _ = std::fs::remove_file(&paths.gdb_socket);
        let mtree = gdb.monitor("info mtree -f")?;
        let map = RamMap::from_mtree(&mtree, RAM_REGION)?;
        let file = File::from(paths.ram.try_clone().map_err(MachineError::Memfd)?);
        let ram = RamFile::from_file(file, Path::new("memfd:ornament-ram"), map)?;
        Ok((gdb, ram))
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
                // A Ctrl-C that also reached the guest's end is still a Ctrl-C.
                Ok(true) if stop.load(Ordering::Relaxed) => {
                    self.kill();
                    return Err(MachineError::Interrupted);
                }
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
        let mut killed_here = false;
        let status = match self.child.take() {
            Some(mut c) => {
                // QEMU exits on its own after power-off; give it a moment.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match c.try_wait().map_err(MachineError::Wait)? {
                        Some(st) => break Some(st),
                        None if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        None => {
                            let _ = c.kill();
                            killed_here = true;
                            break Some(c.wait().map_err(MachineError::Wait)?);
                        }
                    }
                }
            }
            None => None,
        };
        if let Some(t) = self.console.take() {
            let _ = t.join();
        }
        if let Some(t) = self.err_thread.take() {
            let _ = t.join();
        }
        if let Some(message) = self.panic_line() {
            return Err(MachineError::GuestPanic { message });
        }
        if let Some(st) = status.filter(|st| st.signal().is_some() && !killed_here) {
            return Err(MachineError::QemuDied {
                end: QemuEnd(st),
                stderr: QemuSaid(tail(&self.stderr)),
            });
        }
        let guest_status = read_tail(&mut self.status, STATUS_TAIL)
            .ok()
            .and_then(|s| parse_status(&s));
        Ok(RunOutcome {
            guest_status,
            qemu_code: status.and_then(|st| st.code()),
            qemu_stderr: tail(&self.stderr),
        })
    }

    /// The kernel's panic line, if the console has shown one.
    pub fn panic_line(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why the guest ended early, when it has: a kernel panic, or QEMU's own death (with
    /// its exit code or signal and message). QEMU gets up to a second to finish exiting
    /// (its gdbstub closes first). None while QEMU runs on, or if it exited cleanly
    /// without a panic on the console.
    pub fn early_end(&mut self) -> Option<MachineError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let st = loop {
            if let Some(message) = self.panic_line() {
                return Some(MachineError::GuestPanic { message });
            }
            match self.child.as_mut()?.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        };
        if let Some(t) = self.err_thread.take() {
            let _ = t.join();
        }
        (!st.success()).then(|| MachineError::QemuDied {
            end: QemuEnd(st),
            stderr: QemuSaid(tail(&self.stderr)),
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

/// Most of the status channel read at the end (the guest can write any amount to it).
const STATUS_TAIL: u64 = 64 * 1024;

/// The last `max` bytes of a file, as text.
fn read_tail(f: &mut File, max: u64) -> std::io::Result<String> {
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        self.kill();
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

/// Parse /init's status channel: the last `ornament-exit N` line.
pub fn parse_status(text: &str) -> Option<i32> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("ornament-exit "))
        .and_then(|v| v.trim().parse().ok())
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
    fn status_lines() {
        assert_eq!(parse_status("ornament-exit 7\n"), Some(7));
        assert_eq!(parse_status("noise\r\nornament-exit 137\r\n"), Some(137));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("ornament-exit x"), None);
    }

    #[test]
    fn panic_line_is_found_in_any_chunking() {
        let console = b"[    1.000000] ok\r\n[    5.174918] Kernel panic - not syncing: sysrq triggered crash\r\nCPU: 0\r\n";
        for cut in 0..console.len() {
            let mut scan = PanicScan::default();
            let found = [scan.feed(&console[..cut]), scan.feed(&console[cut..])];
            assert_eq!(
                found.into_iter().flatten().collect::<Vec<_>>(),
                vec!["Kernel panic - not syncing: sysrq triggered crash".to_owned()],
                "cut at {cut}"
            );
        }
        let mut scan = PanicScan::default();
        assert_eq!(
            scan.feed(b"Kernel panic - not syncing: Attempted to kill init!\n"),
            Some("Kernel panic - not syncing: Attempted to kill init!".into())
        );
        // Not at the start of a line (after a time stamp): a command's output, not the kernel.
        assert_eq!(scan.feed(b"grep: Kernel panic - not syncing\n"), None);
        assert_eq!(scan.feed(b"[x] Kernel panic - not syncing\n"), None);
        // The end-of-trace line does not count again.
        assert_eq!(
            scan.feed(b"---[ end Kernel panic - not syncing: x ]---\n"),
            None
        );
    }

    #[test]
    fn qemu_end_in_words() {
        assert_eq!(
            QemuEnd(ExitStatus::from_raw(1 << 8)).to_string(),
            "exited with code 1"
        );
        assert_eq!(
            QemuEnd(ExitStatus::from_raw(9)).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(QemuSaid(" \n".into()).to_string(), "");
        assert_eq!(QemuSaid("no".into()).to_string(), "; QEMU said:\nno");
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
