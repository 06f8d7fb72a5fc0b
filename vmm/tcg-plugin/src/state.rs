//! The plugin's shared state: probe table, per-vCPU slots, the socket writer and the batch of
//! pending hit records, and how host records (arm, disarm, answer, RAM) change them.

use crate::callbacks::{on_exit, on_reset_done, on_tb_trans, on_vcpu_idle, on_vcpu_init};
use crate::ffi::{Api, GArray, PluginId};
use crate::guestmem::RamMapping;
use crate::PluginArgs;
use ornament_engine::wire::{
    AnswerRecord, ArmRecord, ErrorRecord, Msg, PluginErrorCode, ProbeSpec, RamRecord, Reg,
    ARM_ENABLED,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, RwLock};
use std::time::Instant;

/// Most probes that share one address (say the session's and the link's own at
/// `syscall_exit_to_user_mode`); one more at that address is refused with `AddrFull`.
pub(crate) const PROBES_PER_ADDR: usize = 3;

/// One probe address: the configurations its exec callback reads, each hit reported once per
/// enabled probe, in table order.
#[derive(Debug)]
pub(crate) struct ProbeSlot {
    pub(crate) confs: RwLock<[Option<ProbeConf>; PROBES_PER_ADDR]>,
}

impl ProbeSlot {
    /// Switch probe `probe` on or off here, if it is here.
    fn set_enabled(&self, probe: u32, on: bool) {
        let mut confs = self.confs.write().unwrap_or_else(|p| p.into_inner());
        for c in confs.iter_mut().flatten() {
            if c.probe == probe {
                c.enabled = on;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeConf {
    pub(crate) probe: u32,
    pub(crate) enabled: bool,
    pub(crate) spec: ProbeSpec,
}

/// Per-vCPU state.
#[derive(Debug)]
pub(crate) struct Vcpu {
    /// Hits reported by this vCPU.
    pub(crate) seq: AtomicU64,
    /// Highest answered held seq.
    pub(crate) answered: Mutex<u64>,
    pub(crate) cv: Condvar,
    /// Register handles by `Reg` index (null: not offered by QEMU).
    pub(crate) regs: OnceLock<[usize; Reg::COUNT]>,
    /// This vCPU thread's scratch byte array.
    pub(crate) scratch: AtomicPtr<GArray>,
}

impl Vcpu {
    pub(crate) fn new() -> Self {
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
pub(crate) struct State {
    pub(crate) api: Api,
    pub(crate) id: PluginId,
    pub(crate) args: PluginArgs,
    /// The socket, and a spare buffer the pending records are swapped into for writing.
    pub(crate) writer: Mutex<(UnixStream, Vec<u8>)>,
    /// Hit records not yet written, of every vCPU, in the order they were made. Lock order:
    /// `writer` before `pending`.
    pub(crate) pending: Mutex<Vec<u8>>,
    /// Guest RAM mapped from the host's file, once its record came.
    pub(crate) ram: OnceLock<RamMapping>,
    /// The RAM record came but could not be used (reported once).
    pub(crate) ram_failed: AtomicBool,
    /// Sum of reported hits' callback time and of their memory reads, nanoseconds.
    pub(crate) callback_ns: AtomicU64,
    pub(crate) mem_ns: AtomicU64,
    pub(crate) max_callback_ns: AtomicU64,
    /// Sum of reported hits' whole time in the callback, sending and held waits included.
    pub(crate) stall_ns: AtomicU64,
    /// Probe table by address; slots are leaked so callbacks can hold `&'static` to them.
    pub(crate) by_addr: RwLock<HashMap<u64, &'static ProbeSlot>>,
    pub(crate) by_id: Mutex<HashMap<u32, u64>>,
    /// Tasks inside each window, by the window's probe
    /// ([`Window`](ornament_engine::wire::Window)). Lock order: `windows`
    /// before `by_id`.
    pub(crate) windows: Mutex<HashMap<u32, u64>>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) host_gone: AtomicBool,
    pub(crate) flush_wanted: AtomicBool,
    pub(crate) resetting: AtomicBool,
    pub(crate) start: Instant,
}

pub(crate) static STATE: OnceLock<State> = OnceLock::new();

pub(crate) use ornament_engine::clock::monotonic_ns as mono_ns;

impl State {
    pub(crate) fn send(&self, bytes: &[u8]) {
        if self.host_gone.load(Ordering::Relaxed) {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.write_all(bytes).is_err() {
            self.host_gone.store(true, Ordering::Relaxed);
            self.release_all();
        }
    }

    pub(crate) fn report(&self, code: PluginErrorCode, vcpu: u32, probe: u32, detail: u64) {
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
    pub(crate) fn flush(&self) {
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
    pub(crate) fn apply_ram(&self, rec: &RamRecord, fd: Option<File>) {
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

    /// vCPU `index`'s slot; when QEMU names one beyond the table, reports `VcpuRange` (with
    /// `probe`, or `u32::MAX`) and gives `None`.
    pub(crate) fn vcpu(&self, index: u32, probe: u32) -> Option<&Vcpu> {
        let v = usize::try_from(index).ok().and_then(|i| self.vcpus.get(i));
        if v.is_none() {
            self.report(PluginErrorCode::VcpuRange, index, probe, u64::from(index));
        }
        v
    }

    pub(crate) fn release_all(&self) {
        for v in &self.vcpus {
            let mut a = v.answered.lock().unwrap_or_else(|p| p.into_inner());
            *a = u64::MAX;
            v.cv.notify_all();
        }
    }

    pub(crate) fn apply_arm(&self, a: &ArmRecord) {
        let conf = ProbeConf {
            probe: a.probe,
            enabled: a.flags & ARM_ENABLED != 0,
            spec: a.spec,
        };
        let mut ids = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        // A probe id that moves to another address leaves its old place disabled.
        if let Some(old) = ids.insert(a.probe, a.addr) {
            if old != a.addr {
                if let Some(slot) = self
                    .by_addr
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&old)
                {
                    slot.set_enabled(a.probe, false);
                }
            }
        }
        drop(ids);
        let mut map = self.by_addr.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&a.addr) {
            Some(slot) => {
                let mut confs = slot.confs.write().unwrap_or_else(|p| p.into_inner());
                // Its own place, else a free one.
                let at = confs
                    .iter()
                    .position(|c| c.is_some_and(|c| c.probe == a.probe))
                    .or_else(|| confs.iter().position(Option::is_none));
                match at.and_then(|i| confs.get_mut(i)) {
                    Some(c) => *c = Some(conf),
                    None => {
                        drop(confs);
                        drop(map);
                        self.report(PluginErrorCode::AddrFull, u32::MAX, a.probe, a.addr);
                    }
                }
            }
            None => {
                let mut confs = [None; PROBES_PER_ADDR];
                confs[0] = Some(conf);
                let slot: &'static ProbeSlot = Box::leak(Box::new(ProbeSlot {
                    confs: RwLock::new(confs),
                }));
                map.insert(a.addr, slot);
                self.flush_wanted.store(true, Ordering::Release);
            }
        }
    }

    pub(crate) fn apply_disarm(&self, probe: u32) {
        self.set_enabled(probe, false);
    }

    fn set_enabled(&self, probe: u32, on: bool) {
        let ids = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = ids.get(&probe) {
            if let Some(slot) = self
                .by_addr
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(addr)
            {
                slot.set_enabled(probe, on);
            }
        }
    }

    /// One more task inside probe `window`'s window: the first arms it. Done in the hit's
    /// callback, so the probe is on before the vCPU runs on.
    pub(crate) fn open_window(&self, window: u32) {
        let mut open = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(window).or_insert(0);
        *n = n.saturating_add(1);
        if *n == 1 {
            self.set_enabled(window, true);
        }
    }

    /// One task fewer inside probe `window`'s window (its closing hit, or the host's word
    /// that it exited inside): the last disarms it. A close with none open does nothing.
    pub(crate) fn close_window(&self, window: u32) {
        let mut open = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&window) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&window);
                self.set_enabled(window, false);
            }
        }
    }

    pub(crate) fn apply_answer(&self, a: &AnswerRecord) {
        if let Some(v) = usize::try_from(a.vcpu).ok().and_then(|i| self.vcpus.get(i)) {
            let mut ans = v.answered.lock().unwrap_or_else(|p| p.into_inner());
            *ans = (*ans).max(a.seq);
            v.cv.notify_all();
        }
    }

    /// Ask QEMU to retranslate everything, from a vCPU thread, when a new address was armed.
    pub(crate) fn maybe_reset(&self) {
        if self.flush_wanted.load(Ordering::Acquire) && !self.resetting.swap(true, Ordering::AcqRel)
        {
            self.flush_wanted.store(false, Ordering::Release);
            // SAFETY: called from a plugin callback on a vCPU thread with our own plugin id;
            // `on_reset_done` is a valid callback for the whole life of the process.
            unsafe { (self.api.reset)(self.id, on_reset_done) };
        }
    }

    pub(crate) fn register_callbacks(&self) {
        // SAFETY: our plugin id and callbacks that live as long as the process.
        unsafe {
            (self.api.register_vcpu_init_cb)(self.id, on_vcpu_init);
            (self.api.register_vcpu_tb_trans_cb)(self.id, on_tb_trans);
            (self.api.register_vcpu_idle_cb)(self.id, on_vcpu_idle);
            (self.api.register_atexit_cb)(self.id, on_exit, std::ptr::null_mut());
        }
    }
}
