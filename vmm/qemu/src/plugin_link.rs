//! \[1\] The host end of the TCG plugin's socket: probe set out, hits in, answers out.
//!
//! ```text
//! PluginLink::listen(path)          bind the unix socket; give QEMU `-plugin ...,sock=path`
//!   .arm(..) / .disarm(..)          before accept: the initial probe set
//!   .accept(timeout)                plugin's Hello -> initial Arm records -> Go (guest starts)
//!   .send_ram(fd, regions, paging)  guest RAM file (SCM_RIGHTS) for the plugin's own reads
//!   .next_hit(timeout)              wire hit records -> PluginHit { ProbeHit, memory reads }
//!   .answer(&hit, action)           resume a held vCPU (after applying a deny, see below)
//!   .arm(..) / .disarm(..)          at any time while the guest runs
//! ```
//!
//! Denying a syscall (QEMU's plugin API v4 cannot write registers or memory): arm a held probe
//! at `do_syscall_64`'s first instruction with [`DenyConfig::entry_spec`]. For a hit answered
//! with [`Action::DenySyscall`], while that vCPU is held, the link writes through the shared
//! guest RAM ([`GuestRam`]):
//!
//! 1. `pt_regs->ax = -errno` (8 bytes at `rdi + pt_regs_ax_offset`; `rdi` is `do_syscall_64`'s
//!    `regs` argument; `ax` is what the syscall path returns to user space);
//! 2. atomically sets bit `syscall_emu_bit` (`SYSCALL_WORK_BIT_SYSCALL_EMU`) in the current
//!    task's `thread_info.syscall_work` (`task + syscall_work_offset`, the task read from the
//!    per-CPU `current_task` in the probe callback).
//!
//! Then `syscall_enter_from_user_mode` sees `SYSCALL_EMU`, calls `ptrace_report_syscall_entry`
//! (which returns 0 at once for an untraced task) and returns -1, so `do_syscall_64` runs no
//! syscall and leaves `ax` alone (6.1: `nr == -1` skips both the table call and the
//! `-ENOSYS` store). The link then enables a held internal probe at
//! `syscall_exit_to_user_mode` and, when the same task reaches it, clears the bit again (unless
//! it was already set before, by a real `PTRACE_SYSEMU` tracer) and disables the probe once no
//! clear is pending. Addresses are translated with a 4/5-level page walk from the hit's `cr3`.
//! Every offset comes from the caller (a kernel profile), none is a constant here.

use ornament_engine::wire::{
    self, AnswerRecord, ArmRecord, DisarmRecord, ErrorRecord, HitRecord, Msg, ProbeSpec, RamPaging,
    RamRecord, RamRegion, RegMask, ARM_ENABLED, MAX_MEM_READS,
};
use ornament_engine::{Action, Gpa, Gva, MemError, PhysMemory, ProbeHit, ProbeId};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Probe ids from here up are the link's own (internal probes); callers must not use them.
pub const RESERVED_PROBE_IDS: u32 = 0xffff_ff00;
/// Receive buffer for the plugin's socket.
const RX_BUFFER_BYTES: usize = 1 << 16;
/// Most records handed from the receive thread to the caller at once.
const RX_BATCH: usize = 4096;
/// The internal probe at `syscall_exit_to_user_mode` used to undo a deny.
pub const DENY_EXIT_PROBE: ProbeId = ProbeId(0xffff_ff01);

/// Why a plugin-link call failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PluginLinkError {
    /// cannot create the plugin socket {0:?}
    Bind(PathBuf, #[source] std::io::Error),
    /// accepting the plugin's connection failed
    Accept(#[source] std::io::Error),
    /// the plugin did not connect within {0:?}
    AcceptTimeout(Duration),
    /// handshake with the plugin failed
    Handshake(#[source] std::io::Error),
    /// the plugin speaks wire version {0}, this host speaks another
    Version(u32),
    /// the plugin sent an undecodable record
    Wire(#[from] wire::WireError),
    /// writing to the plugin failed
    Send(#[source] std::io::Error),
    /// the plugin's connection is closed
    Closed,
    /// the link is not connected yet
    NotConnected,
    /// already connected
    AlreadyConnected,
    /// probe id {0:?} is reserved for the link itself
    ReservedProbe(ProbeId),
    /// probe {0:?} is not armed
    NoSuchProbe(ProbeId),
    /// the hit was not held; there is nothing to answer
    NotHeld,
    /// denying syscalls was not enabled on this link (`enable_deny`)
    DenyNotEnabled,
    /// errno {0} is outside 1..=4095
    BadErrno(i32),
    /// the hit lacks {0}, which a deny needs (use DenyConfig::entry_spec)
    DenyMissing(&'static str),
    /// guest-virtual address {0} is not mapped in the hit's page tables
    Translate(Gva),
    /// guest memory access failed
    Mem(#[from] MemError),
}

/// Guest RAM the link may write while a vCPU is held: plain writes plus atomic bit updates
/// (on QEMU's shared RAM file, host atomics are coherent with the guest's locked operations).
pub trait GuestRam: PhysMemory {
    /// Atomically OR `bits` into the aligned `u64` at `gpa`; returns the old value.
    fn fetch_or_u64(&self, gpa: Gpa, bits: u64) -> Result<u64, MemError>;
    /// Atomically AND `mask` into the aligned `u64` at `gpa`; returns the old value.
    fn fetch_and_u64(&self, gpa: Gpa, mask: u64) -> Result<u64, MemError>;
}

/// Kernel facts a deny needs, all from the guest's profile: the engine seam's
/// [`DenyOffsets`], with the probe specs of the deny path
/// ([`DenyOffsets::entry_spec`], [`DenyOffsets::exit_spec`]).
pub use ornament_engine::DenyOffsets as DenyConfig;

/// A hit as the plugin reported it: the engine's [`ProbeHit`] plus the probe's memory reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginHit {
    /// The engine-neutral hit (`seq` is the link's delivery order).
    pub hit: ProbeHit,
    /// Memory read `i` of the probe's spec, when it was asked for and succeeded.
    pub mem: [Option<u64>; MAX_MEM_READS],
    /// The plugin's per-vCPU sequence number (gaps would mean lost records).
    pub vcpu_seq: u64,
}

/// Something the plugin reported.
// Hits dominate the traffic; they are not boxed to save an allocation per hit.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A probe hit.
    Hit(PluginHit),
    /// A vCPU started; `resolved` are the registers the plugin found by name.
    VcpuInit {
        /// vCPU index.
        vcpu: u32,
        /// Registers QEMU offered.
        resolved: RegMask,
    },
    /// The plugin survived an error (a hold timeout, a register it could not read...).
    PluginError(ErrorRecord),
    /// QEMU is exiting; `hits` is the plugin's total.
    Bye {
        /// Hits the plugin reported over the session.
        hits: u64,
        /// Time the plugin spent in those hits' callbacks, nanoseconds.
        callback_ns: u64,
        /// Of which in memory reads.
        mem_ns: u64,
        /// The longest single callback.
        max_callback_ns: u64,
        /// All the time the vCPUs spent in those callbacks, sending and held included.
        stall_ns: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    addr: Gva,
    spec: ProbeSpec,
    enabled: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingClear {
    task: u64,
    work_gpa: Gpa,
    was_set: bool,
}

struct DenyState {
    cfg: DenyConfig,
    ram: Arc<dyn GuestRam>,
    pending: Vec<PendingClear>,
}

impl std::fmt::Debug for DenyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenyState")
            .field("cfg", &self.cfg)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

// Records move by value once, inside batches; boxing hits would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Incoming {
    Msg(Msg),
    Bad(wire::WireError),
    Closed,
}

/// Counters of one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Hits delivered to the caller.
    pub hits: u64,
    /// Hits of the link's own probes (deny bookkeeping), not delivered.
    pub internal_hits: u64,
    /// Error records from the plugin.
    pub plugin_errors: u64,
    /// Syscalls denied.
    pub denied: u64,
}

/// The host end of one plugin session.
#[derive(Debug)]
pub struct PluginLink {
    path: PathBuf,
    listener: Option<UnixListener>,
    writer: Option<UnixStream>,
    rx: Option<Receiver<Vec<Incoming>>>,
    armed: HashMap<ProbeId, Armed>,
    deny: Option<DenyState>,
    /// Plugin CLOCK_MONOTONIC at Hello, and our elapsed time then.
    /// `CLOCK_MONOTONIC` at the link's start: hits' `time_ns` count from it.
    start_mono: u64,
    seq: u64,
    /// Records received but not yet handled, in order.
    inbox: VecDeque<Incoming>,
    closed: bool,
    stats: LinkStats,
    errors: Vec<ErrorRecord>,
}

impl PluginLink {
    /// Bind a unix socket at `path` (an old socket file there is removed first).
    pub fn listen(path: &Path) -> Result<PluginLink, PluginLinkError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|e| PluginLinkError::Bind(path.to_owned(), e))?;
        let mut l = PluginLink::listen_none();
        l.path = path.to_owned();
        l.listener = Some(listener);
        Ok(l)
    }

    /// Wrap an already connected stream (the plugin end of a socketpair in tests, or a
    /// connection accepted elsewhere); then call [`PluginLink::accept`] to run the handshake.
    pub fn from_stream(stream: UnixStream) -> PluginLink {
        let mut l = PluginLink::listen_none();
        l.writer = Some(stream);
        l
    }

    fn listen_none() -> PluginLink {
        PluginLink {
            path: PathBuf::new(),
            listener: None,
            writer: None,
            rx: None,
            armed: HashMap::new(),
            deny: None,
            start_mono: ornament_engine::clock::monotonic_ns(),
            seq: 0,
            inbox: VecDeque::new(),
            closed: false,
            stats: LinkStats::default(),
            errors: Vec::new(),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The QEMU arguments that load `plugin_so` connected to this link:
    /// `-plugin <so>,sock=<path>[,<extra>...]` (two argv words). `extra` are the plugin's other
    /// `key=value` options: `hold_timeout_ms`, `flush_us`, `batch_bytes`, `connect_timeout_ms`,
    /// `verbose=on` (its log goes to QEMU's `-d plugin`). QEMU also needs `-accel tcg` (plugins
    /// do not run under KVM) and, for [`PluginLink::enable_deny`], guest RAM in a shared file
    /// (`-object memory-backend-file,...,share=on -machine memory-backend=...`).
    pub fn qemu_args(&self, plugin_so: &Path, extra: &[&str]) -> [String; 2] {
        let mut arg = format!("{},sock={}", plugin_so.display(), self.path.display());
        for e in extra {
            arg.push(',');
            arg.push_str(e);
        }
        ["-plugin".to_owned(), arg]
    }

    /// Wait up to `timeout` for the plugin, take its Hello, send the probes armed so far and
    /// `Go` (QEMU then starts the guest).
    pub fn accept(&mut self, timeout: Duration) -> Result<(), PluginLinkError> {
        if self.rx.is_some() {
            return Err(PluginLinkError::AlreadyConnected);
        }
        let stream = match self.writer.take() {
            Some(s) => s,
            None => {
                let s = self.accept_stream(timeout)?;
                // Connected: nothing needs the socket's name any more (a SIGKILL from
                // here on leaves no socket file).
                let _ = std::fs::remove_file(&self.path);
                s
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(PluginLinkError::Handshake)?;
        // Buffered: the plugin writes hits in batches, and one read(2) per record would cost
        // more than the record.
        let mut rd = BufReader::with_capacity(
            RX_BUFFER_BYTES,
            stream.try_clone().map_err(PluginLinkError::Handshake)?,
        );
        let mut buf = Vec::new();
        let hello = match read_record(&mut rd, &mut buf) {
            Ok(Incoming::Msg(Msg::Hello(h))) => h,
            Ok(Incoming::Bad(e)) => return Err(PluginLinkError::Wire(e)),
            Ok(_) => return Err(PluginLinkError::Closed),
            Err(e) => return Err(PluginLinkError::Handshake(e)),
        };
        if hello.version != wire::WIRE_VERSION {
            return Err(PluginLinkError::Version(hello.version));
        }
        stream
            .set_read_timeout(None)
            .map_err(PluginLinkError::Handshake)?;
        let mut out = Vec::new();
        let mut ids: Vec<&ProbeId> = self.armed.keys().collect();
        ids.sort();
        for id in ids {
            let a = &self.armed[id];
            arm_msg(*id, a).encode(&mut out);
        }
        Msg::Go.encode(&mut out);
        let mut w = stream;
        w.write_all(&out).map_err(PluginLinkError::Send)?;
        self.writer = Some(w);
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("plugin-link-rx".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(wire::MAX_RECORD_LEN);
                loop {
                    // Everything already buffered goes over the channel as one batch.
                    let mut batch = Vec::new();
                    let mut stop = false;
                    while !stop {
                        let r = match read_record(&mut rd, &mut buf) {
                            Ok(i) => i,
                            Err(_) => Incoming::Closed,
                        };
                        stop = !matches!(r, Incoming::Msg(_));
                        batch.push(r);
                        if rd.buffer().is_empty() || batch.len() >= RX_BATCH {
                            break;
                        }
                    }
                    if tx.send(batch).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(PluginLinkError::Handshake)?;
        self.rx = Some(rx);
        tracing::debug!(
            pid = hello.pid,
            probes = self.armed.len(),
            "plugin connected"
        );
        Ok(())
    }

    fn accept_stream(&mut self, timeout: Duration) -> Result<UnixStream, PluginLinkError> {
        let l = self
            .listener
            .as_ref()
            .ok_or(PluginLinkError::NotConnected)?;
        l.set_nonblocking(true).map_err(PluginLinkError::Accept)?;
        let deadline = Instant::now() + timeout;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(PluginLinkError::Accept)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(PluginLinkError::AcceptTimeout(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(PluginLinkError::Accept(e)),
            }
        }
    }

    fn send(&mut self, m: &Msg) -> Result<(), PluginLinkError> {
        let w = self.writer.as_mut().ok_or(PluginLinkError::NotConnected)?;
        w.write_all(&m.to_bytes()).map_err(PluginLinkError::Send)
    }

    fn connected(&self) -> bool {
        self.rx.is_some()
    }

    /// Give the plugin guest RAM: `fd` is QEMU's RAM file (sent as `SCM_RIGHTS` with the
    /// record), `regions` map guest-physical addresses into it. From then on the plugin reads
    /// guest memory by walking the page tables itself instead of through QEMU. Only after
    /// [`PluginLink::accept`].
    pub fn send_ram(
        &mut self,
        fd: BorrowedFd<'_>,
        regions: &[RamRegion],
        paging: RamPaging,
    ) -> Result<(), PluginLinkError> {
        if !self.connected() {
            return Err(PluginLinkError::NotConnected);
        }
        let rec = RamRecord {
            paging,
            regions: regions.to_vec(),
        };
        rec.validate()?;
        let bytes = Msg::Ram(rec).to_bytes();
        let w = self.writer.as_mut().ok_or(PluginLinkError::NotConnected)?;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let n = w
            .send_with_fd(&bytes[..], fd.as_raw_fd())
            .map_err(|e| PluginLinkError::Send(std::io::Error::from_raw_os_error(e.errno())))?;
        // The descriptor went with the first bytes; a short send leaves only plain bytes.
        w.write_all(bytes.get(n..).unwrap_or_default())
            .map_err(PluginLinkError::Send)?;
        tracing::debug!(
            regions = regions.len(),
            ?paging,
            "guest RAM sent to the plugin"
        );
        Ok(())
    }

    /// Arm (or re-arm with a new spec) probe `probe` at `addr`; before `accept` it joins the
    /// initial set. An address the plugin has not seen before costs one retranslation of all
    /// guest code (see the plugin's documentation); re-arming a known address is a flag.
    pub fn arm(
        &mut self,
        probe: ProbeId,
        addr: Gva,
        spec: ProbeSpec,
    ) -> Result<(), PluginLinkError> {
        if probe.0 >= RESERVED_PROBE_IDS {
            return Err(PluginLinkError::ReservedProbe(probe));
        }
        self.arm_inner(probe, addr, spec, true)
    }

    /// Send `probe` to the plugin as a disabled candidate: its address gets a callback when
    /// translated (so a later `arm` needs no retranslation) but reports nothing.
    pub fn add_candidate(
        &mut self,
        probe: ProbeId,
        addr: Gva,
        spec: ProbeSpec,
    ) -> Result<(), PluginLinkError> {
        if probe.0 >= RESERVED_PROBE_IDS {
            return Err(PluginLinkError::ReservedProbe(probe));
        }
        self.arm_inner(probe, addr, spec, false)
    }

    fn arm_inner(
        &mut self,
        probe: ProbeId,
        addr: Gva,
        spec: ProbeSpec,
        enabled: bool,
    ) -> Result<(), PluginLinkError> {
        let a = Armed {
            addr,
            spec,
            enabled,
        };
        self.armed.insert(probe, a);
        if self.connected() {
            self.send(&arm_msg(probe, &a))?;
        }
        Ok(())
    }

    /// Disarm a probe; its callback stays in translated code and does nothing.
    pub fn disarm(&mut self, probe: ProbeId) -> Result<(), PluginLinkError> {
        let a = self
            .armed
            .get_mut(&probe)
            .ok_or(PluginLinkError::NoSuchProbe(probe))?;
        a.enabled = false;
        if self.connected() {
            self.send(&Msg::Disarm(DisarmRecord { probe: probe.0 }))?;
        }
        Ok(())
    }

    /// Close one task's part of probe `probe`'s window (it will never make the closing hit).
    pub fn close_window(&mut self, probe: ProbeId) -> Result<(), PluginLinkError> {
        if !self.armed.contains_key(&probe) {
            return Err(PluginLinkError::NoSuchProbe(probe));
        }
        if self.connected() {
            self.send(&Msg::CloseWindow(DisarmRecord { probe: probe.0 }))?;
        }
        Ok(())
    }

    /// Allow [`Action::DenySyscall`] answers: `ram` is the guest's shared RAM. Sends the
    /// internal `syscall_exit_to_user_mode` probe as a disabled candidate.
    pub fn enable_deny(
        &mut self,
        cfg: DenyConfig,
        ram: Arc<dyn GuestRam>,
    ) -> Result<(), PluginLinkError> {
        self.deny = Some(DenyState {
            cfg,
            ram,
            pending: Vec::new(),
        });
        self.arm_inner(DENY_EXIT_PROBE, cfg.syscall_exit, cfg.exit_spec(), false)
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Error records the plugin sent (hold timeouts, unreadable registers, caught panics).
    pub fn plugin_errors(&self) -> &[ErrorRecord] {
        &self.errors
    }

    /// Wait up to `timeout` for the next event from the plugin. `Ok(None)`: nothing came.
    /// `Err(Closed)`: the plugin is gone (QEMU exited).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<LinkEvent>, PluginLinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.closed {
                return Err(PluginLinkError::Closed);
            }
            let inc = match self.inbox.pop_front() {
                Some(i) => i,
                None => {
                    let rx = self.rx.as_ref().ok_or(PluginLinkError::NotConnected)?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(batch) => {
                            self.inbox.extend(batch);
                            continue;
                        }
                        Err(RecvTimeoutError::Timeout) => return Ok(None),
                        Err(RecvTimeoutError::Disconnected) => Incoming::Closed,
                    }
                }
            };
            match inc {
                Incoming::Closed => {
                    self.closed = true;
                    return Err(PluginLinkError::Closed);
                }
                Incoming::Bad(e) => {
                    self.closed = true;
                    return Err(PluginLinkError::Wire(e));
                }
                Incoming::Msg(m) => {
                    if let Some(ev) = self.handle(m)? {
                        return Ok(Some(ev));
                    }
                }
            }
        }
    }

    /// Wait up to `timeout` for the next hit; other events are counted (errors are kept in
    /// [`PluginLink::plugin_errors`]) and skipped. `Ok(None)`: no hit within `timeout`.
    pub fn next_hit(&mut self, timeout: Duration) -> Result<Option<PluginHit>, PluginLinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(LinkEvent::Hit(h)) => return Ok(Some(h)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    fn handle(&mut self, m: Msg) -> Result<Option<LinkEvent>, PluginLinkError> {
        Ok(match m {
            Msg::Hit(h) => {
                if h.probe == DENY_EXIT_PROBE.0 {
                    self.stats.internal_hits += 1;
                    self.on_exit_hit(&h)?;
                    None
                } else {
                    Some(LinkEvent::Hit(self.make_plugin_hit(&h)))
                }
            }
            Msg::VcpuInit(v) => Some(LinkEvent::VcpuInit {
                vcpu: v.vcpu,
                resolved: v.resolved,
            }),
            Msg::Error(e) => {
                self.stats.plugin_errors += 1;
                self.errors.push(e);
                tracing::warn!(
                    code = e.code,
                    vcpu = e.vcpu,
                    probe = e.probe,
                    detail = e.detail,
                    "plugin error"
                );
                Some(LinkEvent::PluginError(e))
            }
            Msg::Bye(b) => {
                let per = |ns: u64| ns.checked_div(b.hits).unwrap_or(0);
                tracing::debug!(
                    hits = b.hits,
                    callback_ns_per_hit = per(b.callback_ns),
                    mem_ns_per_hit = per(b.mem_ns),
                    max_callback_ns = b.max_callback_ns,
                    stall_ns_per_hit = per(b.stall_ns),
                    stall_ns = b.stall_ns,
                    "plugin done"
                );
                Some(LinkEvent::Bye {
                    hits: b.hits,
                    callback_ns: b.callback_ns,
                    mem_ns: b.mem_ns,
                    max_callback_ns: b.max_callback_ns,
                    stall_ns: b.stall_ns,
                })
            }
            _ => None,
        })
    }

    fn make_plugin_hit(&mut self, h: &HitRecord) -> PluginHit {
        self.seq += 1;
        self.stats.hits += 1;
        // The plugin reads the same host clock in QEMU's process.
        let time_ns = h.mono_ns.saturating_sub(self.start_mono);
        let mut mem = [None; MAX_MEM_READS];
        for (i, m) in mem.iter_mut().enumerate() {
            *m = h.mem(i);
        }
        PluginHit {
            hit: ProbeHit {
                probe: ProbeId(h.probe),
                vcpu: h.vcpu,
                seq: self.seq,
                time_ns,
                regs: h.to_regs(),
                held: h.held(),
                mem,
                bytes: h.bytes.clone(),
            },
            mem,
            vcpu_seq: h.seq,
        }
    }

    fn resume(&mut self, vcpu: u32, vcpu_seq: u64, action: u32) -> Result<(), PluginLinkError> {
        self.send(&Msg::Answer(AnswerRecord {
            vcpu,
            action,
            seq: vcpu_seq,
        }))
    }

    /// Answer a held hit. `Continue` resumes the vCPU. `PauseGuest` also only resumes this
    /// vCPU: stopping the guest is the engine's (gdbstub's) job, done before answering.
    /// `DenySyscall` (on a probe armed with [`DenyConfig::entry_spec`]) writes the deny into
    /// guest memory as the module documentation says, then resumes.
    pub fn answer(&mut self, hit: &PluginHit, action: Action) -> Result<(), PluginLinkError> {
        if !hit.hit.held {
            return Err(PluginLinkError::NotHeld);
        }
        let code = match action {
            Action::Continue => 0,
            Action::PauseGuest => 1,
            Action::DenySyscall { errno } => {
                self.apply_deny(hit, errno)?;
                2
            }
        };
        self.resume(hit.hit.vcpu, hit.vcpu_seq, code)
    }

    fn apply_deny(&mut self, hit: &PluginHit, errno: i32) -> Result<(), PluginLinkError> {
        if !(1..=4095).contains(&errno) {
            return Err(PluginLinkError::BadErrno(errno));
        }
        let d = self.deny.as_mut().ok_or(PluginLinkError::DenyNotEnabled)?;
        let task = hit.mem[0].ok_or(PluginLinkError::DenyMissing(
            "the current task (memory read 0)",
        ))?;
        let r = &hit.hit.regs;
        if r.cr3 == 0 || r.rdi == 0 {
            return Err(PluginLinkError::DenyMissing("cr3 and rdi"));
        }
        let la57 = r.cr4 & ornament_engine::paging::CR4_LA57 != 0;
        let mem: &dyn PhysMemory = &*d.ram;
        let regs_ax = Gva(r.rdi).wrapping_add(d.cfg.pt_regs_ax_offset);
        let ax_gpa =
            translate(mem, r.cr3, la57, regs_ax).ok_or(PluginLinkError::Translate(regs_ax))?;
        let work = Gva(task).wrapping_add(d.cfg.syscall_work_offset);
        let work_gpa = translate(mem, r.cr3, la57, work).ok_or(PluginLinkError::Translate(work))?;
        let neg = i64::from(errno).wrapping_neg().to_le_bytes();
        d.ram.write_phys(ax_gpa, &neg)?;
        let bit = 1u64 << (d.cfg.syscall_emu_bit % 64);
        let old = d.ram.fetch_or_u64(work_gpa, bit)?;
        d.pending.push(PendingClear {
            task,
            work_gpa,
            was_set: old & bit != 0,
        });
        let first = d.pending.len() == 1;
        self.stats.denied += 1;
        if first {
            if let Some(a) = self.armed.get_mut(&DENY_EXIT_PROBE) {
                a.enabled = true;
                let a = *a;
                self.send(&arm_msg(DENY_EXIT_PROBE, &a))?;
            }
        }
        Ok(())
    }

    fn on_exit_hit(&mut self, h: &HitRecord) -> Result<(), PluginLinkError> {
        let mut disarm = false;
        if let (Some(d), Some(task)) = (self.deny.as_mut(), h.mem(0)) {
            let bit = 1u64 << (d.cfg.syscall_emu_bit % 64);
            if let Some(pos) = d.pending.iter().position(|p| p.task == task) {
                let p = d.pending.remove(pos);
                if !p.was_set {
                    d.ram.fetch_and_u64(p.work_gpa, !bit)?;
                }
                disarm = d.pending.is_empty();
            }
        }
        if disarm {
            if let Some(a) = self.armed.get_mut(&DENY_EXIT_PROBE) {
                a.enabled = false;
            }
            self.send(&Msg::Disarm(DisarmRecord {
                probe: DENY_EXIT_PROBE.0,
            }))?;
        }
        if h.held() {
            self.resume(h.vcpu, h.seq, 0)?;
        }
        Ok(())
    }
}

impl Drop for PluginLink {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl PluginLink {
    /// The wall-clock time the hits' `time_ns` count from.
    pub fn clock_origin(&self) -> std::time::SystemTime {
        ornament_engine::clock::wall_clock_at_monotonic(self.start_mono)
    }
}

fn arm_msg(probe: ProbeId, a: &Armed) -> Msg {
    Msg::Arm(ArmRecord {
        probe: probe.0,
        addr: a.addr.raw(),
        flags: if a.enabled { ARM_ENABLED } else { 0 },
        spec: a.spec,
    })
}

fn read_record(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<Incoming> {
    buf.resize(wire::HEADER_LEN, 0);
    match r.read_exact(buf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Incoming::Closed),
        Err(e) => return Err(e),
    }
    let h = match wire::decode_header(buf) {
        Ok(h) => h,
        Err(e) => return Ok(Incoming::Bad(e)),
    };
    buf.resize(h.len, 0);
    r.read_exact(&mut buf[wire::HEADER_LEN..])?;
    Ok(match wire::decode(buf) {
        Ok((m, _)) => Incoming::Msg(m),
        Err(e) => Incoming::Bad(e),
    })
}

/// The page walk of the deny path (the link translates two kernel addresses while a vCPU is
/// held); `introspect` has the general one.
pub use ornament_engine::paging::translate;

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::wire::Reg;
    use ornament_engine::wire::{put_hit_head, put_hit_value, Hello, HIT_HELD};
    use ornament_engine::SliceMemory;

    impl GuestRam for SliceMemory {
        fn fetch_or_u64(&self, gpa: Gpa, bits: u64) -> Result<u64, MemError> {
            let mut b = [0u8; 8];
            self.read_phys(gpa, &mut b)?;
            let old = u64::from_le_bytes(b);
            self.write_phys(gpa, &(old | bits).to_le_bytes())?;
            Ok(old)
        }
        fn fetch_and_u64(&self, gpa: Gpa, mask: u64) -> Result<u64, MemError> {
            let mut b = [0u8; 8];
            self.read_phys(gpa, &mut b)?;
            let old = u64::from_le_bytes(b);
            self.write_phys(gpa, &(old & mask).to_le_bytes())?;
            Ok(old)
        }
    }

    /// The plugin side of a socketpair, speaking the wire format by hand.
    struct FakePlugin {
        s: UnixStream,
        buf: Vec<u8>,
    }

    impl FakePlugin {
        fn recv(&mut self) -> Msg {
            match read_record(&mut self.s, &mut self.buf).expect("read") {
                Incoming::Msg(m) => m,
                _ => panic!("plugin got no record"),
            }
        }
        fn send(&mut self, m: &Msg) {
            self.s.write_all(&m.to_bytes()).expect("write");
        }
    }

    fn pair() -> (PluginLink, FakePlugin) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (
            PluginLink::from_stream(a),
            FakePlugin {
                s: b,
                buf: Vec::new(),
            },
        )
    }

    fn hello(p: &mut FakePlugin) {
        p.send(&Msg::Hello(Hello {
            version: wire::WIRE_VERSION,
            pid: 1,
            mono_ns: 1_000,
        }));
    }

    #[test]
    fn handshake_hits_answers_and_arming() {
        let (mut link, mut p) = pair();
        let spec = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi]));
        link.arm(ProbeId(1), Gva(0xffff_ffff_810b_0de0), spec)
            .expect("arm");
        let mut held = spec;
        held.hold = true;
        link.arm(ProbeId(2), Gva(0xffff_ffff_816e_dd10), held)
            .expect("arm");
        hello(&mut p);
        link.accept(Duration::from_secs(5)).expect("accept");
        match p.recv() {
            Msg::Arm(a) => {
                assert_eq!(
                    (a.probe, a.addr, a.flags),
                    (1, 0xffff_ffff_810b_0de0, ARM_ENABLED)
                );
                assert_eq!(a.spec, spec);
            }
            m => panic!("{m:?}"),
        }
        assert!(matches!(p.recv(), Msg::Arm(a) if a.probe == 2 && a.spec.hold));
        assert_eq!(p.recv(), Msg::Go);

        // Two hits in one batch, 1 us apart on the host's monotonic clock, then a held one.
        let mono = ornament_engine::clock::monotonic_ns();
        let mut batch = Vec::new();
        for seq in 1..=2 {
            put_hit_head(
                &mut batch,
                0,
                1,
                0,
                seq,
                mono + 1_000 * seq,
                spec.regs,
                0,
                0,
                None,
            );
            // Values in register-bit order: rdi before rip.
            put_hit_value(&mut batch, 0xabc);
            put_hit_value(&mut batch, 0xffff_ffff_810b_0de0 + seq);
        }
        put_hit_head(
            &mut batch,
            HIT_HELD,
            2,
            1,
            1,
            mono + 5_000,
            spec.regs,
            0,
            0,
            None,
        );
        put_hit_value(&mut batch, 0xdef);
        put_hit_value(&mut batch, 0xffff_ffff_816e_dd10);
        p.s.write_all(&batch).expect("write");
        let h1 = link
            .next_hit(Duration::from_secs(5))
            .expect("ok")
            .expect("hit");
        assert_eq!(
            (h1.hit.probe, h1.hit.vcpu, h1.hit.seq, h1.hit.held),
            (ProbeId(1), 0, 1, false)
        );
        assert_eq!(
            (h1.hit.regs.rip, h1.hit.regs.rdi),
            (0xffff_ffff_810b_0de1, 0xabc)
        );
        let h2 = link
            .next_hit(Duration::from_secs(5))
            .expect("ok")
            .expect("hit");
        assert_eq!(h2.hit.seq, 2);
        // Placed on the host's clock as the plugin read it: exactly 1 us apart.
        assert_eq!(h2.hit.time_ns - h1.hit.time_ns, 1_000);
        assert!(h1.hit.time_ns > 0);
        assert!(matches!(
            link.answer(&h2, Action::Continue),
            Err(PluginLinkError::NotHeld)
        ));
        let h3 = link
            .next_hit(Duration::from_secs(5))
            .expect("ok")
            .expect("hit");
        assert!(h3.hit.held);
        link.answer(&h3, Action::Continue).expect("answer");
        assert_eq!(
            p.recv(),
            Msg::Answer(AnswerRecord {
                vcpu: 1,
                action: 0,
                seq: 1
            })
        );
        // Deny needs enable_deny first.
        assert!(matches!(
            link.answer(&h3, Action::DenySyscall { errno: 1 }),
            Err(PluginLinkError::DenyNotEnabled)
        ));

        // Run-time arm/disarm.
        link.disarm(ProbeId(1)).expect("disarm");
        assert_eq!(p.recv(), Msg::Disarm(DisarmRecord { probe: 1 }));
        link.arm(ProbeId(3), Gva(0x1000), spec).expect("arm");
        assert!(matches!(p.recv(), Msg::Arm(a) if a.probe == 3 && a.flags == ARM_ENABLED));
        assert!(matches!(
            link.disarm(ProbeId(9)),
            Err(PluginLinkError::NoSuchProbe(_))
        ));
        assert!(matches!(
            link.arm(DENY_EXIT_PROBE, Gva(0), spec),
            Err(PluginLinkError::ReservedProbe(_))
        ));

        // Nothing more: timeout; then errors and bye; then closed.
        assert_eq!(link.next_hit(Duration::from_millis(20)).expect("ok"), None);
        p.send(&Msg::Error(ErrorRecord {
            code: wire::PluginErrorCode::HoldTimeout as u32,
            vcpu: 0,
            probe: 2,
            detail: 4,
        }));
        p.send(&Msg::Bye(wire::ByeRecord {
            hits: 3,
            callback_ns: 3_000,
            mem_ns: 1_500,
            max_callback_ns: 2_000,
            stall_ns: 9_000,
        }));
        assert!(matches!(
            link.recv(Duration::from_secs(5)),
            Ok(Some(LinkEvent::PluginError(_)))
        ));
        assert_eq!(
            link.recv(Duration::from_secs(5)).expect("ok"),
            Some(LinkEvent::Bye {
                hits: 3,
                callback_ns: 3_000,
                mem_ns: 1_500,
                max_callback_ns: 2_000,
                stall_ns: 9_000,
            })
        );
        drop(p);
        assert!(matches!(
            link.recv(Duration::from_secs(5)),
            Err(PluginLinkError::Closed)
        ));
        assert_eq!(link.plugin_errors().len(), 1);
        assert_eq!(link.stats().hits, 3);
    }

    #[test]
    fn ram_record_carries_the_file_descriptor() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (mut link, mut p) = pair();
        // Not tempfile: the plugin's real-guest tests include this file without that crate.
        let path = std::env::temp_dir().join(format!("plugin-link-ram-{}", std::process::id()));
        let file = std::fs::File::create(&path).expect("tmp");
        let _ = std::fs::remove_file(&path);
        file.set_len(0x4000).expect("len");
        let regions = [RamRegion {
            gpa: 0x10_0000,
            len: 0x4000,
            file_offset: 0,
        }];
        assert!(matches!(
            link.send_ram(file.as_fd(), &regions, RamPaging::FromCr4),
            Err(PluginLinkError::NotConnected)
        ));
        hello(&mut p);
        link.accept(Duration::from_secs(5)).expect("accept");
        assert_eq!(p.recv(), Msg::Go);
        // Bad regions are refused before anything is sent.
        let mut bad = regions;
        bad[0].len = 0x10;
        assert!(matches!(
            link.send_ram(file.as_fd(), &bad, RamPaging::Level4),
            Err(PluginLinkError::Wire(wire::WireError::BadField(
                "ram.region"
            )))
        ));
        link.send_ram(file.as_fd(), &regions, RamPaging::Level5)
            .expect("send");
        let mut buf = vec![0u8; wire::RAM_LEN];
        let mut got = 0;
        let mut fd = None;
        while got < buf.len() {
            let (n, f) = p.s.recv_with_fd(&mut buf[got..]).expect("recv");
            assert!(n > 0, "closed");
            got += n;
            fd = fd.or(f);
        }
        assert_eq!(
            wire::decode(&buf).expect("decode").0,
            Msg::Ram(RamRecord {
                paging: RamPaging::Level5,
                regions: regions.to_vec()
            })
        );
        let fd = fd.expect("descriptor");
        let (a, b) = (fd.metadata().expect("stat"), file.metadata().expect("stat"));
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    }

    #[test]
    fn version_mismatch_and_garbage_are_errors() {
        let (mut link, mut p) = pair();
        p.send(&Msg::Hello(Hello {
            version: 99,
            pid: 1,
            mono_ns: 0,
        }));
        assert!(matches!(
            link.accept(Duration::from_secs(5)),
            Err(PluginLinkError::Version(99))
        ));
        let (mut link, mut p) = pair();
        p.s.write_all(&[0xee; 8]).expect("write");
        assert!(matches!(
            link.accept(Duration::from_secs(5)),
            Err(PluginLinkError::Wire(_))
        ));
    }

    #[test]
    fn accept_times_out_on_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("plugin-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let mut link = PluginLink::listen(&path).expect("listen");
        assert!(matches!(
            link.accept(Duration::from_millis(30)),
            Err(PluginLinkError::AcceptTimeout(_))
        ));
        let so = Path::new("/x/libornament_tcg_plugin.so");
        assert_eq!(
            link.qemu_args(so, &["hold_timeout_ms=500"])[1],
            format!(
                "/x/libornament_tcg_plugin.so,sock={},hold_timeout_ms=500",
                path.display()
            )
        );
        drop(link);
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }

    /// Identity-ish page tables: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000;
    /// kernel va 0xffff_c900_0000_0000 + x -> 0x10000 + x (4 KiB pages), direct map
    /// 0xffff_8880_0000_0000 -> 0 via one 1 GiB page.
    fn tables(mem: &SliceMemory) {
        const PTE_PS: u64 = 1 << 7;
        let w = |a: u64, v: u64| mem.write_phys(Gpa(a), &v.to_le_bytes()).expect("w");
        let vm = Gva(0xffff_c900_0000_0000);
        let dm = Gva(0xffff_8880_0000_0000);
        let i4 = |v: Gva| (v.raw() >> 39) & 0x1ff;
        let i3 = |v: Gva| (v.raw() >> 30) & 0x1ff;
        w(0x1000 + i4(vm) * 8, 0x2000 | 3);
        w(0x2000 + i3(vm) * 8, 0x3000 | 3);
        w(0x3000, 0x4000 | 3);
        w(0x4000, 0x10000 | 3);
        w(0x4000 + 8, 0x12000 | 3);
        w(0x1000 + i4(dm) * 8, 0x5000 | 3);
        w(0x5000 + i3(dm) * 8, PTE_PS | 3);
    }

    #[test]
    fn page_walk() {
        let mem = SliceMemory::new(0x20000);
        tables(&mem);
        let t = |va: u64| translate(&mem, 0x1000 | 0x5, false, Gva(va));
        assert_eq!(t(0xffff_c900_0000_0123), Some(Gpa(0x10123)));
        assert_eq!(t(0xffff_c900_0000_1ff8), Some(Gpa(0x12ff8)));
        assert_eq!(t(0xffff_c900_0000_2000), None);
        assert_eq!(t(0xffff_8880_0001_2345), Some(Gpa(0x12345)));
        assert_eq!(t(0x1000), None);
    }

    #[test]
    fn deny_writes_ax_and_emu_bit_then_clears_at_exit() {
        let mem = Arc::new(SliceMemory::new(0x20000));
        tables(&mem);
        let cfg = DenyConfig {
            syscall_exit: Gva(0xffff_ffff_819f_cf00),
            current_task_offset: 0x1fb80,
            syscall_work_offset: 8,
            syscall_emu_bit: 3,
            pt_regs_ax_offset: 0x50,
        };
        // pt_regs at vmalloc va +0x1f00 -> gpa 0x12f00; task at direct-map 0x11000.
        let regs_va = 0xffff_c900_0000_1f00u64;
        let task_va = 0xffff_8880_0001_1000u64;
        mem.write_phys(Gpa(0x11008), &0x40u64.to_le_bytes())
            .expect("w");
        let (mut link, mut p) = pair();
        link.enable_deny(cfg, mem.clone()).expect("enable");
        let spec = cfg.entry_spec(&[39], RegMask::NONE);
        link.arm(ProbeId(5), Gva(0xffff_ffff_819f_9cc0), spec)
            .expect("arm");
        hello(&mut p);
        link.accept(Duration::from_secs(5)).expect("accept");
        assert!(matches!(p.recv(), Msg::Arm(a) if a.probe == 5));
        let exit_arm = match p.recv() {
            Msg::Arm(a) => a,
            m => panic!("{m:?}"),
        };
        assert_eq!((exit_arm.probe, exit_arm.flags), (DENY_EXIT_PROBE.0, 0));
        assert_eq!(p.recv(), Msg::Go);

        let mut b = Vec::new();
        put_hit_head(&mut b, HIT_HELD, 5, 1, 7, 2_000, spec.regs, 1, 1, None);
        for r in spec.regs.iter() {
            put_hit_value(
                &mut b,
                match r {
                    Reg::Rdi => regs_va,
                    Reg::Rsi => 39,
                    Reg::Cr3 => 0x1000,
                    Reg::Cr4 => 0x20,
                    _ => 0,
                },
            );
        }
        put_hit_value(&mut b, task_va);
        p.s.write_all(&b).expect("write");
        let h = link
            .next_hit(Duration::from_secs(5))
            .expect("ok")
            .expect("hit");
        assert_eq!(h.mem[0], Some(task_va));
        link.answer(&h, Action::DenySyscall { errno: 1 })
            .expect("deny");
        let rd = |a: u64| {
            let mut x = [0u8; 8];
            mem.read_phys(Gpa(a), &mut x).expect("r");
            u64::from_le_bytes(x)
        };
        assert_eq!(rd(0x12f50), (-1i64) as u64, "pt_regs->ax = -EPERM");
        assert_eq!(rd(0x11008), 0x48, "SYSCALL_EMU set, other bits kept");
        assert!(
            matches!(p.recv(), Msg::Arm(a) if a.probe == DENY_EXIT_PROBE.0 && a.flags == ARM_ENABLED)
        );
        assert_eq!(
            p.recv(),
            Msg::Answer(AnswerRecord {
                vcpu: 1,
                action: 2,
                seq: 7
            })
        );

        // Another task exits first: answered, bit kept. Then ours: bit cleared, probe disarmed.
        for (task, seq) in [(0xffff_8880_0001_3000u64, 8u64), (task_va, 9)] {
            let mut b = Vec::new();
            let es = cfg.exit_spec();
            put_hit_head(
                &mut b,
                HIT_HELD,
                DENY_EXIT_PROBE.0,
                0,
                seq,
                3_000,
                es.regs,
                1,
                1,
                None,
            );
            for _ in es.regs.iter() {
                put_hit_value(&mut b, 0);
            }
            put_hit_value(&mut b, task);
            p.s.write_all(&b).expect("write");
        }
        assert_eq!(link.next_hit(Duration::from_millis(200)).expect("ok"), None);
        assert_eq!(
            p.recv(),
            Msg::Answer(AnswerRecord {
                vcpu: 0,
                action: 0,
                seq: 8
            })
        );
        assert_eq!(
            p.recv(),
            Msg::Disarm(DisarmRecord {
                probe: DENY_EXIT_PROBE.0
            })
        );
        assert_eq!(
            p.recv(),
            Msg::Answer(AnswerRecord {
                vcpu: 0,
                action: 0,
                seq: 9
            })
        );
        assert_eq!(rd(0x11008), 0x40, "SYSCALL_EMU cleared");
        assert_eq!(link.stats().denied, 1);
        assert_eq!(link.stats().internal_hits, 2);
    }
}
