//! `KvmEngine` through ornament's `Engine` seam, on hand-written guests: probes armed
//! by guest-virtual address, exact hit counts per vCPU, held hits answered, pause with
//! registers, the guest's end reported.

use ornament_engine::wire::ProbeSpec;
use ornament_engine::{
    Action, Engine, EngineError, EngineEvent, GuestExit, Gva, ProbeId, ProbeRequest,
};
use ornament_kvm::engine::KvmEngine;
use ornament_kvm::layout::TEST_CODE_START;
use ornament_kvm::testing::guests::{self, CALLS_FUNC_OFFSET};
use ornament_kvm::testing::kvm_usable;
use ornament_kvm::testing::TestGuest;
use ornament_kvm::trap::debugreg::DebugRegs;
use ornament_kvm::trap::patch::PatchedSites;
use ornament_kvm::trap::TrapBackend;
use ornament_test_gate::require;
use std::sync::Arc;
use std::time::Duration;

const N: u64 = 200;

/// A request for a probe at `at` (this engine holds every hit and captures nothing).
fn probe(id: u32, at: Gva) -> ProbeRequest {
    ProbeRequest {
        id: ProbeId(id),
        at,
        symbol: "func".into(),
        capture: ProbeSpec::default(),
        deny: false,
    }
}

fn count_hits(traps: Arc<dyn TrapBackend>, vcpus: u32) {
    let mut guest = TestGuest::long_mode(guests::CALLS);
    guest.regs.rcx = N;
    let m = guest.build(vcpus).expect("build");
    let mut e = KvmEngine::start(m, traps, true).expect("engine");
    assert_eq!(e.vcpu_count(), vcpus);
    let func = Gva(TEST_CODE_START.0 + CALLS_FUNC_OFFSET);
    e.arm(&probe(9, func)).expect("arm by virtual address");
    e.resume().expect("start");
    let mut counts = vec![0u64; vcpus as usize];
    let mut last_seq = None;
    loop {
        match e.next_event(Duration::from_secs(20)).expect("event") {
            EngineEvent::Hit(hit) => {
                assert_eq!(hit.probe, ProbeId(9));
                assert!(hit.held);
                assert_eq!(hit.regs.rip, func.raw(), "rip is the probe address");
                let c = &mut counts[hit.vcpu as usize];
                assert_eq!(hit.regs.rdi, N - *c, "first argument");
                assert_eq!(hit.regs.rsi, 0x100 + u64::from(hit.vcpu), "second argument");
                assert!(last_seq < Some(hit.seq), "sequence numbers increase");
                last_seq = Some(hit.seq);
                *c += 1;
                e.answer(&hit, Action::Continue).expect("answer");
            }
            EngineEvent::Exited(x) => {
                assert_eq!(x, GuestExit::PowerOff);
                break;
            }
            EngineEvent::Paused => panic!("not paused"),
            EngineEvent::Idle => panic!("no event in 20 s; counts {counts:?}"),
        }
    }
    assert_eq!(counts, vec![N; vcpus as usize]);
    assert!(matches!(
        e.next_event(Duration::from_millis(10)),
        Err(EngineError::GuestGone)
    ));
}

#[test]
fn engine_patched_sites_on_2_vcpus() {
    require!("usable /dev/kvm", kvm_usable());
    count_hits(Arc::new(PatchedSites::new()), 2);
}

#[test]
fn engine_debug_registers_on_2_vcpus() {
    require!("usable /dev/kvm", kvm_usable());
    count_hits(Arc::new(DebugRegs::new()), 2);
}

#[test]
fn engine_pauses_a_running_guest_and_reads_its_registers() {
    require!("usable /dev/kvm", kvm_usable());
    let m = TestGuest::long_mode(guests::SPIN).build(2).expect("build");
    let mut e = KvmEngine::start(m, Arc::new(PatchedSites::new()), true).expect("engine");
    e.resume().expect("run");
    std::thread::sleep(Duration::from_millis(50));
    e.pause_and_wait().expect("pause");
    for v in 0..2 {
        let r = e.registers(v).expect("registers while paused");
        assert_eq!(r.rip, TEST_CODE_START.0, "spinning on `jmp .`");
        assert_eq!(r.r15, u64::from(v));
        assert_eq!(r.cs, 0x10);
    }
    assert!(matches!(e.registers(2), Err(EngineError::NoSuchVcpu(2))));
    e.resume().expect("resume");
    assert!(matches!(
        e.next_event(Duration::from_millis(50)),
        Ok(EngineEvent::Idle)
    ));
    // Dropping the engine stops the vCPUs.
}

#[test]
fn engine_refuses_unmapped_and_unknown_probes() {
    require!("usable /dev/kvm", kvm_usable());
    let m = TestGuest::long_mode(guests::CALLS).build(1).expect("build");
    let mut e = KvmEngine::start(m, Arc::new(PatchedSites::new()), true).expect("engine");
    let err = e
        .arm(&probe(1, Gva(0xffff_8000_0000_0000)))
        .expect_err("not mapped");
    assert!(matches!(err, EngineError::Backend(_)));
    assert!(matches!(
        e.disarm(ProbeId(5)),
        Err(EngineError::NoSuchProbe(ProbeId(5)))
    ));
}

/// Deny at a function's first instruction: the engine returns from it at once with
/// `-errno` in rax, so the function's body never runs. The guest sums what `func`
/// returned over N calls and reports it: N * -errno, not the sum of the arguments.
#[test]
fn engine_denies_by_returning_from_the_function() {
    require!("usable /dev/kvm", kvm_usable());
    const ERRNO: i32 = 13;
    let mut guest = TestGuest::long_mode(guests::CALLS);
    guest.regs.rcx = N;
    let m = guest.build(1).expect("build");
    let mut e = KvmEngine::start(m, Arc::new(PatchedSites::new()), true).expect("engine");
    let func = Gva(TEST_CODE_START.0 + CALLS_FUNC_OFFSET);
    e.arm(&probe(3, func)).expect("arm");
    e.resume().expect("start");
    let mut hits = 0;
    loop {
        match e.next_event(Duration::from_secs(20)).expect("event") {
            EngineEvent::Hit(hit) => {
                hits += 1;
                e.answer(&hit, Action::DenySyscall { errno: ERRNO })
                    .expect("answer");
            }
            EngineEvent::Exited(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(hits, N);
    // The low 32 bits of the two's-complement sum.
    let sum = i64::try_from(N).expect("small") * -i64::from(ERRNO);
    let want = u32::try_from(sum.rem_euclid(1 << 32)).expect("reduced");
    assert_eq!(e.reports(), vec![want]);
}
