//! One QEMU guest from start to power-off: process, console, RAM file (handed to the TCG
//! plugin once mapped), gdbstub, and the cleanup of all of them on every exit path.
//!
//! Nothing of a run keeps a name once QEMU has started: guest RAM is a memfd that QEMU
//! inherits, and the run directory (gdbstub socket, status file, initramfs) is removed as
//! soon as QEMU has opened what is in it, so a SIGKILL leaves at most a directory from
//! start-up, which the next start removes (`debris`).

mod console;
mod end;
mod run_paths;

use crate::gdb::{GdbClient, GdbError, StopReply};
use crate::launch::QemuConfig;
use crate::plugin_link::PluginLink;
use crate::ram::{RamError, RamFile, RamMap};
pub use console::CrlfToLf;
use console::{pidfd_open, spawn_reader, PanicScan, PanicWatch};
use end::{read_tail, STATUS_TAIL};
pub use end::{QemuEnd, QemuSaid};
pub use run_paths::{run_dir, runtime_base, sweep_debris, RunPaths};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
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

    /// The wall-clock time [`QemuMachine::elapsed`] counts from.
    pub fn clock_origin(&self) -> std::time::SystemTime {
        ornament_engine::engine::wall_clock_at(self.started)
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
            .and_then(|s| ornament_engine::report::last_exit_report(s.as_bytes()));
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
