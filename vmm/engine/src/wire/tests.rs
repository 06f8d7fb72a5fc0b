//! Round trips and hostile bytes for every record kind.

use super::*;

fn vals(pairs: &[(Reg, u64)]) -> [u64; Reg::COUNT] {
    let mut v = [0; Reg::COUNT];
    for (r, x) in pairs {
        v[usize::from(r.index())] = *x;
    }
    v
}

fn mems(pairs: &[(usize, u64)]) -> [u64; MAX_MEM_READS] {
    let mut v = [0; MAX_MEM_READS];
    for (i, x) in pairs {
        v[*i] = *x;
    }
    v
}

fn sample_ram() -> RamRecord {
    RamRecord {
        paging: RamPaging::Level5,
        regions: vec![
            RamRegion {
                gpa: 0,
                len: 0xc_0000,
                file_offset: 0,
            },
            RamRegion {
                gpa: 0x10_0000,
                len: 0xbff0_0000,
                file_offset: 0x10_0000,
            },
            RamRegion {
                gpa: 0x1_0000_0000,
                len: 0x4000_0000,
                file_offset: 0xc000_0000,
            },
        ],
    }
}

fn round_trip(m: Msg) {
    let bytes = m.to_bytes();
    assert_eq!(bytes.len() % 8, 0, "{m:?}");
    let h = decode_header(&bytes).expect("header");
    assert_eq!(h.len, bytes.len());
    let (back, used) = decode(&bytes).expect("decode");
    assert_eq!(used, bytes.len());
    assert_eq!(back, m);
}

fn sample_spec() -> ProbeSpec {
    let mut spec = ProbeSpec::regs(RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::GsBase]))
        .with_filter(Reg::Rsi, &[39, 62, 511, 512, u64::MAX]);
    spec.hold = true;
    spec.mem[0] = MemRead::at_reg(Reg::GsBase, 0x1fb80, 8);
    spec.mem[2] = MemRead {
        base: MemBase::Absolute,
        offset: 0xffff_ffff_8239_6960,
        len: 4,
    };
    spec.mem[15] = MemRead::at_mem(0, 0x9a0, 8);
    spec.bytes = BytesRead {
        start: 2,
        end: 15,
        max: 32 << 10,
    };
    spec
}

#[test]
fn byte_ranges_are_checked() {
    let hit = |data: Vec<u8>| {
        Msg::Hit(HitRecord {
            probe: 1,
            seq: 1,
            bytes: Some(HitBytes {
                data,
                complete: true,
            }),
            ..HitRecord::default()
        })
        .to_bytes()
    };
    let good = hit(b"abc".to_vec());
    assert!(decode(&good).is_ok());
    // The length inside says more bytes than the record holds.
    let mut b = good.clone();
    b[HIT_HEAD_LEN..HIT_HEAD_LEN + 4].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(decode(&b), Err(WireError::BadField("bytes.len")));
    // Completeness is 0 or 1.
    let mut b = good.clone();
    b[HIT_HEAD_LEN + 4] = 2;
    assert_eq!(decode(&b), Err(WireError::BadField("bytes.complete")));
    // The flag without room for the range's own header.
    let mut b = hit(vec![]);
    b.truncate(HIT_HEAD_LEN);
    b[4..8].copy_from_slice(&u32::try_from(HIT_HEAD_LEN).expect("small").to_le_bytes());
    assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
    // Arm: more than MAX_BYTES_READ, or a read index out of range.
    let past = u8::try_from(MAX_MEM_READS).expect("small");
    for (start, end, max) in [(0, 1, MAX_BYTES_READ + 1), (0, past, 8), (past, 0, 8)] {
        let spec = ProbeSpec {
            bytes: BytesRead { start, end, max },
            ..ProbeSpec::default()
        };
        let b = Msg::Arm(ArmRecord {
            probe: 1,
            addr: 0,
            flags: ARM_ENABLED,
            spec,
        })
        .to_bytes();
        assert_eq!(
            decode(&b),
            Err(WireError::BadField("bytes")),
            "{start} {end} {max}"
        );
    }
    // The range from two reads: cut at max, refused when a read failed or end < start.
    let r = BytesRead {
        start: 3,
        end: 4,
        max: 16,
    };
    let vals = |a: Option<u64>, b: Option<u64>| move |i: usize| if i == 3 { a } else { b };
    assert_eq!(r.range(vals(Some(100), Some(110))), Some((100, 10, false)));
    assert_eq!(r.range(vals(Some(100), Some(117))), Some((100, 16, true)));
    assert_eq!(r.range(vals(Some(100), Some(99))), None);
    assert_eq!(r.range(vals(None, Some(110))), None);
    assert!(!ProbeSpec::default().bytes.is_some());
    assert_eq!(BytesRead::default().range(|_| Some(1)), None);
    // start == end: a C string of `max` bytes at that read's value (the reader cuts it).
    let c = BytesRead {
        start: 2,
        end: 2,
        max: 4096,
    };
    assert_eq!(c.range(|_| Some(0x7000)), Some((0x7000, 4096, false)));
    assert_eq!(c.range(|_| None), None);
}

#[test]
fn every_kind_round_trips() {
    round_trip(Msg::Hello(Hello {
        version: WIRE_VERSION,
        pid: 1234,
        mono_ns: u64::MAX - 1,
    }));
    round_trip(Msg::Hit(HitRecord {
        flags: HIT_HELD,
        probe: 7,
        vcpu: 1,
        seq: 99,
        mono_ns: 123_456_789,
        regs: RegMask::of(&[Reg::Rax, Reg::Rip, Reg::FsBase]),
        mem_present: 0b1000_0000_0000_0101,
        mem_ok: 0b1000_0000_0000_0001,
        reg_values: vals(&[
            (Reg::Rax, 1),
            (Reg::Rip, 0xffff_ffff_810b_0de0),
            (Reg::FsBase, 3),
        ]),
        mem_values: mems(&[(0, 0xffff_8880_0123_4000), (15, 9)]),
        bytes: None,
    }));
    round_trip(Msg::Hit(HitRecord {
        seq: 1,
        ..HitRecord::default()
    }));
    // A byte range: 13 bytes (padded to 16 on the wire), an empty one, a cut one.
    for (data, complete) in [
        (b"/bin/sh\0-c\0x\0".to_vec(), true),
        (vec![], true),
        (vec![7; 4096], false),
    ] {
        round_trip(Msg::Hit(HitRecord {
            flags: HIT_BYTES,
            probe: 3,
            vcpu: 0,
            seq: 2,
            mono_ns: 5,
            regs: RegMask::of(&[Reg::Rdi]),
            mem_present: 0b11,
            mem_ok: 0b11,
            reg_values: vals(&[(Reg::Rdi, 0xffff_8880_0000_1000)]),
            mem_values: mems(&[(0, 0x7ffd_0000_0000), (1, 0x7ffd_0000_000d)]),
            bytes: Some(HitBytes { data, complete }),
        }));
    }
    round_trip(Msg::VcpuInit(VcpuInitRecord {
        vcpu: 3,
        resolved: RegMask::ALL,
        qemu_regs: 120,
    }));
    round_trip(Msg::Error(ErrorRecord {
        code: PluginErrorCode::HoldTimeout as u32,
        vcpu: 0,
        probe: 5,
        detail: 17,
    }));
    round_trip(Msg::Bye(ByeRecord {
        hits: 1 << 40,
        callback_ns: 12_345,
        mem_ns: 678,
        max_callback_ns: 900,
        stall_ns: 99_999,
    }));
    round_trip(Msg::Ram(sample_ram()));
    round_trip(Msg::Arm(ArmRecord {
        probe: 42,
        addr: 0xffff_ffff_819f_9cc0,
        flags: ARM_ENABLED,
        spec: sample_spec(),
    }));
    round_trip(Msg::Disarm(DisarmRecord { probe: 42 }));
    round_trip(Msg::CloseWindow(DisarmRecord { probe: 43 }));
    for window in [Window::Opens(7), Window::Closes] {
        round_trip(Msg::Arm(ArmRecord {
            probe: 8,
            addr: 0xffff_ffff_819f_9cc0,
            flags: 0,
            spec: ProbeSpec {
                window,
                ..sample_spec()
            },
        }));
    }
    // A window role the format does not have.
    let mut b = Msg::Arm(ArmRecord {
        probe: 8,
        addr: 0,
        flags: 0,
        spec: ProbeSpec::default(),
    })
    .to_bytes();
    let filter_row = HEADER_LEN + 24 + 16 * MAX_MEM_READS;
    b[filter_row + 3] = 3;
    assert_eq!(decode(&b), Err(WireError::BadField("window")));
    round_trip(Msg::Answer(AnswerRecord {
        vcpu: 1,
        action: 2,
        seq: 5,
    }));
    round_trip(Msg::Go);
}

#[test]
fn records_concatenate() {
    let mut buf = Vec::new();
    Msg::Go.encode(&mut buf);
    Msg::Disarm(DisarmRecord { probe: 1 }).encode(&mut buf);
    put_hit_head(
        &mut buf,
        0,
        2,
        0,
        1,
        5,
        RegMask::of(&[Reg::Rdi]),
        0,
        0,
        None,
    );
    put_hit_value(&mut buf, 0xabc);
    let mut pos = 0;
    let mut got = Vec::new();
    while pos < buf.len() {
        let (m, n) = decode(&buf[pos..]).expect("decode");
        got.push(m);
        pos += n;
    }
    assert_eq!(got.len(), 3);
    match &got[2] {
        Msg::Hit(h) => {
            assert_eq!(h.to_regs().rdi, 0xabc);
            assert_eq!(h.mem(0), None);
        }
        other => panic!("not a hit: {other:?}"),
    }
}

#[test]
fn hit_values_land_in_regs_and_mem() {
    let h = HitRecord {
        flags: 0,
        probe: 1,
        vcpu: 0,
        seq: 1,
        mono_ns: 0,
        regs: RegMask::of(&[Reg::Rsi, Reg::Cr3, Reg::KernelGsBase]),
        mem_present: 0b110,
        mem_ok: 0b100,
        reg_values: vals(&[
            (Reg::Rsi, 39),
            (Reg::Cr3, 0x1000),
            (Reg::KernelGsBase, 0xffff_8880_1fc0_0000),
        ]),
        mem_values: mems(&[(1, 11), (2, 22)]),
        bytes: None,
    };
    let r = h.to_regs();
    assert_eq!(
        (r.rsi, r.cr3, r.kernel_gs_base),
        (39, 0x1000, 0xffff_8880_1fc0_0000)
    );
    assert_eq!(h.mem(0), None);
    assert_eq!(h.mem(1), None, "present but failed");
    assert_eq!(h.mem(2), Some(22));
    assert_eq!(h.mem(9), None);
}

#[test]
fn filter_bitmap() {
    let s = sample_spec();
    assert!(s.filter_passes(39) && s.filter_passes(62) && s.filter_passes(511));
    assert!(!s.filter_passes(0) && !s.filter_passes(512) && !s.filter_passes(u64::MAX));
    assert_eq!(s.mem_count(), 3);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!(matches!(decode(&[1, 0]), Err(WireError::Short { .. })));
    let mut b = Msg::Go.to_bytes();
    b[0] = 0x77;
    b[1] = 0;
    assert_eq!(decode(&b), Err(WireError::UnknownKind(0x77)));
    let mut b = Msg::Disarm(DisarmRecord { probe: 1 }).to_bytes();
    b[4] = 24;
    assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
    let mut b = Msg::Hit(HitRecord {
        flags: 0,
        probe: 0,
        vcpu: 0,
        seq: 0,
        mono_ns: 0,
        regs: RegMask::of(&[Reg::Rax]),
        mem_present: 0,
        mem_ok: 0,
        reg_values: vals(&[(Reg::Rax, 1)]),
        mem_values: [0; MAX_MEM_READS],
        bytes: None,
    })
    .to_bytes();
    b[32] = 0b11; // mask now says two registers, length says one
    assert!(matches!(decode(&b), Err(WireError::BadLength { .. })));
    b.truncate(20);
    assert!(matches!(decode(&b), Err(WireError::Short { .. })));
    // Random bytes never panic.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2000 {
        let mut buf = Vec::new();
        for _ in 0..(x % 200) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x.to_le_bytes()[0]);
        }
        if buf.len() >= 2 {
            buf[0] = [1u8, 2, 3, 4, 5, 1, 2, 3, 4][usize::from(buf[1] % 9)];
            buf[1] = if buf[0] == 1 && x & 1 == 1 { 1 } else { 0 };
        }
        let _ = decode(&buf);
    }
}

#[test]
fn chained_reads_only_reach_back() {
    let arm = |mem15: [u8; 2]| {
        let mut b = Msg::Arm(ArmRecord {
            probe: 1,
            addr: 2,
            flags: ARM_ENABLED,
            spec: sample_spec(),
        })
        .to_bytes();
        // Read 15's base bytes: header, probe/flags/addr/regs, then 16 bytes per read.
        let at = HEADER_LEN + 24 + 16 * 15;
        b[at] = mem15[0];
        b[at + 1] = mem15[1];
        decode(&b).map(|(m, _)| m)
    };
    match arm([3, 14]) {
        Ok(Msg::Arm(a)) => assert_eq!(a.spec.mem[15].base, MemBase::Mem(14)),
        other => panic!("{other:?}"),
    }
    assert_eq!(arm([3, 15]), Err(WireError::BadField("mem.chain")));
    assert_eq!(arm([3, 200]), Err(WireError::BadField("mem.chain")));
    assert_eq!(arm([4, 0]), Err(WireError::BadField("mem.base")));
    // Read 0 cannot chain at all.
    let mut spec = sample_spec();
    spec.mem[0].base = MemBase::Mem(0);
    let b = Msg::Arm(ArmRecord {
        probe: 1,
        addr: 2,
        flags: 0,
        spec,
    })
    .to_bytes();
    assert_eq!(decode(&b), Err(WireError::BadField("mem.chain")));
}

#[test]
fn ram_record_fields_are_checked() {
    let enc = |r: &RamRecord| Msg::Ram(r.clone()).to_bytes();
    let good = sample_ram();
    assert_eq!(enc(&good).len(), RAM_LEN);
    assert_eq!(good.validate(), Ok(()));
    let bad = |f: &dyn Fn(&mut RamRecord), why: &'static str| {
        let mut r = sample_ram();
        f(&mut r);
        assert_eq!(r.validate(), Err(WireError::BadField(why)), "{r:?}");
        assert_eq!(decode(&enc(&r)), Err(WireError::BadField(why)), "{r:?}");
    };
    bad(&|r| r.regions.clear(), "ram.count");
    bad(&|r| r.regions[1].len = 0, "ram.region");
    bad(&|r| r.regions[1].gpa += 1, "ram.region");
    bad(&|r| r.regions[2].file_offset = 0x10, "ram.region");
    bad(&|r| r.regions[2].len = 0x1001, "ram.region");
    bad(&|r| r.regions[2].gpa = !0xfff_u64, "ram.region");
    bad(&|r| r.regions[2].file_offset = !0xfff_u64, "ram.region");
    bad(&|r| r.regions.swap(0, 1), "ram.order");
    bad(&|r| r.regions[1].gpa = 0x1000, "ram.order");
    // Too many regions: the encoder writes the count, the decoder refuses it.
    let mut many = sample_ram();
    many.regions = (0..9)
        .map(|i| RamRegion {
            gpa: i * 0x1000,
            len: 0x1000,
            file_offset: 0,
        })
        .collect();
    assert_eq!(many.validate(), Err(WireError::BadField("ram.count")));
    let mut b = enc(&sample_ram());
    b[HEADER_LEN] = 9;
    assert_eq!(decode(&b), Err(WireError::BadField("ram.count")));
    // Paging mode, unused slots, length.
    let mut b = enc(&sample_ram());
    b[HEADER_LEN + 4] = 3;
    assert_eq!(decode(&b), Err(WireError::BadField("ram.paging")));
    let mut b = enc(&sample_ram());
    let last = RAM_LEN - 8;
    b[last] = 1;
    assert_eq!(decode(&b), Err(WireError::BadField("ram.unused")));
    let mut b = enc(&sample_ram());
    b[4] = 200;
    assert!(matches!(
        decode(&b),
        Err(WireError::BadLength {
            expected: RAM_LEN,
            ..
        })
    ));
    b.truncate(RAM_LEN - 8);
    b[4] = u8::try_from(RAM_LEN & 0xff).expect("fits");
    assert!(matches!(decode(&b), Err(WireError::Short { .. })));
}

#[test]
fn reg_names_cover_all() {
    assert_eq!(Reg::ALL.len(), Reg::COUNT);
    for (i, r) in Reg::ALL.iter().enumerate() {
        assert_eq!(usize::from(r.index()), i);
        assert!(!r.qemu_names().is_empty());
    }
    assert_eq!(RegMask::ALL.count(), Reg::COUNT);
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "measurement"]
    fn decode_speed() {
        let regs = RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::Rsi, Reg::GsBase, Reg::Cr3]);
        let mut buf = Vec::new();
        for seq in 0..1_000_000u64 {
            put_hit_head(&mut buf, 0, 1, 0, seq, seq, regs, 0, 0, None);
            for v in 0..5 {
                put_hit_value(&mut buf, v);
            }
        }
        let t0 = std::time::Instant::now();
        let mut pos = 0;
        let mut sum = 0u64;
        while pos < buf.len() {
            let (m, n) = decode(&buf[pos..]).expect("decode");
            if let Msg::Hit(h) = m {
                sum = sum.wrapping_add(h.to_regs().rip);
            }
            pos += n;
        }
        eprintln!("decode: {:?} per record ({sum})", t0.elapsed() / 1_000_000);
    }
}
