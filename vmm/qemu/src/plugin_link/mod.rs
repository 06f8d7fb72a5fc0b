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
//! Denying a syscall: [`deny`].

use ornament_engine::wire::{
    self, AnswerRecord, ArmRecord, DisarmRecord, ErrorRecord, HitRecord, Msg, ProbeSpec, RamPaging,
    RamRecord, RamRegion, RegMask, ARM_ENABLED, MAX_MEM_READS,
};
use ornament_engine::{Action, Gva, MemError, ProbeHit, ProbeId};
use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

mod deny;
use deny::DenyState;

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

pub use deny::{DenyConfig, GuestRam};

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
mod tests;
