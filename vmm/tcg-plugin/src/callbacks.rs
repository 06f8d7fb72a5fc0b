//! The `extern "C"` callbacks QEMU calls (exec, translation, vCPU init and idle, reset done,
//! exit), each run under [`guarded`] so that no panic unwinds into QEMU.

use crate::ffi::{self, Insn, PluginId, Tb};
use crate::hit::on_hit;
use crate::state::{ProbeSlot, STATE};
use ornament_engine::wire::{ByeRecord, Msg, PluginErrorCode, Reg, RegMask, VcpuInitRecord};
use std::collections::HashMap;
use std::ffi::{c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

/// Run `f` and turn a panic into an error record (never unwinds into QEMU).
pub(crate) fn guarded(vcpu: u32, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        let _ = catch_unwind(|| {
            if let Some(s) = STATE.get() {
                s.report(PluginErrorCode::Panic, vcpu, u32::MAX, 0);
            }
        });
    }
}

pub(crate) extern "C" fn on_exec(vcpu_index: c_uint, udata: *mut c_void) {
    guarded(vcpu_index, || {
        // SAFETY: `udata` is a `&'static ProbeSlot` we leaked in `apply_arm` and passed at
        // registration; slots are never freed.
        let slot = unsafe { &*(udata as *const ProbeSlot) };
        on_hit(vcpu_index, slot);
    });
}

pub(crate) extern "C" fn on_tb_trans(_id: PluginId, tb: *mut Tb) {
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

pub(crate) extern "C" fn on_vcpu_init(_id: PluginId, vcpu_index: c_uint) {
    guarded(vcpu_index, || {
        let Some(s) = STATE.get() else { return };
        let Some(v) = s.vcpu(vcpu_index, u32::MAX) else {
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

pub(crate) extern "C" fn on_vcpu_idle(_id: PluginId, vcpu_index: c_uint) {
    guarded(vcpu_index, || {
        if let Some(s) = STATE.get() {
            s.maybe_reset();
        }
    });
}

pub(crate) extern "C" fn on_reset_done(_id: PluginId) {
    guarded(u32::MAX, || {
        let Some(s) = STATE.get() else { return };
        s.register_callbacks();
        s.resetting.store(false, Ordering::Release);
    });
}

pub(crate) extern "C" fn on_exit(_id: PluginId, _udata: *mut c_void) {
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
