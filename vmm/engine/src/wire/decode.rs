//! Bytes to records: header validation and [`decode`], which checks every field it reads.

use super::{
    hit_len, AnswerRecord, ArmRecord, ByeRecord, BytesRead, DisarmRecord, ErrorRecord, FilterOn,
    Hello, HitBytes, HitRecord, MemBase, MemRead, Msg, MsgKind, ProbeSpec, RamPaging, RamRecord,
    RamRegion, Reg, RegMask, VcpuInitRecord, Window, WireError, FILTER_BITS, HEADER_LEN, HIT_BYTES,
    HIT_HEAD_LEN, MAX_BYTES_READ, MAX_MEM_READS, MAX_MEM_READ_LEN, MAX_RAM_REGIONS, MAX_RECORD_LEN,
};

/// The header of a record: its kind, flags and total length (validated against the kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Record kind.
    pub kind: MsgKind,
    /// Kind-specific flags.
    pub flags: u16,
    /// Total record length, header included.
    pub len: usize,
}

/// Decode the 8-byte header at the start of `buf`.
pub fn decode_header(buf: &[u8]) -> Result<Header, WireError> {
    let mut r = Reader::new(buf);
    let raw_kind = r.u16()?;
    let flags = r.u16()?;
    let raw_len = r.u32()?;
    let kind = MsgKind::from_raw(raw_kind)?;
    let len = usize::try_from(raw_len).map_err(|_| WireError::BadField("len"))?;
    let bad = |expected| WireError::BadLength {
        kind: raw_kind,
        len: raw_len,
        expected,
    };
    match kind.fixed_len() {
        Some(fixed) if fixed != len => return Err(bad(fixed)),
        None if !(HIT_HEAD_LEN..=MAX_RECORD_LEN).contains(&len) || len % 8 != 0 => {
            return Err(bad(HIT_HEAD_LEN))
        }
        _ => {}
    }
    Ok(Header { kind, flags, len })
}

/// Decode one record from the start of `buf`; returns it and its length.
pub fn decode(buf: &[u8]) -> Result<(Msg, usize), WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Short {
            need: HEADER_LEN,
            got: buf.len(),
        });
    }
    let h = decode_header(buf)?;
    if buf.len() < h.len {
        return Err(WireError::Short {
            need: h.len,
            got: buf.len(),
        });
    }
    let mut r = Reader::new(&buf[HEADER_LEN..h.len]);
    let msg = match h.kind {
        MsgKind::Hello => Msg::Hello(Hello {
            version: r.u32()?,
            pid: r.u32()?,
            mono_ns: r.u64()?,
        }),
        MsgKind::Hit => {
            let probe = r.u32()?;
            let vcpu = r.u32()?;
            let seq = r.u64()?;
            let mono_ns = r.u64()?;
            let regs = RegMask(r.u64()?);
            if !regs.is_valid() {
                return Err(WireError::BadField("regs"));
            }
            let masks = r.u64()?;
            let mem_present = u32::try_from(masks & 0xffff_ffff).unwrap_or(0);
            if u64::from(mem_present) >> MAX_MEM_READS != 0 {
                return Err(WireError::BadField("mem_present"));
            }
            let mem_ok = u32::try_from(masks >> 32).unwrap_or(0);
            let fixed = hit_len(regs, mem_present, None);
            let has_bytes = h.flags & HIT_BYTES != 0;
            let length_is_bad = if has_bytes {
                h.len < fixed + 8
            } else {
                h.len != fixed
            };
            if length_is_bad {
                return Err(WireError::BadLength {
                    kind: MsgKind::Hit as u16,
                    len: u32::try_from(h.len).unwrap_or(u32::MAX),
                    expected: fixed,
                });
            }
            let mut reg_values = [0u64; Reg::COUNT];
            for reg in regs.iter() {
                reg_values[usize::from(reg.index())] = r.u64()?;
            }
            let mut mem_values = [0u64; MAX_MEM_READS];
            for (i, v) in mem_values.iter_mut().enumerate() {
                if mem_present & (1 << i) != 0 {
                    *v = r.u64()?;
                }
            }
            let bytes = if has_bytes {
                let n = usize::try_from(r.u32()?).map_err(|_| WireError::BadField("bytes.len"))?;
                let complete = match r.u32()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField("bytes.complete")),
                };
                if n > MAX_BYTES_READ as usize || hit_len(regs, mem_present, Some(n)) != h.len {
                    return Err(WireError::BadField("bytes.len"));
                }
                Some(HitBytes {
                    data: r.slice(n)?.to_vec(),
                    complete,
                })
            } else {
                None
            };
            Msg::Hit(HitRecord {
                flags: h.flags,
                probe,
                vcpu,
                seq,
                mono_ns,
                regs,
                mem_present,
                mem_ok,
                reg_values,
                mem_values,
                bytes,
            })
        }
        MsgKind::VcpuInit => {
            let vcpu = r.u32()?;
            let qemu_regs = r.u32()?;
            let resolved = RegMask(r.u64()?);
            Msg::VcpuInit(VcpuInitRecord {
                vcpu,
                resolved,
                qemu_regs,
            })
        }
        MsgKind::Error => {
            let code = r.u32()?;
            let vcpu = r.u32()?;
            let probe = r.u32()?;
            let _pad = r.u32()?;
            Msg::Error(ErrorRecord {
                code,
                vcpu,
                probe,
                detail: r.u64()?,
            })
        }
        MsgKind::Bye => Msg::Bye(ByeRecord {
            hits: r.u64()?,
            callback_ns: r.u64()?,
            mem_ns: r.u64()?,
            max_callback_ns: r.u64()?,
            stall_ns: r.u64()?,
        }),
        MsgKind::Arm => {
            let probe = r.u32()?;
            let flags = r.u32()?;
            let addr = r.u64()?;
            let regs = RegMask(r.u64()?);
            if !regs.is_valid() {
                return Err(WireError::BadField("regs"));
            }
            let mut mem = [MemRead::default(); MAX_MEM_READS];
            for (i, m) in mem.iter_mut().enumerate() {
                let b = r.bytes8()?;
                let offset = r.u64()?;
                let base = match b[0] {
                    0 => MemBase::None,
                    1 => MemBase::Absolute,
                    2 => MemBase::Reg(Reg::from_index(b[1]).ok_or(WireError::BadField("mem.reg"))?),
                    // A chain only reaches back: no cycles, one pass in index order.
                    3 if usize::from(b[1]) < i => MemBase::Mem(b[1]),
                    3 => return Err(WireError::BadField("mem.chain")),
                    _ => return Err(WireError::BadField("mem.base")),
                };
                if base != MemBase::None && !(1..=MAX_MEM_READ_LEN).contains(&b[2]) {
                    return Err(WireError::BadField("mem.len"));
                }
                *m = MemRead {
                    base,
                    offset,
                    len: b[2],
                };
            }
            let f = r.bytes8()?;
            let window = match f[3] {
                0 => Window::None,
                1 => Window::Opens(u32::from_le_bytes([f[4], f[5], f[6], f[7]])),
                2 => Window::Closes,
                _ => return Err(WireError::BadField("window")),
            };
            let filter = match f[0] {
                0 => None,
                1 => Some(FilterOn::Reg(
                    Reg::from_index(f[1]).ok_or(WireError::BadField("filter.reg"))?,
                )),
                2 if usize::from(f[1]) < MAX_MEM_READS => Some(FilterOn::Mem(f[1])),
                _ => return Err(WireError::BadField("filter")),
            };
            let mut filter_bits = [0u64; FILTER_BITS / 64];
            for w in &mut filter_bits {
                *w = r.u64()?;
            }
            let b = r.bytes8()?;
            let max = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let reads = usize::from(b[0]).max(usize::from(b[1]));
            if max > MAX_BYTES_READ || (max != 0 && reads >= MAX_MEM_READS) {
                return Err(WireError::BadField("bytes"));
            }
            let bytes = BytesRead {
                start: b[0],
                end: b[1],
                max,
            };
            Msg::Arm(ArmRecord {
                probe,
                addr,
                flags,
                spec: ProbeSpec {
                    regs,
                    mem,
                    hold: f[2] != 0,
                    filter,
                    filter_bits,
                    bytes,
                    window,
                },
            })
        }
        MsgKind::Disarm => Msg::Disarm(DisarmRecord { probe: r.u32()? }),
        MsgKind::CloseWindow => Msg::CloseWindow(DisarmRecord { probe: r.u32()? }),
        MsgKind::Answer => Msg::Answer(AnswerRecord {
            vcpu: r.u32()?,
            action: r.u32()?,
            seq: r.u64()?,
        }),
        MsgKind::Go => Msg::Go,
        MsgKind::Ram => {
            let count = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            let paging = match r.u32()? {
                0 => RamPaging::FromCr4,
                4 => RamPaging::Level4,
                5 => RamPaging::Level5,
                _ => return Err(WireError::BadField("ram.paging")),
            };
            if count == 0 || count > MAX_RAM_REGIONS {
                return Err(WireError::BadField("ram.count"));
            }
            let mut regions = Vec::with_capacity(count);
            for i in 0..MAX_RAM_REGIONS {
                let g = RamRegion {
                    gpa: r.u64()?,
                    len: r.u64()?,
                    file_offset: r.u64()?,
                };
                if i < count {
                    regions.push(g);
                } else if g != RamRegion::default() {
                    return Err(WireError::BadField("ram.unused"));
                }
            }
            let rec = RamRecord { paging, regions };
            rec.validate()?;
            Msg::Ram(rec)
        }
    };
    Ok((msg, h.len))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let end = self.pos.saturating_add(N);
        let s = self.buf.get(self.pos..end).ok_or(WireError::Short {
            need: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.take::<2>().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    fn bytes8(&mut self) -> Result<[u8; 8], WireError> {
        self.take::<8>()
    }

    fn slice(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.saturating_add(n);
        let got = self.buf.get(self.pos..end).ok_or(WireError::Short {
            need: end,
            got: self.buf.len(),
        })?;
        self.pos = end;
        Ok(got)
    }
}
