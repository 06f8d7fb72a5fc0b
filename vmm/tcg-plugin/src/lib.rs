//! ornament-tcg-plugin: a QEMU TCG plugin (GPL-2.0-or-later) that is stage \[1\] of ornament's
//! QEMU engine.
//!
//! ```text
//! guest vCPU reaches a probe address
//!   -> exec callback (only on probe instructions)   this crate
//!   -> registers + small memory reads (guestmem), one ordered batch
//!   -> unix socket, ornament_engine::wire records   -> ornament-qemu::plugin_link -> ProbeHit
//!   <- answer (held probes only) / arm / disarm / RAM file (once)   <-
//! ```
//!
//! Loaded as `-plugin libornament_tcg_plugin.so,sock=PATH[,hold_timeout_ms=N][,flush_us=N]
//! [,batch_bytes=N][,verbose=on]` into `qemu-system-x86_64 -accel tcg` (QEMU >= 10.0, plugin
//! API v4).
//!
//! - Install: connect to `sock`, send `Hello`, take `Arm` records until `Go`, then let the guest
//!   start: the initial probes are in place before its first instruction.
//! - Translation: an exec callback is put on an instruction only when its address is in the
//!   probe table (armed or not); no other instruction gets anything.
//! - Arm/disarm at run time: a probe at an address already in the table is switched by a flag
//!   its callback checks (no flush). A probe at a new address needs the already translated code
//!   to be translated again: the plugin asks QEMU for `qemu_plugin_reset` (which flushes every
//!   translation block and drops all callbacks, which the plugin then registers again) from the
//!   next callback that runs on a vCPU thread (a probe hit, a translation, a vCPU going idle,
//!   or the held vCPU being answered). Arming a new address while a vCPU is held at a hit is
//!   therefore exact for that vCPU: the host sends the arm before the answer, and the vCPU asks
//!   for the reset as it resumes, so it runs at most the rest of its current translation block
//!   before all code is retranslated (other vCPUs may run a little further).
//!   QEMU runs that reset when every vCPU is outside guest code, so while a vCPU is held the
//!   reset (and every other vCPU) waits for the hold to end.
//! - Hits: appended to one buffer shared by all vCPUs in the order the callbacks ran (so a
//!   parent's fork record always comes before anything its child does on another vCPU), written
//!   to the socket when the buffer holds `batch_bytes` or by a flusher thread every `flush_us`;
//!   a held hit flushes at once and blocks only its own vCPU until the host answers or
//!   `hold_timeout_ms` passes (then it goes on and reports `HoldTimeout`). The socket is
//!   blocking: a host that stops reading slows the guest, it never loses hits.
//! - Memory reads: a probe's reads are done in index order; a read's address is a constant, a
//!   register plus an offset, or an earlier read's value plus an offset (pointer chains: a read
//!   whose base read failed fails). Once the host has sent the RAM record (with QEMU's RAM file
//!   descriptor), reads walk the guest's page tables from `cr3` over the mapped file
//!   ([`guestmem`]); before that, or when that mapping failed (reported once as
//!   `RamFallback`), or for an address the walk cannot resolve, they go through QEMU's
//!   `qemu_plugin_read_memory_vaddr`.
//! - Cost: the time spent in reported hits' callbacks (and in their memory reads) is summed and
//!   sent in the `Bye` record.
//! - No panic crosses into QEMU: every `extern "C"` entry runs under `catch_unwind`, and a
//!   caught panic is reported over the socket.

pub mod ffi;
pub mod guestmem;

use ffi::{Api, GArray, Insn, PluginId, QemuInfo, RegHandle, Tb};
use guestmem::{RamMapping, CR4_LA57};
use ornament_engine::wire::{
    self, AnswerRecord, ArmRecord, ByeRecord, ErrorRecord, Hello, HitBytes, MemBase, MemRead, Msg,
    PluginErrorCode, ProbeSpec, RamPaging, RamRecord, Reg, RegMask, VcpuInitRecord, ARM_ENABLED,
    HIT_HELD, MAX_MEM_READS,
};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The plugin API version this plugin is written against (QEMU checks it at load).
#[no_mangle]
#[used]
pub static qemu_plugin_version: c_int = 4;

/// Options given after the plugin path on QEMU's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginArgs {
    /// Unix socket of the host (`sock=`).
    pub sock: String,
    /// How long a held vCPU waits for an answer (`hold_timeout_ms=`, default 10 000).
    pub hold_timeout: Duration,
    /// Period of the flusher thread (`flush_us=`, default 1000).
    pub flush_period: Duration,
    /// A vCPU's buffer is written out when it holds this many bytes (`batch_bytes=`, default
    /// 16 KiB).
    pub batch_bytes: usize,
    /// How long install waits for the host's probe set (`connect_timeout_ms=`, default 30 000).
    pub connect_timeout: Duration,
    /// Print resolved registers and errors on QEMU's log (`verbose=on`).
    pub verbose: bool,
}

/// Why the plugin arguments are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ArgsError {
    /// plugin argument `{0}` is not key=value
    NotKeyValue(String),
    /// unknown plugin argument `{0}`
    Unknown(String),
    /// plugin argument `{0}` has a bad value
    BadValue(String),
    /// plugin argument sock=PATH is required
    NoSocket,
}

impl PluginArgs {
    /// Parse `key=value` arguments.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self, ArgsError> {
        let mut sock = None;
        let mut out = PluginArgs {
            sock: String::new(),
            hold_timeout: Duration::from_secs(10),
            flush_period: Duration::from_micros(1000),
            batch_bytes: 16 * 1024,
            connect_timeout: Duration::from_secs(30),
            verbose: false,
        };
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| ArgsError::NotKeyValue(a.to_owned()))?;
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| ArgsError::BadValue(k.to_owned()))
            };
            match k {
                "sock" => sock = Some(v.to_owned()),
                "hold_timeout_ms" => out.hold_timeout = Duration::from_millis(num()?),
                "flush_us" => out.flush_period = Duration::from_micros(num()?.max(10)),
                "batch_bytes" => {
                    out.batch_bytes =
                        usize::try_from(num()?).map_err(|_| ArgsError::BadValue(k.to_owned()))?
                }
                "connect_timeout_ms" => out.connect_timeout = Duration::from_millis(num()?),
                "verbose" => {
                    out.verbose = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(ArgsError::BadValue(k.to_owned())),
                    }
                }
                _ => return Err(ArgsError::Unknown(k.to_owned())),
            }
        }
        out.sock = sock.ok_or(ArgsError::NoSocket)?;
        Ok(out)
    }
}

/// One probe address: the configuration its exec callback reads.
#[derive(Debug)]
struct ProbeSlot {
    conf: RwLock<ProbeConf>,
}

#[derive(Debug, Clone, Copy)]
struct ProbeConf {
    probe: u32,
    enabled: bool,
    spec: ProbeSpec,
}

/// Per-vCPU state.
#[derive(Debug)]
struct Vcpu {
    /// Hits reported by this vCPU.
    seq: AtomicU64,
    /// Highest answered held seq.
    answered: Mutex<u64>,
    cv: Condvar,
    /// Register handles by `Reg` index (null: not offered by QEMU).
    regs: OnceLock<[usize; Reg::COUNT]>,
    /// This vCPU thread's scratch byte array.
    scratch: AtomicPtr<GArray>,
}

impl Vcpu {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            answered: Mutex::new(0),
            cv: Condvar::new(),
            regs: OnceLock::new(),
            scratch: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

#[derive(Debug)]
struct State {
    api: Api,
    id: PluginId,
    args: PluginArgs,
    /// The socket, and a spare buffer the pending records are swapped into for writing.
    writer: Mutex<(UnixStream, Vec<u8>)>,
    /// Hit records not yet written, of every vCPU, in the order they were made. Lock order:
    /// `writer` before `pending`.
    pending: Mutex<Vec<u8>>,
    /// Guest RAM mapped from the host's file, once its record came.
    ram: OnceLock<RamMapping>,
    /// The RAM record came but could not be used (reported once).
    ram_failed: AtomicBool,
    /// Sum of reported hits' callback time and of their memory reads, nanoseconds.
    callback_ns: AtomicU64,
    mem_ns: AtomicU64,
    max_callback_ns: AtomicU64,
    /// Sum of reported hits' whole time in the callback, sending and held waits included.
    stall_ns: AtomicU64,
    /// Probe table by address; slots are leaked so callbacks can hold `&'static` to them.
    by_addr: RwLock<HashMap<u64, &'static ProbeSlot>>,
    by_id: Mutex<HashMap<u32, u64>>,
    vcpus: Vec<Vcpu>,
    host_gone: AtomicBool,
    flush_wanted: AtomicBool,
    resetting: AtomicBool,
    start: Instant,
}

static STATE: OnceLock<State> = OnceLock::new();

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

impl State {
    fn send(&self, bytes: &[u8]) {
        if self.host_gone.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.write_all(bytes).is_err() {
            self.host_gone.store(true, Ordering::Relaxed);
            self.release_all();
        }
    }

    fn report(&self, code: PluginErrorCode, vcpu: u32, probe: u32, detail: u64) {
        if self.args.verbose {
            self.api.log(&format!(
                "ornament: error {code:?} vcpu {vcpu} probe {probe} detail {detail:#x}"
            ));
        }
        self.send(
            &Msg::Error(ErrorRecord {
                code: code as u32,
                vcpu,
                probe,
                detail,
            })
            .to_bytes(),
        );
    }

    /// Write every pending record, in order. The records are swapped out under the writer
    /// lock, so batches taken by different threads go out in the order they were taken.
    fn flush(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (sock, spare) = &mut *w;
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_empty() {
                return;
            }
            std::mem::swap(&mut *p, spare);
        }
        if !self.host_gone.load(Ordering::Relaxed) && sock.write_all(spare).is_err() {
            self.host_gone.store(true, Ordering::Relaxed);
            drop(w);
            self.release_all();
            return;
        }
        spare.clear();
    }

    /// Map the RAM file the host sent; on failure keep QEMU's reads and say so once.
    fn apply_ram(&self, rec: &RamRecord, fd: Option<File>) {
        match RamMapping::map(rec, fd) {
            Ok(m) => {
                if self.args.verbose {
                    self.api.log(&format!(
                        "ornament: guest RAM mapped, {} regions, paging {:?}",
                        rec.regions.len(),
                        rec.paging
                    ));
                }
                // A second record is ignored: views of the first may be in use.
                let _ = self.ram.set(m);
            }
            Err(e) => {
                if !self.ram_failed.swap(true, Ordering::Relaxed) {
                    if self.args.verbose {
                        self.api.log(&format!(
                            "ornament: guest RAM not mapped ({e}); reading through QEMU"
                        ));
                    }
                    self.report(
                        PluginErrorCode::RamFallback,
                        u32::MAX,
                        u32::MAX,
                        u64::try_from(e.errno()).unwrap_or(0),
                    );
                }
            }
        }
    }

    fn release_all(&self) {
        for v in &self.vcpus {
            let mut a = v.answered.lock().unwrap_or_else(|p| p.into_inner());
            *a = u64::MAX;
            v.cv.notify_all();
        }
    }

    fn apply_arm(&self, a: &ArmRecord) {
        let conf = ProbeConf {
            probe: a.probe,
            enabled: a.flags & ARM_ENABLED != 0,
            spec: a.spec,
        };
        let mut ids = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        // A probe id that moves to another address leaves its old slot disabled.
        if let Some(old) = ids.insert(a.probe, a.addr) {
            if old != a.addr {
                if let Some(slot) = self
                    .by_addr
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&old)
                {
                    slot.conf.write().unwrap_or_else(|p| p.into_inner()).enabled = false;
                }
            }
        }
        drop(ids);
        let mut map = self.by_addr.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&a.addr) {
            Some(slot) => *slot.conf.write().unwrap_or_else(|p| p.into_inner()) = conf,
            None => {
                let slot: &'static ProbeSlot = Box::leak(Box::new(ProbeSlot {
                    conf: RwLock::new(conf),
                }));
                map.insert(a.addr, slot);
                self.flush_wanted.store(true, Ordering::Release);
            }
        }
    }

    fn apply_disarm(&self, probe: u32) {
        let ids = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = ids.get(&probe) {
            if let Some(slot) = self
                .by_addr
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(addr)
            {
                let mut c = slot.conf.write().unwrap_or_else(|p| p.into_inner());
                if c.probe == probe {
                    c.enabled = false;
                }
            }
        }
    }

    fn apply_answer(&self, a: &AnswerRecord) {
        if let Some(v) = usize::try_from(a.vcpu).ok().and_then(|i| self.vcpus.get(i)) {
            let mut ans = v.answered.lock().unwrap_or_else(|p| p.into_inner());
            *ans = (*ans).max(a.seq);
            v.cv.notify_all();
        }
    }

    /// Ask QEMU to retranslate everything, from a vCPU thread, when a new address was armed.
    fn maybe_reset(&self) {
        if self.flush_wanted.load(Ordering::Acquire) && !self.resetting.swap(true, Ordering::AcqRel)
        {
            self.flush_wanted.store(false, Ordering::Release);
            // SAFETY: called from a plugin callback on a vCPU thread with our own plugin id;
            // `on_reset_done` is a valid callback for the whole life of the process.
            unsafe { (self.api.reset)(self.id, on_reset_done) };
        }
    }

    fn register_callbacks(&self) {
        // SAFETY: our plugin id and callbacks that live as long as the process.
        unsafe {
            (self.api.register_vcpu_init_cb)(self.id, on_vcpu_init);
            (self.api.register_vcpu_tb_trans_cb)(self.id, on_tb_trans);
            (self.api.register_vcpu_idle_cb)(self.id, on_vcpu_idle);
            (self.api.register_atexit_cb)(self.id, on_exit, std::ptr::null_mut());
        }
    }
}

/// Run `f` and turn a panic into an error record (never unwinds into QEMU).
fn guarded(vcpu: u32, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        let _ = catch_unwind(|| {
            if let Some(s) = STATE.get() {
                s.report(PluginErrorCode::Panic, vcpu, u32::MAX, 0);
            }
        });
    }
}

/// Read `n` bytes (1..=8) out of a GByteArray as a little-endian value.
///
/// # Safety
/// `arr` must point to a live GByteArray.
unsafe fn garray_value(arr: *const GArray, n: usize) -> u64 {
    // SAFETY: the caller guarantees `arr` is live; data holds `len` bytes.
    let (data, len) = unsafe { ((*arr).data, usize::try_from((*arr).len).unwrap_or(0)) };
    let n = n.min(len).min(8);
    let mut b = [0u8; 8];
    if n > 0 && !data.is_null() {
        // SAFETY: `data` holds at least `len >= n` bytes.
        b[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(data, n) });
    }
    u64::from_le_bytes(b)
}

fn scratch(s: &State, v: &Vcpu) -> *mut GArray {
    let p = v.scratch.load(Ordering::Relaxed);
    if !p.is_null() {
        return p;
    }
    // SAFETY: g_byte_array_new has no preconditions.
    let p = unsafe { (s.api.g_byte_array_new)() };
    v.scratch.store(p, Ordering::Relaxed);
    p
}

fn read_reg(s: &State, v: &Vcpu, arr: *mut GArray, reg: Reg) -> Option<u64> {
    let h = v.regs.get()?[usize::from(reg.index())];
    if h == 0 || arr.is_null() {
        return None;
    }
    // SAFETY: `arr` is this vCPU's live byte array; `h` is a handle QEMU returned for this
    // vCPU; we are inside an exec callback registered with CB_R_REGS on this vCPU's thread.
    let n = unsafe {
        (s.api.g_byte_array_set_size)(arr, 0);
        (s.api.read_register)(h as *mut RegHandle, arr)
    };
    let n = usize::try_from(n).ok().filter(|n| *n > 0)?;
    // SAFETY: `arr` is live and QEMU just appended `n` bytes.
    Some(unsafe { garray_value(arr, n) })
}

/// A register's value at this hit: from the values already read for the record, else read now.
fn reg_value(
    s: &State,
    v: &Vcpu,
    arr: *mut GArray,
    spec: &ProbeSpec,
    got: (&[u64; Reg::COUNT], RegMask),
    r: Reg,
) -> Option<u64> {
    if spec.regs.contains(r) && got.1.contains(r) {
        Some(got.0[usize::from(r.index())])
    } else {
        read_reg(s, v, arr, r)
    }
}

/// Do the probe's memory reads in index order with `read(addr, len)`; returns (requested,
/// succeeded, values). A read whose base (register or earlier read) failed fails unread.
fn mem_reads(
    spec: &ProbeSpec,
    reg: &mut dyn FnMut(Reg) -> Option<u64>,
    read: &mut dyn FnMut(u64, usize) -> Option<u64>,
) -> (u16, u16, [u64; MAX_MEM_READS]) {
    let mut present = 0u16;
    let mut ok = 0u16;
    let mut vals = [0u64; MAX_MEM_READS];
    for (i, m) in spec.mem.iter().enumerate() {
        let base = match chain_base(m, ok, &vals, reg) {
            Base::Unused => continue,
            Base::Failed => {
                present |= 1 << i;
                continue;
            }
            Base::At(b) => b,
        };
        present |= 1 << i;
        let addr = base.wrapping_add(m.offset);
        if let Some(x) = read(addr, usize::from(m.len.clamp(1, 8))) {
            ok |= 1 << i;
            vals[i] = x;
        }
    }
    (present, ok, vals)
}

enum Base {
    Unused,
    Failed,
    At(u64),
}

/// The base of read `m`: nothing, a failure (its register or earlier read failed), or a value.
fn chain_base(
    m: &MemRead,
    ok: u16,
    vals: &[u64; MAX_MEM_READS],
    reg: &mut dyn FnMut(Reg) -> Option<u64>,
) -> Base {
    let v = match m.base {
        MemBase::None => return Base::Unused,
        MemBase::Absolute => Some(0),
        MemBase::Reg(r) => reg(r),
        // The decoder only lets a read chain to a lower index, which is done already.
        MemBase::Mem(j) => {
            let j = usize::from(j);
            (j < MAX_MEM_READS && ok & (1 << j) != 0).then(|| vals[j])
        }
    };
    v.map_or(Base::Failed, Base::At)
}

/// One read through QEMU's own accessor (a debug page walk: slow).
fn qemu_read(s: &State, arr: *mut GArray, addr: u64, len: usize) -> Option<u64> {
    if arr.is_null() {
        return None;
    }
    // SAFETY: `arr` is this vCPU's live byte array; reading guest memory by virtual
    // address is allowed from a vCPU callback; QEMU sizes `arr` to `len` itself.
    let ok = unsafe { (s.api.read_memory_vaddr)(addr, arr, len) };
    // SAFETY: `arr` is live and holds `len` bytes after a successful read.
    ok.then(|| unsafe { garray_value(arr, len) })
}

/// A probe's byte range: `n` bytes at `start` through this hit's page walk, QEMU's accessor
/// from where the walk stopped (as for the reads), up to the first unreadable page; `cut`:
/// the range was longer than the probe's maximum.
fn read_range(
    s: &State,
    arr: *mut GArray,
    walker: Option<&mut guestmem::Walker<'_>>,
    start: u64,
    n: usize,
    cut: bool,
) -> HitBytes {
    let mut data = vec![0u8; n];
    let mut got = walker.map_or(0, |w| w.read_bytes(start, &mut data));
    while got < n {
        let len = (n - got).min(8);
        let Some(x) = qemu_read(s, arr, start.wrapping_add(got as u64), len) else {
            break;
        };
        data[got..got + len].copy_from_slice(&x.to_le_bytes()[..len]);
        got += len;
    }
    data.truncate(got);
    HitBytes {
        data,
        complete: !cut && got == n,
    }
}

fn on_hit(vcpu_index: c_uint, slot: &'static ProbeSlot) {
    let Some(s) = STATE.get() else { return };
    s.maybe_reset();
    let conf = *slot.conf.read().unwrap_or_else(|p| p.into_inner());
    if !conf.enabled {
        return;
    }
    let Some(v) = usize::try_from(vcpu_index)
        .ok()
        .and_then(|i| s.vcpus.get(i))
    else {
        s.report(
            PluginErrorCode::VcpuRange,
            vcpu_index,
            conf.probe,
            u64::from(vcpu_index),
        );
        return;
    };
    let arr = scratch(s, v);
    let spec = &conf.spec;
    let mut filter_val = None;
    if let Some(fr) = spec.filter {
        let val = read_reg(s, v, arr, fr);
        match val {
            Some(x) if spec.filter_passes(x) => filter_val = Some((fr, x)),
            _ => return,
        }
    }
    let t_start = mono_ns();
    let mut vals = [0u64; Reg::COUNT];
    let mut regs_ok = RegMask::NONE;
    for r in spec.regs.iter() {
        let got = match filter_val {
            Some((fr, x)) if fr == r => Some(x),
            _ => read_reg(s, v, arr, r),
        };
        match got {
            Some(x) => {
                vals[usize::from(r.index())] = x;
                regs_ok.0 |= 1 << r.index();
            }
            None => s.report(
                PluginErrorCode::RegRead,
                vcpu_index,
                conf.probe,
                u64::from(r.index()),
            ),
        }
    }
    let t_mem = mono_ns();
    let (mem_present, mem_ok, mem_vals, bytes) = if spec.mem_count() == 0 {
        (0, 0, [0u64; MAX_MEM_READS], None)
    } else {
        let got = (&vals, regs_ok);
        let mut reg = |r| reg_value(s, v, arr, spec, got, r);
        // The page walk needs cr3 (and CR4.LA57 unless the host said), read once per hit.
        let mut fast: Option<Option<guestmem::Walker<'_>>> = None;
        let mut read = |addr: u64, len: usize| {
            let fm = fast.get_or_insert_with(|| {
                let map = s.ram.get()?;
                let cr3 = reg_value(s, v, arr, spec, got, Reg::Cr3)?;
                let la57 = match map.paging {
                    RamPaging::Level4 => false,
                    RamPaging::Level5 => true,
                    RamPaging::FromCr4 => {
                        reg_value(s, v, arr, spec, got, Reg::Cr4)? & CR4_LA57 != 0
                    }
                };
                Some(guestmem::Walker::new(map.ram(), cr3, la57))
            });
            fm.as_mut()
                .and_then(|w| w.read(addr, len))
                .or_else(|| qemu_read(s, arr, addr, len))
        };
        let (present, ok, vals) = mem_reads(spec, &mut reg, &mut read);
        let value = |i: usize| wire::mem_value(present, ok, &vals, i);
        let walker = fast.as_mut().and_then(Option::as_mut);
        let bytes = spec
            .bytes
            .range(value)
            .map(|(start, n, cut)| read_range(s, arr, walker, start, n, cut));
        (present, ok, vals, bytes)
    };
    let seq = v.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let time = mono_ns();
    let hold = spec.hold && !s.host_gone.load(Ordering::Relaxed);
    let flags = if hold { HIT_HELD } else { 0 };
    let full = {
        let mut b = s.pending.lock().unwrap_or_else(|p| p.into_inner());
        wire::put_hit_head(
            &mut b,
            flags,
            conf.probe,
            vcpu_index,
            seq,
            time,
            spec.regs,
            mem_present,
            mem_ok,
            bytes.as_ref().map(|x| x.data.len()),
        );
        for r in spec.regs.iter() {
            wire::put_hit_value(&mut b, vals[usize::from(r.index())]);
        }
        for (i, val) in mem_vals.iter().enumerate() {
            if mem_present & (1 << i) != 0 {
                wire::put_hit_value(&mut b, *val);
            }
        }
        if let Some(x) = &bytes {
            wire::put_hit_bytes(&mut b, &x.data, x.complete);
        }
        b.len() >= s.args.batch_bytes
    };
    s.mem_ns
        .fetch_add(time.saturating_sub(t_mem), Ordering::Relaxed);
    let took = mono_ns().saturating_sub(t_start);
    s.callback_ns.fetch_add(took, Ordering::Relaxed);
    s.max_callback_ns.fetch_max(took, Ordering::Relaxed);
    if hold || full {
        s.flush();
    }
    let stalled = || {
        s.stall_ns
            .fetch_add(mono_ns().saturating_sub(t_start), Ordering::Relaxed);
    };
    if hold {
        let deadline = Instant::now() + s.args.hold_timeout;
        let mut ans = v.answered.lock().unwrap_or_else(|p| p.into_inner());
        while *ans < seq {
            let now = Instant::now();
            if now >= deadline {
                drop(ans);
                s.report(PluginErrorCode::HoldTimeout, vcpu_index, conf.probe, seq);
                stalled();
                return;
            }
            ans =
                v.cv.wait_timeout(ans, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        drop(ans);
        // Probes the host armed at new addresses while this vCPU was held take effect before
        // it runs past its current translation block.
        s.maybe_reset();
    }
    stalled();
}

extern "C" fn on_exec(vcpu_index: c_uint, udata: *mut c_void) {
    guarded(vcpu_index, || {
        // SAFETY: `udata` is a `&'static ProbeSlot` we leaked in `apply_arm` and passed at
        // registration; slots are never freed.
        let slot = unsafe { &*(udata as *const ProbeSlot) };
        on_hit(vcpu_index, slot);
    });
}

extern "C" fn on_tb_trans(_id: PluginId, tb: *mut Tb) {
    guarded(u32::MAX, || {
        let Some(s) = STATE.get() else { return };
        s.maybe_reset();
        let map = s.by_addr.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return;
        }
        // SAFETY: `tb` is the block QEMU is translating, valid during this callback.
        let n = unsafe { (s.api.tb_n_insns)(tb) };
        for i in 0..n {
            // SAFETY: `i < n` instructions of the block being translated.
            let insn: *mut Insn = unsafe { (s.api.tb_get_insn)(tb, i) };
            // SAFETY: `insn` belongs to `tb`, valid during this callback.
            let vaddr = unsafe { (s.api.insn_vaddr)(insn) };
            if let Some(slot) = map.get(&vaddr) {
                let udata = std::ptr::from_ref::<ProbeSlot>(*slot)
                    .cast_mut()
                    .cast::<c_void>();
                // SAFETY: `insn` is valid during translation; `on_exec` and the leaked slot
                // live for the whole process.
                unsafe { (s.api.register_vcpu_insn_exec_cb)(insn, on_exec, ffi::CB_R_REGS, udata) };
            }
        }
    });
}

extern "C" fn on_vcpu_init(_id: PluginId, vcpu_index: c_uint) {
    guarded(vcpu_index, || {
        let Some(s) = STATE.get() else { return };
        let Some(v) = usize::try_from(vcpu_index)
            .ok()
            .and_then(|i| s.vcpus.get(i))
        else {
            s.report(
                PluginErrorCode::VcpuRange,
                vcpu_index,
                u32::MAX,
                u64::from(vcpu_index),
            );
            return;
        };
        if v.regs.get().is_some() {
            return;
        }
        // SAFETY: called on the vCPU's own thread in its init callback, as the API requires.
        let arr = unsafe { (s.api.get_registers)() };
        if arr.is_null() {
            return;
        }
        let mut by_name: HashMap<String, usize> = HashMap::new();
        // SAFETY: QEMU returns a GArray of `RegDescriptor`s with `len` entries.
        let descs = unsafe {
            std::slice::from_raw_parts(
                (*arr).data.cast::<ffi::RegDescriptor>(),
                usize::try_from((*arr).len).unwrap_or(0),
            )
        };
        for d in descs {
            if d.name.is_null() {
                continue;
            }
            // SAFETY: `name` is a NUL-terminated string owned by QEMU.
            let name = unsafe { CStr::from_ptr(d.name) }
                .to_string_lossy()
                .into_owned();
            by_name.insert(name, d.handle as usize);
        }
        let count = u32::try_from(descs.len()).unwrap_or(u32::MAX);
        // SAFETY: we own the array (not its element strings, which stay QEMU's); free_segment=1.
        unsafe { (s.api.g_array_free)(arr, 1) };
        let mut handles = [0usize; Reg::COUNT];
        let mut resolved = RegMask::NONE;
        for r in Reg::ALL {
            if let Some(h) = r.qemu_names().iter().find_map(|n| by_name.get(*n)) {
                handles[usize::from(r.index())] = *h;
                resolved.0 |= 1 << r.index();
            }
        }
        if s.args.verbose {
            let mut names: Vec<&String> = by_name.keys().collect();
            names.sort();
            s.api.log(&format!(
                "ornament: vcpu {vcpu_index}: {count} registers, resolved {:#x} of {:#x}; names: {names:?}",
                resolved.0,
                RegMask::ALL.0
            ));
        }
        let _ = v.regs.set(handles);
        s.send(
            &Msg::VcpuInit(VcpuInitRecord {
                vcpu: vcpu_index,
                resolved,
                qemu_regs: count,
            })
            .to_bytes(),
        );
    });
}

extern "C" fn on_vcpu_idle(_id: PluginId, vcpu_index: c_uint) {
    guarded(vcpu_index, || {
        if let Some(s) = STATE.get() {
            s.maybe_reset();
        }
    });
}

extern "C" fn on_reset_done(_id: PluginId) {
    guarded(u32::MAX, || {
        let Some(s) = STATE.get() else { return };
        s.register_callbacks();
        s.resetting.store(false, Ordering::Release);
    });
}

extern "C" fn on_exit(_id: PluginId, _udata: *mut c_void) {
    guarded(u32::MAX, || {
        let Some(s) = STATE.get() else { return };
        s.flush();
        s.send(
            &Msg::Bye(ByeRecord {
                hits: s.vcpus.iter().map(|v| v.seq.load(Ordering::Relaxed)).sum(),
                callback_ns: s.callback_ns.load(Ordering::Relaxed),
                mem_ns: s.mem_ns.load(Ordering::Relaxed),
                max_callback_ns: s.max_callback_ns.load(Ordering::Relaxed),
                stall_ns: s.stall_ns.load(Ordering::Relaxed),
            })
            .to_bytes(),
        );
    });
}

/// The host socket read with `recvmsg`, so that a descriptor sent with a record (the RAM
/// file) is kept until its record is decoded.
struct FdReader {
    sock: UnixStream,
    fd: Option<File>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.sock.recv_with_fd(buf) {
                Ok((n, fd)) => {
                    if fd.is_some() {
                        self.fd = fd;
                    }
                    return Ok(n);
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
            }
        }
    }
}

/// Read exactly one record from a blocking stream.
fn read_record(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> std::io::Result<Result<Msg, wire::WireError>> {
    buf.resize(wire::HEADER_LEN, 0);
    r.read_exact(buf)?;
    let h = match wire::decode_header(buf) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    buf.resize(h.len, 0);
    r.read_exact(&mut buf[wire::HEADER_LEN..])?;
    Ok(wire::decode(buf).map(|(m, _)| m))
}

fn reader_loop(mut sock: FdReader) {
    let mut buf = Vec::with_capacity(wire::MAX_RECORD_LEN);
    loop {
        let Some(s) = STATE.get() else { return };
        match read_record(&mut sock, &mut buf) {
            Err(_) => {
                s.host_gone.store(true, Ordering::Relaxed);
                s.release_all();
                return;
            }
            Ok(Err(_)) => {
                let raw = buf.first().copied().unwrap_or(0);
                s.report(
                    PluginErrorCode::BadRecord,
                    u32::MAX,
                    u32::MAX,
                    u64::from(raw),
                );
                s.host_gone.store(true, Ordering::Relaxed);
                s.release_all();
                return;
            }
            Ok(Ok(Msg::Arm(a))) => s.apply_arm(&a),
            Ok(Ok(Msg::Disarm(d))) => s.apply_disarm(d.probe),
            Ok(Ok(Msg::Answer(a))) => s.apply_answer(&a),
            Ok(Ok(Msg::Ram(r))) => s.apply_ram(&r, sock.fd.take()),
            Ok(Ok(_)) => {}
        }
    }
}

fn flusher_loop() {
    loop {
        let Some(s) = STATE.get() else { return };
        if s.host_gone.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(s.args.flush_period);
        s.flush();
    }
}

/// Why install failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
enum InstallError {
    /// QEMU does not export {0:?}
    Symbol(&'static CStr),
    /// bad plugin arguments
    Args(#[from] ArgsError),
    /// not a system-emulation QEMU
    NotSystem,
    /// cannot connect to the host socket
    Connect(#[source] std::io::Error),
    /// host socket failed during the handshake
    Handshake(#[source] std::io::Error),
    /// host sent a bad record during the handshake
    Wire(#[from] wire::WireError),
    /// plugin installed twice
    Twice,
}

fn install(id: PluginId, info: &QemuInfo, argv: &[&str]) -> Result<(), InstallError> {
    let api = Api::resolve().map_err(|m| InstallError::Symbol(m.0))?;
    let args = PluginArgs::parse(argv.iter().copied())?;
    if !info.system_emulation {
        return Err(InstallError::NotSystem);
    }
    let nvcpus =
        usize::try_from(info.system.max_vcpus.max(info.system.smp_vcpus).max(1)).unwrap_or(1);
    let sock = UnixStream::connect(&args.sock).map_err(InstallError::Connect)?;
    sock.set_read_timeout(Some(args.connect_timeout))
        .map_err(InstallError::Handshake)?;
    let mut sock = FdReader { sock, fd: None };
    let hello = Msg::Hello(Hello {
        version: wire::WIRE_VERSION,
        pid: std::process::id(),
        mono_ns: mono_ns(),
    });
    sock.sock
        .write_all(&hello.to_bytes())
        .map_err(InstallError::Handshake)?;
    let mut initial = Vec::new();
    let mut ram = None;
    let mut buf = Vec::new();
    loop {
        match read_record(&mut sock, &mut buf).map_err(InstallError::Handshake)?? {
            Msg::Go => break,
            Msg::Arm(a) => initial.push(a),
            Msg::Disarm(d) => initial.retain(|a: &ArmRecord| a.probe != d.probe),
            Msg::Ram(r) => ram = Some((r, sock.fd.take())),
            _ => {}
        }
    }
    sock.sock
        .set_read_timeout(None)
        .map_err(InstallError::Handshake)?;
    let writer = sock.sock.try_clone().map_err(InstallError::Handshake)?;
    let state = State {
        api,
        id,
        args,
        writer: Mutex::new((writer, Vec::with_capacity(16 * 1024))),
        pending: Mutex::new(Vec::with_capacity(16 * 1024)),
        ram: OnceLock::new(),
        ram_failed: AtomicBool::new(false),
        callback_ns: AtomicU64::new(0),
        mem_ns: AtomicU64::new(0),
        max_callback_ns: AtomicU64::new(0),
        stall_ns: AtomicU64::new(0),
        by_addr: RwLock::new(HashMap::new()),
        by_id: Mutex::new(HashMap::new()),
        vcpus: (0..nvcpus).map(|_| Vcpu::new()).collect(),
        host_gone: AtomicBool::new(false),
        flush_wanted: AtomicBool::new(false),
        resetting: AtomicBool::new(false),
        start: Instant::now(),
    };
    STATE.set(state).map_err(|_| InstallError::Twice)?;
    let s = STATE.get().ok_or(InstallError::Twice)?;
    for a in &initial {
        s.apply_arm(a);
    }
    if let Some((r, fd)) = ram {
        s.apply_ram(&r, fd);
    }
    // Nothing is translated yet: no flush needed for the initial set.
    s.flush_wanted.store(false, Ordering::Release);
    s.register_callbacks();
    std::thread::Builder::new()
        .name("ornament-rx".into())
        .spawn(move || reader_loop(sock))
        .map_err(InstallError::Handshake)?;
    std::thread::Builder::new()
        .name("ornament-flush".into())
        .spawn(flusher_loop)
        .map_err(InstallError::Handshake)?;
    if s.args.verbose {
        api.log(&format!(
            "ornament: installed, {} probes, {nvcpus} vcpu slots, {:?} since start",
            initial.len(),
            s.start.elapsed()
        ));
    }
    Ok(())
}

/// QEMU's entry point: parse `argv`, connect to the host, take the initial probe set.
///
/// Returns 0 on success; anything else makes QEMU refuse to start, with our message on its
/// log.
///
/// # Safety
/// Called by QEMU with a valid `info` and `argc` NUL-terminated strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn qemu_plugin_install(
    id: PluginId,
    info: *const QemuInfo,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let n = usize::try_from(argc).unwrap_or(0);
        let owned: Vec<String> = (0..n)
            .filter_map(|i| {
                // SAFETY: QEMU passes `argc` valid pointers in `argv`.
                let p = unsafe { *argv.add(i) };
                // SAFETY: each is a NUL-terminated string owned by QEMU during this call.
                (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            })
            .collect();
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        // SAFETY: QEMU passes a valid `qemu_info_t` for the duration of this call.
        let info = unsafe { &*info };
        install(id, info, &args)
    }));
    let msg = match r {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => {
            let mut m = format!("ornament-tcg-plugin: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
        Err(_) => "ornament-tcg-plugin: panic during install".to_owned(),
    };
    let _ = catch_unwind(|| {
        if let Ok(api) = Api::resolve() {
            api.log(&msg);
        }
    });
    -1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let a = PluginArgs::parse(["sock=/tmp/x.sock", "hold_timeout_ms=250", "verbose=on"])
            .expect("valid");
        assert_eq!(a.sock, "/tmp/x.sock");
        assert_eq!(a.hold_timeout, Duration::from_millis(250));
        assert!(a.verbose);
        assert_eq!(a.batch_bytes, 16 * 1024);
        assert_eq!(PluginArgs::parse(["verbose=on"]), Err(ArgsError::NoSocket));
        assert_eq!(
            PluginArgs::parse(["sock=/x", "nope=1"]),
            Err(ArgsError::Unknown("nope".into()))
        );
        assert_eq!(
            PluginArgs::parse(["sock"]),
            Err(ArgsError::NotKeyValue("sock".into()))
        );
        assert_eq!(
            PluginArgs::parse(["sock=/x", "flush_us=abc"]),
            Err(ArgsError::BadValue("flush_us".into()))
        );
    }

    #[test]
    fn chained_reads_fail_with_their_base() {
        let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::Rdi]));
        // 0: rdi + 8 (a pointer); 1: *(0) + 4; 2: *(1) + 0; 3: from rsi (unreadable);
        // 4: *(3) + 0 (fails with 3); 5: absolute; 7: *(5) (unmapped target).
        spec.mem[0] = MemRead::at_reg(Reg::Rdi, 8, 8);
        spec.mem[1] = MemRead::at_mem(0, 4, 8);
        spec.mem[2] = MemRead::at_mem(1, 0, 4);
        spec.mem[3] = MemRead::at_reg(Reg::Rsi, 0, 8);
        spec.mem[4] = MemRead::at_mem(3, 0, 8);
        spec.mem[5] = MemRead {
            base: MemBase::Absolute,
            offset: 0x500,
            len: 8,
        };
        spec.mem[7] = MemRead::at_mem(5, 0, 8);
        let mem: HashMap<u64, u64> = [
            (0x1008, 0x2000),
            (0x2004, 0x3000),
            (0x3000, 0xabcd),
            (0x500, 0xdead),
        ]
        .into_iter()
        .collect();
        let mut asked = Vec::new();
        let mut reg = |r| (r == Reg::Rdi).then_some(0x1000);
        let mut read = |a: u64, len: usize| {
            asked.push(a);
            mem.get(&a).map(|v| v & (u64::MAX >> (64 - 8 * len)))
        };
        let (present, ok, vals) = mem_reads(&spec, &mut reg, &mut read);
        assert_eq!(present, 0b1011_1111);
        assert_eq!(ok, 0b0010_0111);
        assert_eq!(&vals[..3], &[0x2000, 0x3000, 0xabcd]);
        assert_eq!(vals[5], 0xdead);
        assert_eq!(vals[4], 0, "a failed read carries 0");
        // Reads 3 and 4 never reached memory (no base); 7 did (0xdead) and failed there.
        assert_eq!(asked, [0x1008, 0x2004, 0x3000, 0x500, 0xdead]);
    }

    #[test]
    fn garray_value_reads_little_endian() {
        let mut bytes = [0x78u8, 0x56, 0x34, 0x12, 0xff];
        let arr = GArray {
            data: bytes.as_mut_ptr(),
            len: 5,
        };
        // SAFETY: `arr` points at `bytes`, alive for the call.
        assert_eq!(unsafe { garray_value(&arr, 4) }, 0x1234_5678);
        // SAFETY: as above.
        assert_eq!(unsafe { garray_value(&arr, 8) }, 0xff_1234_5678);
    }
}
