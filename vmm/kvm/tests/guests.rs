//! Hand-written long-mode guests on real KVM: serial output, port-I/O exits, probe hits
//! counted exactly by each trap backend on 1 and 2 vCPUs, registers changed at a hit,
//! and the i8042 reset that ends every run.

use ornament_engine::{Gpa, Gva, PhysMemory, ProbeId};
use ornament_kvm::layout::TEST_CODE_START;
use ornament_kvm::machine::RunControl;
use ornament_kvm::support::kvm_kind;
use ornament_kvm::testing::guests::{self, calls_result, CALLS_FUNC_OFFSET};
use ornament_kvm::testing::kvm_usable;
use ornament_kvm::testing::TestGuest;
use ornament_kvm::trap::debugreg::DebugRegs;
use ornament_kvm::trap::patch::{PatchedSites, PioExitRip, OUT_LEN, PATCHED_SITE};
use ornament_kvm::trap::{Site, TrapBackend};
use ornament_kvm::vcpu::exit::StopReason;
use ornament_kvm::vcpu::{VcpuError, VcpuEvent};
use ornament_test_gate::require;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[test]
fn hello_on_serial_then_reset() {
    require!("usable /dev/kvm", kvm_usable());
    let mut m = TestGuest::long_mode(guests::HELLO).build(1).expect("build");
    let out = m.run(None, &|_, _| false, &RunControl::new()).expect("run");
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].result.as_ref().expect("clean stop"),
        &StopReason::Reset
    );
    assert_eq!(m.serial.contents(), guests::HELLO_TEXT);
    // One exit per character, plus the reset.
    assert_eq!(out[0].stats.exits, guests::HELLO_TEXT.len() as u64 + 1);
}

#[test]
fn port_io_exit_reports_a_value() {
    require!("usable /dev/kvm", kvm_usable());
    let mut m = TestGuest::long_mode(guests::REPORT)
        .build(1)
        .expect("build");
    let reports = Mutex::new(Vec::new());
    let out = m
        .run(
            None,
            &|vcpu, ev| {
                if let VcpuEvent::Report(v) = ev {
                    reports.lock().expect("lock").push((vcpu, v));
                }
                false
            },
            &RunControl::new(),
        )
        .expect("run");
    assert_eq!(
        out[0].result.as_ref().expect("clean stop"),
        &StopReason::Reset
    );
    assert_eq!(*reports.lock().expect("lock"), vec![(0, 0x1234_5678)]);
    assert_eq!(out[0].stats.exits, 2);
    // Where KVM leaves RIP at a port-I/O exit: at the reset's 2-byte `out` (VMX,
    // SVM) or after it (PVM), as `PioExitRip` says for this host.
    let regs = m.vcpus[0].fd().get_regs().expect("regs");
    let out_at = TEST_CODE_START.0 + guests::REPORT.len() as u64 - 3;
    assert_eq!(
        regs.rip,
        out_at + out_exit_offset(),
        "RIP at the reset's out on {:?}",
        kvm_kind()
    );
}

/// How far past an `out imm8, al` KVM reports RIP on this host.
fn out_exit_offset() -> u64 {
    PioExitRip::of(kvm_kind()).offset(OUT_LEN)
}

const PROBE: ProbeId = ProbeId(42);

fn func_site() -> Site {
    let at = TEST_CODE_START.0 + CALLS_FUNC_OFFSET;
    Site {
        gva: Gva(at),
        gpa: Gpa(at),
    }
}

/// Run CALLS with `n` iterations on `vcpus` vCPUs under `traps`; at each hit add
/// `rsi_delta` to RSI. Returns (hits per vCPU, reports per vCPU, rips seen at hits).
fn run_calls(
    traps: Arc<dyn TrapBackend>,
    vcpus: u32,
    n: u64,
    rsi_delta: u64,
) -> (Vec<u64>, Vec<Vec<u32>>, Vec<u64>) {
    let mut guest = TestGuest::long_mode(guests::CALLS);
    guest.regs.rcx = n;
    let mut m = guest.build(vcpus).expect("build");
    traps
        .arm(PROBE, func_site(), m.vm.memory().as_ref())
        .expect("arm");
    let hits: Vec<AtomicU64> = (0..vcpus).map(|_| AtomicU64::new(0)).collect();
    let reports = Mutex::new(vec![Vec::new(); vcpus as usize]);
    let rips = Mutex::new(Vec::new());
    let out = m
        .run(
            Some(traps.clone()),
            &|vcpu, ev| match ev {
                VcpuEvent::Hit { hit, regs, .. } => {
                    assert_eq!(hit.probe, PROBE);
                    let i = hits[vcpu as usize].fetch_add(1, Ordering::SeqCst);
                    // The arguments of this call: rdi = n - i (the loop counts down),
                    // rsi = 0x100 + vCPU index.
                    assert_eq!(regs.rdi, n - i, "rdi at hit {i} on vCPU {vcpu}");
                    assert_eq!(
                        regs.rsi,
                        0x100 + u64::from(vcpu),
                        "rsi at hit {i} on vCPU {vcpu}"
                    );
                    rips.lock().expect("lock").push(regs.rip);
                    regs.rsi += rsi_delta;
                    rsi_delta != 0
                }
                VcpuEvent::Report(v) => {
                    reports.lock().expect("lock")[vcpu as usize].push(v);
                    false
                }
            },
            &RunControl::new(),
        )
        .expect("run");
    for (i, o) in out.iter().enumerate() {
        assert_eq!(
            o.result.as_ref().expect("clean stop"),
            &StopReason::Reset,
            "vCPU {i}"
        );
        assert_eq!(o.stats.hits, n, "vCPU {i} handler hit count");
        assert_eq!(o.stats.stale_probe_exits, 0);
    }
    (
        hits.iter().map(|h| h.load(Ordering::SeqCst)).collect(),
        reports.into_inner().expect("lock"),
        rips.into_inner().expect("lock"),
    )
}

fn check_calls(traps: Arc<dyn TrapBackend>, vcpus: u32, expected_rip: u64) {
    const N: u64 = 100;
    let (hits, reports, rips) = run_calls(traps, vcpus, N, 0);
    assert_eq!(hits, vec![N; vcpus as usize]);
    let want: Vec<Vec<u32>> = (0..u64::from(vcpus))
        .map(|i| vec![calls_result(N, i, 0)])
        .collect();
    assert_eq!(reports, want);
    assert!(
        rips.iter().all(|&r| r == expected_rip),
        "rips at hits: {rips:x?}"
    );
}

#[test]
fn patched_site_counts_exactly_on_1_vcpu() {
    require!("usable /dev/kvm", kvm_usable());
    check_calls(
        Arc::new(PatchedSites::new()),
        1,
        func_site().gva.raw() + out_exit_offset(),
    );
}

#[test]
fn patched_site_counts_exactly_on_2_vcpus() {
    require!("usable /dev/kvm", kvm_usable());
    check_calls(
        Arc::new(PatchedSites::new()),
        2,
        func_site().gva.raw() + out_exit_offset(),
    );
}

#[test]
fn debug_registers_count_exactly_on_1_vcpu() {
    require!("usable /dev/kvm", kvm_usable());
    check_calls(Arc::new(DebugRegs::new()), 1, func_site().gva.raw());
}

#[test]
fn debug_registers_count_exactly_on_2_vcpus() {
    require!("usable /dev/kvm", kvm_usable());
    check_calls(Arc::new(DebugRegs::new()), 2, func_site().gva.raw());
}

#[test]
fn debug_registers_skipping_the_nop_count_exactly_on_2_vcpus() {
    require!("usable /dev/kvm", kvm_usable());
    check_calls(
        Arc::new(DebugRegs::skipping_nops()),
        2,
        func_site().gva.raw(),
    );
}

#[test]
fn host_changes_an_argument_at_the_hit() {
    require!("usable /dev/kvm", kvm_usable());
    const N: u64 = 50;
    const DELTA: u64 = 0x1000;
    for traps in [
        Arc::new(PatchedSites::new()) as Arc<dyn TrapBackend>,
        Arc::new(DebugRegs::new()),
        Arc::new(DebugRegs::skipping_nops()),
    ] {
        let kind = traps.kind();
        let (hits, reports, _) = run_calls(traps, 2, N, DELTA);
        assert_eq!(hits, vec![N, N], "{kind:?}");
        assert_eq!(
            reports,
            vec![
                vec![calls_result(N, 0, DELTA)],
                vec![calls_result(N, 1, DELTA)]
            ],
            "{kind:?}"
        );
        assert_ne!(calls_result(N, 0, DELTA), calls_result(N, 0, 0));
    }
}

#[test]
fn patch_writes_the_out_instruction_into_the_guest() {
    require!("usable /dev/kvm", kvm_usable());
    let m = TestGuest::long_mode(guests::CALLS).build(1).expect("build");
    let traps = PatchedSites::new();
    traps
        .arm(PROBE, func_site(), m.vm.memory().as_ref())
        .expect("arm");
    let mut b = [0u8; 5];
    m.vm.memory()
        .read_phys(func_site().gpa, &mut b)
        .expect("read");
    assert_eq!(b, PATCHED_SITE);
    // Arming a site that is not the fentry NOP (the loop start) is refused.
    let bad = Site {
        gva: Gva(TEST_CODE_START.0 + 3),
        gpa: Gpa(TEST_CODE_START.0 + 3),
    };
    let e = traps
        .arm(ProbeId(1), bad, m.vm.memory().as_ref())
        .expect_err("not a NOP");
    assert_eq!(
        e.to_string(),
        "probe site 0x100003 holds [48, 89, cf, be, 00], not the fentry NOP [0f, 1f, 44, 00, 00]"
    );
}

#[test]
fn host_support_reports_this_host() {
    require!("usable /dev/kvm", kvm_usable());
    let s = ornament_kvm::support::host_support();
    let json = serde_json::to_string_pretty(&s).expect("serializable");
    eprintln!("{json}");
    assert!(s.dev_kvm_present);
    assert_eq!(s.access, ornament_kvm::support::KvmAccess::Ok);
    assert_eq!(s.api_version, Some(12));
    assert!(s.missing_caps.is_empty());
    assert!(s.max_vcpus.unwrap_or(0) >= 2);
    assert_eq!(s.problem, None);
    let works = |k| s.traps.iter().find(|t| t.kind == k).map(|t| t.works);
    assert_eq!(works(ornament_kvm::trap::TrapKind::DebugRegs), Some(true));
    assert_eq!(works(ornament_kvm::trap::TrapKind::PatchedSite), Some(true));
    assert!(s.exit_round_trip_ns.is_some_and(|ns| ns > 0.0));
    if s.kind == ornament_kvm::support::KvmKind::Pvm {
        // Field notes: int3 under KVM_GUESTDBG_USE_SW_BP is an emulation failure on PVM.
        assert_eq!(works(ornament_kvm::trap::TrapKind::Int3), Some(false));
        assert!(!s.can_boot_real_kernel);
    }
}

#[test]
fn a_spinning_guest_is_stopped_from_outside() {
    require!("usable /dev/kvm", kvm_usable());
    let mut m = TestGuest::long_mode(guests::SPIN).build(2).expect("build");
    let control = RunControl::new();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(200));
            control.request_stop();
        });
        m.run(None, &|_, _| false, &control).expect("run")
    });
    for o in &out {
        assert_eq!(o.result.as_ref().expect("clean stop"), &StopReason::Stopped);
    }
}

#[test]
fn kernel_mode_int3_is_completed_by_the_vmm() {
    require!("usable /dev/kvm", kvm_usable());
    let code = guests::breakpoint_guest(TEST_CODE_START.0);
    // Without completion: PVM's emulation failure is an error naming the int3's RIP.
    let mut m = TestGuest::long_mode(&code).build(1).expect("build");
    let out = m.run(None, &|_, _| false, &RunControl::new()).expect("run");
    let emulation_failed = out[0].result.is_err();
    if let Err(e) = &out[0].result {
        let want = TEST_CODE_START.0 + guests::BREAKPOINT_INT3_OFFSET;
        assert!(
            matches!(e, VcpuError::InternalError { rip, suberror: 1, .. } if *rip == want),
            "{e:?}"
        );
    } else {
        // Hardware KVM delivers #BP itself.
        eprintln!("int3 ran natively here: {:?}", out[0].result);
    }
    // With completion: the guest's own #BP handler runs, then the code after int3.
    let mut m = TestGuest::long_mode(&code).build(1).expect("build");
    m.complete_instructions = true;
    let reports = Mutex::new(Vec::new());
    let out = m
        .run(
            None,
            &|_, ev| {
                if let VcpuEvent::Report(v) = ev {
                    reports.lock().expect("lock").push(v);
                }
                false
            },
            &RunControl::new(),
        )
        .expect("run");
    assert_eq!(
        out[0].result.as_ref().expect("clean stop"),
        &StopReason::Reset
    );
    assert_eq!(*reports.lock().expect("lock"), vec![0xb9, 0x600d]);
    assert_eq!(out[0].stats.completed, u64::from(emulation_failed));
}
