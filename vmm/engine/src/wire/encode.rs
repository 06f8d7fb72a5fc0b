//! Records to bytes: [`Msg::encode`] and the hit-record pieces the plugin writes in place.

use super::{
    FilterOn, MemBase, Msg, MsgKind, RamPaging, RegMask, Window, ARM_LEN, HIT_BYTES, HIT_HEAD_LEN,
    MAX_RAM_REGIONS, RAM_LEN,
};

fn put_header(out: &mut Vec<u8>, kind: MsgKind, flags: u16, len: usize) {
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Length of a hit record for `regs`, `mem_present` and a byte range of `bytes` bytes.
pub const fn hit_len(regs: RegMask, mem_present: u32, bytes: Option<usize>) -> usize {
    let fixed = HIT_HEAD_LEN + 8 * (regs.count() + mem_present.count_ones() as usize);
    match bytes {
        Some(n) => fixed + 8 + n.div_ceil(8) * 8,
        None => fixed,
    }
}

/// Append the head of a hit record; the caller then appends the values with
/// [`put_hit_value`] and, when `bytes` is `Some(n)`, the `n` bytes with [`put_hit_bytes`]
/// (this split lets the plugin write straight into its batch buffer).
#[allow(clippy::too_many_arguments)]
pub fn put_hit_head(
    out: &mut Vec<u8>,
    flags: u16,
    probe: u32,
    vcpu: u32,
    seq: u64,
    mono_ns: u64,
    regs: RegMask,
    mem_present: u32,
    mem_ok: u32,
    bytes: Option<usize>,
) {
    let flags = if bytes.is_some() {
        flags | HIT_BYTES
    } else {
        flags & !HIT_BYTES
    };
    put_header(out, MsgKind::Hit, flags, hit_len(regs, mem_present, bytes));
    put_u32(out, probe);
    put_u32(out, vcpu);
    put_u64(out, seq);
    put_u64(out, mono_ns);
    // The register mask (bits 0..26), then mem_present (bits 0..32) and mem_ok (32..64).
    put_u64(out, regs.0 & RegMask::ALL.0);
    put_u64(out, u64::from(mem_present) | u64::from(mem_ok) << 32);
}

/// Append one value of a hit record.
pub fn put_hit_value(out: &mut Vec<u8>, v: u64) {
    put_u64(out, v);
}

/// Append a hit record's byte range (after its values): length, completeness, the bytes,
/// zeros up to a multiple of 8.
pub fn put_hit_bytes(out: &mut Vec<u8>, data: &[u8], complete: bool) {
    put_u32(out, u32::try_from(data.len()).unwrap_or(u32::MAX));
    put_u32(out, u32::from(complete));
    out.extend_from_slice(data);
    out.resize(out.len() + data.len().div_ceil(8) * 8 - data.len(), 0);
}

impl Msg {
    /// Append the record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Msg::Hello(h) => {
                put_header(out, MsgKind::Hello, 0, 24);
                put_u32(out, h.version);
                put_u32(out, h.pid);
                put_u64(out, h.mono_ns);
            }
            Msg::Hit(h) => {
                put_hit_head(
                    out,
                    h.flags,
                    h.probe,
                    h.vcpu,
                    h.seq,
                    h.mono_ns,
                    h.regs,
                    h.mem_present,
                    h.mem_ok,
                    h.bytes.as_ref().map(|b| b.data.len()),
                );
                for r in h.regs.iter() {
                    put_u64(out, h.reg_values[usize::from(r.index())]);
                }
                for (i, v) in h.mem_values.iter().enumerate() {
                    if h.mem_present & (1 << i) != 0 {
                        put_u64(out, *v);
                    }
                }
                if let Some(b) = &h.bytes {
                    put_hit_bytes(out, &b.data, b.complete);
                }
            }
            Msg::VcpuInit(v) => {
                put_header(out, MsgKind::VcpuInit, 0, 24);
                put_u32(out, v.vcpu);
                put_u32(out, v.qemu_regs);
                put_u64(out, v.resolved.0);
            }
            Msg::Error(e) => {
                put_header(out, MsgKind::Error, 0, 32);
                put_u32(out, e.code);
                put_u32(out, e.vcpu);
                put_u32(out, e.probe);
                put_u32(out, 0);
                put_u64(out, e.detail);
            }
            Msg::Bye(b) => {
                put_header(out, MsgKind::Bye, 0, 48);
                put_u64(out, b.hits);
                put_u64(out, b.callback_ns);
                put_u64(out, b.mem_ns);
                put_u64(out, b.max_callback_ns);
                put_u64(out, b.stall_ns);
            }
            Msg::Arm(a) => {
                put_header(out, MsgKind::Arm, 0, ARM_LEN);
                put_u32(out, a.probe);
                put_u32(out, a.flags);
                put_u64(out, a.addr);
                put_u64(out, a.spec.regs.0);
                for m in &a.spec.mem {
                    let (kind, reg) = match m.base {
                        MemBase::None => (0u8, 0u8),
                        MemBase::Absolute => (1, 0),
                        MemBase::Reg(r) => (2, r.index()),
                        MemBase::Mem(j) => (3, j),
                    };
                    out.extend_from_slice(&[kind, reg, m.len, 0, 0, 0, 0, 0]);
                    put_u64(out, m.offset);
                }
                let (has, reg) = match a.spec.filter {
                    Some(FilterOn::Reg(r)) => (1u8, r.index()),
                    Some(FilterOn::Mem(j)) => (2u8, j),
                    None => (0, 0),
                };
                let hold = u8::from(a.spec.hold);
                let (window, opens) = match a.spec.window {
                    Window::None => (0u8, 0u32),
                    Window::Opens(p) => (1, p),
                    Window::Closes => (2, 0),
                };
                let o = opens.to_le_bytes();
                out.extend_from_slice(&[has, reg, hold, window, o[0], o[1], o[2], o[3]]);
                for w in &a.spec.filter_bits {
                    put_u64(out, *w);
                }
                let b = a.spec.bytes;
                out.extend_from_slice(&[b.start, b.end, 0, 0]);
                put_u32(out, b.max);
            }
            Msg::Disarm(d) => {
                put_header(out, MsgKind::Disarm, 0, 16);
                put_u32(out, d.probe);
                put_u32(out, 0);
            }
            Msg::CloseWindow(d) => {
                put_header(out, MsgKind::CloseWindow, 0, 16);
                put_u32(out, d.probe);
                put_u32(out, 0);
            }
            Msg::Answer(a) => {
                put_header(out, MsgKind::Answer, 0, 24);
                put_u32(out, a.vcpu);
                put_u32(out, a.action);
                put_u64(out, a.seq);
            }
            Msg::Go => put_header(out, MsgKind::Go, 0, 8),
            Msg::Ram(r) => {
                put_header(out, MsgKind::Ram, 0, RAM_LEN);
                put_u32(out, u32::try_from(r.regions.len()).unwrap_or(u32::MAX));
                put_u32(
                    out,
                    match r.paging {
                        RamPaging::FromCr4 => 0,
                        RamPaging::Level4 => 4,
                        RamPaging::Level5 => 5,
                    },
                );
                for i in 0..MAX_RAM_REGIONS {
                    let g = r.regions.get(i).copied().unwrap_or_default();
                    put_u64(out, g.gpa);
                    put_u64(out, g.len);
                    put_u64(out, g.file_offset);
                }
            }
        }
    }

    /// The record as a new byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.encode(&mut v);
        v
    }
}
