//! \[1\] One probe hit: registers, memory reads (page walk over the RAM file, else QEMU's
//! accessor), the byte range, the record appended to the batch, and the wait of a held hit.

use crate::ffi::{GArray, RegHandle};
use crate::guestmem::{self, CR4_LA57};
use crate::state::{mono_ns, ProbeConf, ProbeSlot, State, Vcpu, STATE};
use ornament_engine::wire::{
    self, FilterOn, HitBytes, MemBase, MemRead, PluginErrorCode, ProbeSpec, RamPaging, Reg,
    RegMask, Window, HIT_HELD, MAX_MEM_READS,
};
use std::ffi::c_uint;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Read `n` bytes (1..=8) out of a GByteArray as a little-endian value.
///
/// # Safety
/// `arr` must point to a live GByteArray.
pub(crate) unsafe fn garray_value(arr: *const GArray, n: usize) -> u64 {
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

pub(crate) fn scratch(s: &State, v: &Vcpu) -> *mut GArray {
    let p = v.scratch.load(Ordering::Relaxed);
    if !p.is_null() {
        return p;
    }
    // SAFETY: g_byte_array_new has no preconditions.
    let p = unsafe { (s.api.g_byte_array_new)() };
    v.scratch.store(p, Ordering::Relaxed);
    p
}

pub(crate) fn read_reg(s: &State, v: &Vcpu, arr: *mut GArray, reg: Reg) -> Option<u64> {
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
pub(crate) fn reg_value(
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
pub(crate) fn mem_reads(
    spec: &ProbeSpec,
    reg: &mut dyn FnMut(Reg) -> Option<u64>,
    read: &mut dyn FnMut(u64, usize) -> Option<u64>,
) -> (u32, u32, [u64; MAX_MEM_READS]) {
    let mut present = 0u32;
    let mut ok = 0u32;
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

pub(crate) enum Base {
    Unused,
    Failed,
    At(u64),
}

/// The base of read `m`: nothing, a failure (its register or earlier read failed), or a value.
pub(crate) fn chain_base(
    m: &MemRead,
    ok: u32,
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

/// The page walk over the RAM file from this hit's cr3 (and CR4.LA57 unless the host said
/// which paging the guest uses); `None` before the RAM record came or without cr3.
fn walker<'a>(
    s: &'a State,
    reg: &mut dyn FnMut(Reg) -> Option<u64>,
) -> Option<guestmem::Walker<'a>> {
    let map = s.ram.get()?;
    let cr3 = reg(Reg::Cr3)?;
    let la57 = match map.paging {
        RamPaging::Level4 => false,
        RamPaging::Level5 => true,
        RamPaging::FromCr4 => reg(Reg::Cr4)? & CR4_LA57 != 0,
    };
    Some(guestmem::Walker::new(map.ram(), cr3, la57))
}

/// Memory read `j` of `spec` alone: its base (a register, or the earlier read it chains
/// to, done first), then the read.
pub(crate) fn read_one(
    spec: &ProbeSpec,
    j: usize,
    reg: &mut dyn FnMut(Reg) -> Option<u64>,
    read: &mut dyn FnMut(u64, usize) -> Option<u64>,
) -> Option<u64> {
    let m = spec.mem.get(j)?;
    let base = match m.base {
        MemBase::None => return None,
        MemBase::Absolute => 0,
        MemBase::Reg(r) => reg(r)?,
        MemBase::Mem(k) if usize::from(k) < j => read_one(spec, usize::from(k), reg, read)?,
        MemBase::Mem(_) => return None,
    };
    read(base.wrapping_add(m.offset), usize::from(m.len.clamp(1, 8)))
}

/// A filter on memory read `j`, tested before anything else of the hit is read (only that
/// read, its chain and the registers they need): a hit it drops costs a few register
/// reads and one page walk.
fn mem_filter_passes(
    s: &State,
    v: &Vcpu,
    arr: *mut GArray,
    spec: &ProbeSpec,
    j: usize,
    last: &mut FilterRead,
) -> bool {
    let Some(&m) = spec.mem.get(j) else {
        return false;
    };
    let unchained = matches!(m.base, MemBase::Reg(_) | MemBase::Absolute);
    if let Some((read, value)) = *last {
        if unchained && read == m {
            return value.is_some_and(|x| spec.filter_passes(x));
        }
    }
    let mut fast: Option<Option<guestmem::Walker<'_>>> = None;
    let mut read = |addr: u64, len: usize| {
        fast.get_or_insert_with(|| walker(s, &mut |r| read_reg(s, v, arr, r)))
            .as_mut()
            .and_then(|w| w.read(addr, len))
            .or_else(|| qemu_read(s, arr, addr, len))
    };
    let value = read_one(spec, j, &mut |r| read_reg(s, v, arr, r), &mut read);
    if unchained {
        *last = Some((m, value));
    }
    value.is_some_and(|x| spec.filter_passes(x))
}

/// One read through QEMU's own accessor (a debug page walk: slow).
pub(crate) fn qemu_read(s: &State, arr: *mut GArray, addr: u64, len: usize) -> Option<u64> {
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
pub(crate) fn read_range(
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

/// The exec callback of a probe address: each enabled probe there, in table order, is one
/// hit (a held one waits for its answer before the next is looked at).
pub(crate) fn on_hit(vcpu_index: c_uint, slot: &'static ProbeSlot) {
    let Some(s) = STATE.get() else { return };
    s.maybe_reset();
    // A copy: the host may re-arm while a held hit waits.
    let confs = *slot.confs.read().unwrap_or_else(|p| p.into_inner());
    let mut last_filter = None;
    for conf in confs.iter().flatten().filter(|c| c.enabled) {
        hit_one(s, vcpu_index, conf, &mut last_filter);
    }
}

/// The last memory read a filter at this address tested, and its value: probes sharing an
/// address that filter on the same read (a register plus an offset: `pt_regs->orig_ax`)
/// read it once.
type FilterRead = Option<(MemRead, Option<u64>)>;

fn hit_one(s: &State, vcpu_index: c_uint, conf: &ProbeConf, last_filter: &mut FilterRead) {
    let Some(v) = s.vcpu(vcpu_index, conf.probe) else {
        return;
    };
    let arr = scratch(s, v);
    let spec = &conf.spec;
    let t_filter = mono_ns();
    // A hit the filter drops still took the guest's time: it is counted as the plugin's.
    let dropped = || {
        let took = mono_ns().saturating_sub(t_filter);
        s.callback_ns.fetch_add(took, Ordering::Relaxed);
        s.stall_ns.fetch_add(took, Ordering::Relaxed);
    };
    let mut filter_val = None;
    match spec.filter {
        Some(FilterOn::Reg(fr)) => match read_reg(s, v, arr, fr) {
            Some(x) if spec.filter_passes(x) => filter_val = Some((fr, x)),
            _ => return dropped(),
        },
        Some(FilterOn::Mem(j))
            if !mem_filter_passes(s, v, arr, spec, usize::from(j), last_filter) =>
        {
            return dropped();
        }
        Some(FilterOn::Mem(_)) | None => {}
    }
    // A hit that passed its filter opens or closes its window before the vCPU runs on.
    match spec.window {
        Window::None => {}
        Window::Opens(w) => s.open_window(w),
        Window::Closes => s.close_window(conf.probe),
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
            fast.get_or_insert_with(|| walker(s, &mut |r| reg_value(s, v, arr, spec, got, r)))
                .as_mut()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
    fn one_read_follows_its_chain_only() {
        let mut spec = ProbeSpec::regs(RegMask::NONE);
        spec.mem[0] = MemRead::at_reg(Reg::GsBase, 8, 8);
        spec.mem[1] = MemRead::at_reg(Reg::Rdi, 0x78, 8);
        spec.mem[2] = MemRead::at_mem(0, 4, 4);
        let mem: HashMap<u64, u64> = [(0x1078, 59), (0x508, 0x2000), (0x2004, 7)]
            .into_iter()
            .collect();
        let mut asked = Vec::new();
        let mut reg = |r| match r {
            Reg::Rdi => Some(0x1000),
            Reg::GsBase => Some(0x500),
            _ => None,
        };
        let mut read = |a: u64, _len: usize| {
            asked.push(a);
            mem.get(&a).copied()
        };
        assert_eq!(read_one(&spec, 1, &mut reg, &mut read), Some(59));
        assert_eq!(read_one(&spec, 2, &mut reg, &mut read), Some(7));
        assert_eq!(read_one(&spec, 3, &mut reg, &mut read), None, "unused");
        assert_eq!(asked, [0x1078, 0x508, 0x2004]);
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
