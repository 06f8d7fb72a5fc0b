//! What this host's KVM can do, for `ornament doctor`: access, kind, capabilities, the
//! trap self-test (each backend run on a tiny guest) and the measured exit cost.

use crate::machine::{MachineError, RunControl, VcpuOutcome};
use crate::testing::guests::{self, calls_result, CALLS_FUNC_OFFSET};
use crate::testing::{TestGuest, TestingError};
use crate::trap::debugreg::DebugRegs;
use crate::trap::patch::PatchedSites;
use crate::trap::{GuestDebug, Site, TrapBackend, TrapError, TrapKind};
use crate::vcpu::exit::{ExitAction, ExitCtx, ExitError, ExitStats, StopReason};
use crate::vcpu::{VcpuError, VcpuEvent};
use crate::vm::{open_kvm, VmError, KVM_API_VERSION, REQUIRED_CAPS};
use ornament_engine::{Gpa, Gva, ProbeId};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Exits timed for the round-trip figure.
pub const ROUND_TRIP_EXITS: u64 = 10_000;
/// Calls made by each backend's self-test.
pub const SELF_TEST_CALLS: u64 = 1_000;

/// Why a self-test or measurement failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SupportError {
    /// cannot set up the test guest
    Testing(#[source] TestingError),
    /// the test machine could not run
    Machine(#[source] MachineError),
    /// cannot arm the test probe
    Trap(#[source] TrapError),
    /// the test guest failed
    Vcpu(#[source] VcpuError),
    /// the test guest stopped with {0:?} instead of the i8042 reset
    WrongStop(StopReason),
    /// the probe fired {got} times for {expected} calls
    WrongCount {
        /// Calls made.
        expected: u64,
        /// Hits seen.
        got: u64,
    },
    /// the guest computed {got:#x} instead of {expected:#x}
    WrongResult {
        /// The right sum.
        expected: u32,
        /// What the guest reported.
        got: u32,
    },
    /// int3 did not end in KVM_EXIT_DEBUG at the breakpoint
    NoInt3Exit,
}

/// Whether `/dev/kvm` could be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmAccess {
    /// Opened.
    Ok,
    /// `/dev/kvm` does not exist.
    Missing,
    /// No permission (EACCES/EPERM).
    PermissionDenied,
    /// Another error (errno).
    Failed(i32),
}

/// What provides `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmKind {
    /// PVM (`kvm_pvm`): no VT-x/AMD-V; a real kernel's kernel mode is emulated, ~1000x slower.
    Pvm,
    /// Hardware virtualization (vmx or svm in /proc/cpuinfo).
    Hardware,
    /// Neither sign found.
    Unknown,
}

/// One trap backend's self-test result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrapSupport {
    /// The backend.
    pub kind: TrapKind,
    /// True when it trapped every call exactly once and the guest finished correctly.
    pub works: bool,
    /// Why not, when it does not work.
    pub reason: Option<String>,
    /// Measured cost of one hit (round trip to the VMM and back, step-over included), ns.
    pub hit_ns: Option<f64>,
}

/// What `ornament doctor` prints about KVM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostSupport {
    /// `/dev/kvm` exists.
    pub dev_kvm_present: bool,
    /// Opening it.
    pub access: KvmAccess,
    /// What serves it.
    pub kind: KvmKind,
    /// `KVM_GET_API_VERSION` (12 expected).
    pub api_version: Option<i32>,
    /// Needed capabilities KVM lacks, by name.
    pub missing_caps: Vec<&'static str>,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: Option<u32>,
    /// Whether an unmodified Linux kernel can boot at useful speed (hardware KVM only).
    pub can_boot_real_kernel: bool,
    /// Each trap backend's self-test.
    pub traps: Vec<TrapSupport>,
    /// A port-I/O exit round trip (guest -> VMM -> guest, SYNC_REGS on), ns.
    pub exit_round_trip_ns: Option<f64>,
    /// Why the VM tests could not run at all, if they could not.
    pub problem: Option<String>,
    /// PVM compatibility mode's self-test ([`crate::pvm::pvm_compat_self_test`]), on
    /// PVM hosts: can an unmodified kernel be booted here (slowly)?
    pub pvm_compat: Option<PvmCompatSupport>,
}

/// The PVM compatibility self-test's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PvmCompatSupport {
    /// True when every completion worked (int3, fwait, clac/stac, syscall entry).
    pub works: bool,
    /// Why not.
    pub reason: Option<String>,
    /// What it saw when it worked.
    pub report: Option<crate::pvm::SelfTestReport>,
}

/// Run the PVM compatibility self-test.
pub fn pvm_compat_support() -> PvmCompatSupport {
    match crate::pvm::pvm_compat_self_test() {
        Ok(r) => PvmCompatSupport {
            works: true,
            reason: None,
            report: Some(r),
        },
        Err(e) => PvmCompatSupport {
            works: false,
            reason: Some(error_chain(&e)),
            report: None,
        },
    }
}

impl HostSupport {
    /// True when KVM can run our VMM with at least one trap backend.
    pub fn usable(&self) -> bool {
        self.problem.is_none() && self.traps.iter().any(|t| t.works)
    }
}

/// Tell PVM, hardware KVM and the rest apart from `/sys/module` and `/proc/cpuinfo`.
pub fn kvm_kind() -> KvmKind {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    kvm_kind_from(Path::new("/sys/module/kvm_pvm").is_dir(), &cpuinfo)
}

/// [`kvm_kind`] over given facts.
pub fn kvm_kind_from(pvm_module: bool, cpuinfo: &str) -> KvmKind {
    if pvm_module {
        return KvmKind::Pvm;
    }
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        KvmKind::Hardware
    } else {
        KvmKind::Unknown
    }
}

/// Probe the host: open KVM, check it, run the trap self-tests, time the exits.
pub fn host_support() -> HostSupport {
    let mut s = HostSupport {
        dev_kvm_present: Path::new("/dev/kvm").exists(),
        access: KvmAccess::Ok,
        kind: kvm_kind(),
        api_version: None,
        missing_caps: Vec::new(),
        max_vcpus: None,
        can_boot_real_kernel: false,
        traps: Vec::new(),
        exit_round_trip_ns: None,
        problem: None,
        pvm_compat: None,
    };
    let kvm = match open_kvm() {
        Ok(k) => k,
        Err(e) => {
            s.access = match &e {
                VmError::NoKvm => KvmAccess::Missing,
                VmError::KvmPermission => KvmAccess::PermissionDenied,
                VmError::OpenKvm(io) => KvmAccess::Failed(io.raw_os_error().unwrap_or(0)),
                _ => KvmAccess::Failed(0),
            };
            s.problem = Some(e.to_string());
            return s;
        }
    };
    s.api_version = Some(kvm.get_api_version());
    s.max_vcpus = u32::try_from(kvm.get_max_vcpus()).ok();
    s.missing_caps = REQUIRED_CAPS
        .iter()
        .filter(|(c, _)| !kvm.check_extension(*c))
        .map(|(_, n)| *n)
        .collect();
    if s.api_version != Some(KVM_API_VERSION) {
        s.problem = Some(VmError::ApiVersion(kvm.get_api_version()).to_string());
        return s;
    }
    if let Some(name) = s.missing_caps.first() {
        s.problem = Some(VmError::MissingCap(name).to_string());
        return s;
    }
    s.can_boot_real_kernel = s.kind == KvmKind::Hardware;
    s.traps = vec![
        trap_support(TrapKind::DebugRegs, || {
            self_test_backend(Arc::new(DebugRegs::new()))
        }),
        trap_support(TrapKind::PatchedSite, || {
            self_test_backend(Arc::new(PatchedSites::new()))
        }),
        trap_support(TrapKind::Int3, || self_test_int3().map(|()| None)),
    ];
    if s.kind == KvmKind::Pvm {
        s.pvm_compat = Some(pvm_compat_support());
    }
    match measure_exit_round_trip_ns(ROUND_TRIP_EXITS) {
        Ok(ns) => s.exit_round_trip_ns = Some(ns),
        Err(e) => s.problem = Some(error_chain(&e)),
    }
    s
}

fn trap_support(
    kind: TrapKind,
    test: impl FnOnce() -> Result<Option<f64>, SupportError>,
) -> TrapSupport {
    match test() {
        Ok(hit_ns) => TrapSupport {
            kind,
            works: true,
            reason: None,
            hit_ns,
        },
        Err(e) => TrapSupport {
            kind,
            works: false,
            reason: Some(error_chain(&e)),
            hit_ns: None,
        },
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Run the CALLS guest `n` times on one vCPU under `traps` (none: plain calls), check
/// the hit count and the result, and return the wall time of the run in ns.
pub fn timed_calls(traps: Option<Arc<dyn TrapBackend>>, n: u64) -> Result<f64, SupportError> {
    let mut guest = TestGuest::long_mode(guests::CALLS);
    guest.regs.rcx = n;
    let mut m = guest.build(1).map_err(SupportError::Testing)?;
    if let Some(t) = &traps {
        let at = guest.load_addr.0 + CALLS_FUNC_OFFSET;
        let site = Site {
            gva: Gva(at),
            gpa: Gpa(at),
        };
        t.arm(ProbeId(0), site, m.vm.memory().as_ref())
            .map_err(SupportError::Trap)?;
    }
    let hits = AtomicU64::new(0);
    let report = AtomicU64::new(u64::MAX);
    let start = Instant::now();
    let mut out = m
        .run(
            traps.clone(),
            &|_, ev| {
                match ev {
                    VcpuEvent::Hit { .. } => {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    VcpuEvent::Report(v) => report.store(u64::from(v), Ordering::Relaxed),
                }
                false
            },
            &RunControl::new(),
        )
        .map_err(SupportError::Machine)?;
    let ns = start.elapsed().as_secs_f64() * 1e9;
    reset_stats(out.pop().expect("one vCPU"))?;
    let expected_hits = if traps.is_some() { n } else { 0 };
    let got = hits.load(Ordering::Relaxed);
    if got != expected_hits {
        return Err(SupportError::WrongCount {
            expected: expected_hits,
            got,
        });
    }
    let expected = calls_result(n, 0, 0);
    let got = report.load(Ordering::Relaxed);
    if got != u64::from(expected) {
        return Err(SupportError::WrongResult {
            expected,
            got: u32::try_from(got).unwrap_or(u32::MAX),
        });
    }
    Ok(ns)
}

/// Self-test one backend: exact hit count and result; returns the cost per hit in ns.
pub fn self_test_backend(traps: Arc<dyn TrapBackend>) -> Result<Option<f64>, SupportError> {
    let base = timed_calls(None, SELF_TEST_CALLS)?;
    let with = timed_calls(Some(traps), SELF_TEST_CALLS)?;
    Ok(Some(((with - base) / SELF_TEST_CALLS as f64).max(0.0)))
}

/// Does `int3` under `KVM_GUESTDBG_USE_SW_BP` reach the VMM as `KVM_EXIT_DEBUG`?
pub fn self_test_int3() -> Result<(), SupportError> {
    let guest = TestGuest::long_mode(guests::INT3);
    let mut m = guest.build(1).map_err(SupportError::Testing)?;
    let vcpu = &mut m.vcpus[0];
    vcpu.set_guest_debug(GuestDebug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP,
        debugreg: [0; 8],
    })
    .map_err(SupportError::Vcpu)?;
    let mut ctx = ExitCtx::new(m.bus.clone(), None);
    match vcpu.run_once(&mut ctx) {
        Err(VcpuError::Exit(_, ExitError::UnexpectedDebug { pc, .. }))
            if pc == guest.load_addr.0 =>
        {
            Ok(())
        }
        Err(e) => Err(SupportError::Vcpu(e)),
        Ok(ExitAction::Stop(r)) => Err(SupportError::WrongStop(r)),
        Ok(_) => Err(SupportError::NoInt3Exit),
    }
}

/// Run `n` bare port-I/O exits (to a port with no device) on one vCPU; total ns of the run.
pub fn timed_bare_exits(n: u64) -> Result<f64, SupportError> {
    let mut guest = TestGuest::long_mode(guests::BARE_EXITS);
    guest.regs.rcx = n;
    let mut m = guest.build(1).map_err(SupportError::Testing)?;
    let start = Instant::now();
    let mut out = m
        .run(None, &|_, _| false, &RunControl::new())
        .map_err(SupportError::Machine)?;
    let ns = start.elapsed().as_secs_f64() * 1e9;
    let stats = reset_stats(out.pop().expect("one vCPU"))?;
    if stats.unclaimed_pio != n {
        return Err(SupportError::WrongCount {
            expected: n,
            got: stats.unclaimed_pio,
        });
    }
    Ok(ns)
}

/// One port-I/O exit round trip in ns: the time of `2n` exits minus that of `n`, over
/// `n`, so VM setup, thread start and first-touch faults cancel out.
pub fn measure_exit_round_trip_ns(n: u64) -> Result<f64, SupportError> {
    let one = timed_bare_exits(n)?;
    let two = timed_bare_exits(2 * n)?;
    Ok(((two - one) / n as f64).max(0.0))
}

/// One probe hit in ns under a backend made by `make`: `n` calls with the probe minus
/// `n` calls without, over `n`.
pub fn measure_hit_ns(
    make: &dyn Fn() -> Arc<dyn TrapBackend>,
    n: u64,
) -> Result<f64, SupportError> {
    let base = timed_calls(None, n)?;
    let with = timed_calls(Some(make()), n)?;
    Ok(((with - base) / n as f64).max(0.0))
}

/// The one vCPU of a self-test guest must have ended by its i8042 reset; its exit counts.
fn reset_stats(o: VcpuOutcome) -> Result<ExitStats, SupportError> {
    match o.result.map_err(SupportError::Vcpu)? {
        StopReason::Reset => Ok(o.stats),
        other => Err(SupportError::WrongStop(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_facts() {
        assert_eq!(kvm_kind_from(true, "flags : fpu vmx"), KvmKind::Pvm);
        assert_eq!(
            kvm_kind_from(false, "flags\t\t: fpu vme svm sse"),
            KvmKind::Hardware
        );
        assert_eq!(kvm_kind_from(false, "flags : fpu vmxx"), KvmKind::Unknown);
        assert_eq!(kvm_kind_from(false, "model name : vmx"), KvmKind::Unknown);
    }

    #[test]
    fn access_serializes_kebab() {
        let v = serde_json::to_string(&KvmAccess::PermissionDenied).expect("json");
        assert_eq!(v, "\"permission-denied\"");
        assert_eq!(
            serde_json::to_string(&TrapKind::PatchedSite).expect("json"),
            "\"patched-site\""
        );
    }
}
