//! The link against a fake plugin on a socket pair: handshake, hits, answers, arming,
//! the RAM record, bad input, and the deny path over synthetic guest memory.

use super::*;
use ornament_engine::wire::Reg;
use ornament_engine::wire::{put_hit_head, put_hit_value, Hello, HIT_HELD};
use ornament_engine::SliceMemory;
use ornament_engine::{Gpa, PhysMemory};
use std::sync::Arc;

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
