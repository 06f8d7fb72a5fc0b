//! The arm point: where a Linux run arms its probes, seen by the VMM itself rather than
//! read off the console.
//!
//! A one-shot hardware breakpoint on [`ARM_POINT_SYMBOL`] (`kernel_execve`, resolved
//! from System.map): the kernel calls it to exec `/init` (or a usermode helper before
//! it), so it runs after the kernel has rewritten its own text (ftrace turns the
//! `call __fentry__` sites into NOPs in `start_kernel`, long before) and before any
//! user process exists. Nothing is written into the guest for it, so `quiet`,
//! `loglevel=0` or a kernel that prints nothing changes nothing.
//!
//! [`ArmPoint`] wraps the probes' trap backend: until the breakpoint fires it adds the
//! breakpoint to the backend's guest-debug setting (in a debug-register slot the
//! backend leaves free); when it fires, on the vCPU that hit it and before that vCPU
//! runs on, it runs the arming callback, drops the breakpoint (the generation moves,
//! and the run loop kicks every vCPU so halted ones reload too) and reports a hit of
//! [`ARM_POINT_PROBE`], which the exit handler swallows.

use crate::trap::debugreg::{dr6_hit_slot, dr7_enable, SLOTS};
use crate::trap::{GuestDebug, Site, TrapBackend, TrapError, TrapExit, TrapHit, TrapKind};
use ornament_engine::{Gpa, Gva, PhysMemory, ProbeId};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The kernel function whose first call arms the probes.
pub const ARM_POINT_SYMBOL: &str = "kernel_execve";

/// The probe id an arm-point hit carries; no real probe has it.
pub const ARM_POINT_PROBE: ProbeId = ProbeId(u32::MAX);

/// Added to the inner backend's generation once the arm point has fired, so every
/// vCPU reloads its debug registers without the breakpoint.
const FIRED_GENERATION: u64 = 1 << 48;

/// What runs at the arm point.
pub type ArmFn = Box<dyn FnOnce() + Send>;

/// The arm point's address in System.map text (`nokaslr`: the address the kernel runs
/// at), if the map has the symbol.
pub fn resolve(system_map: &str) -> Option<Gva> {
    crate::linux::symbol_address(system_map, ARM_POINT_SYMBOL).map(Gva)
}

/// Wrap `traps` so that `arm` runs at the arm point found in the System.map at
/// `system_map`. When there is no map, or it lacks [`ARM_POINT_SYMBOL`], `traps` and
/// `arm` come back unchanged (the caller falls back to the console) with a warning.
pub fn install(
    traps: Arc<dyn TrapBackend>,
    system_map: Option<&Path>,
    arm: ArmFn,
) -> (Arc<dyn TrapBackend>, Option<ArmFn>) {
    let text = system_map.and_then(|p| match std::fs::read_to_string(p) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "cannot read the System.map");
            None
        }
    });
    match text.as_deref().and_then(resolve) {
        Some(at) => {
            tracing::debug!(at = %at, "probes armed at the first {ARM_POINT_SYMBOL}");
            (Arc::new(ArmPoint::new(traps, at, arm)), None)
        }
        None => {
            tracing::warn!(
                "no System.map with {ARM_POINT_SYMBOL}: probes are armed at the console's `Run /init`, which `quiet` hides"
            );
            (traps, Some(arm))
        }
    }
}

/// A trap backend plus the one-shot arm-point breakpoint.
pub struct ArmPoint {
    inner: Arc<dyn TrapBackend>,
    at: Gva,
    fired: AtomicBool,
    on_fire: Mutex<Option<ArmFn>>,
}

impl std::fmt::Debug for ArmPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmPoint")
            .field("inner", &self.inner)
            .field("at", &self.at)
            .field("fired", &self.fired)
            .finish_non_exhaustive()
    }
}

impl ArmPoint {
    /// `inner`, with `arm` to run when a vCPU first reaches `at`.
    pub fn new(inner: Arc<dyn TrapBackend>, at: Gva, arm: ArmFn) -> Self {
        Self {
            inner,
            at,
            fired: AtomicBool::new(false),
            on_fire: Mutex::new(Some(arm)),
        }
    }

    /// True once a vCPU has reached the arm point.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// `base` plus the arm-point breakpoint in its first free slot (`base` unchanged
    /// when all four are taken: the caller's backend then cannot share, and the
    /// breakpoint is missing, which [`ArmPoint::guest_debug`] logs).
    fn with_breakpoint(&self, mut base: GuestDebug) -> GuestDebug {
        let used = |slot: usize| base.debugreg[7] & (0b11 << (slot * 2)) != 0;
        let Some(slot) = (0..SLOTS).find(|&s| !used(s)) else {
            tracing::warn!("no free debug register for the arm point");
            return base;
        };
        base.debugreg[slot] = self.at.raw();
        base.debugreg[7] = dr7_enable(base.debugreg[7], slot);
        base.control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        base
    }
}

impl TrapBackend for ArmPoint {
    fn kind(&self) -> TrapKind {
        self.inner.kind()
    }

    fn arm(&self, probe: ProbeId, site: Site, mem: &dyn PhysMemory) -> Result<(), TrapError> {
        self.inner.arm(probe, site, mem)
    }

    fn disarm(&self, probe: ProbeId) -> Result<(), TrapError> {
        self.inner.disarm(probe)
    }

    fn generation(&self) -> u64 {
        let fired = if self.fired() { FIRED_GENERATION } else { 0 };
        self.inner.generation().wrapping_add(fired)
    }

    fn guest_debug(&self) -> GuestDebug {
        let base = self.inner.guest_debug();
        if self.fired() {
            base
        } else {
            self.with_breakpoint(base)
        }
    }

    fn recognise(&self, exit: TrapExit) -> Option<TrapHit> {
        if let TrapExit::Debug { dr6, pc } = exit {
            if pc == self.at.raw() && dr6_hit_slot(dr6).is_some() {
                // Arm on the first arrival only; a vCPU that still had the breakpoint
                // loaded may arrive later and is let through.
                if !self.fired.swap(true, Ordering::SeqCst) {
                    let arm = self
                        .on_fire
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(arm) = arm {
                        arm();
                    }
                }
                return Some(TrapHit {
                    probe: ARM_POINT_PROBE,
                    site: Site {
                        gva: self.at,
                        gpa: Gpa(self.at.raw().wrapping_sub(crate::linux::KERNEL_MAP_START)),
                    },
                    step_over: None,
                    skip_bytes: 0,
                });
            }
        }
        self.inner.recognise(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trap::debugreg::DebugRegs;
    use crate::trap::patch::{PatchedSites, FENTRY_NOP, PATCHED_SITE};
    use ornament_engine::SliceMemory;
    use std::sync::atomic::AtomicU32;

    const MAP: &str = "ffffffff81000000 T _text\n\
                       ffffffff813541e0 T kernel_execve\n\
                       ffffffff816edd10 T proc_fork_connector\n";
    const AT: u64 = 0xffff_ffff_8135_41e0;

    fn dr6_slot(slot: usize) -> u64 {
        0xffff_0ff0 | (1 << slot)
    }

    #[test]
    fn resolves_the_symbol_from_system_map() {
        assert_eq!(resolve(MAP), Some(Gva(AT)));
        assert_eq!(resolve("ffffffff81000000 T _text\n"), None);
    }

    #[test]
    fn no_map_falls_back_to_the_console() {
        let (_, arm) = install(Arc::new(PatchedSites::new()), None, Box::new(|| {}));
        assert!(arm.is_some(), "the arming callback comes back");
        let dir = tempfile::tempdir().expect("tmp");
        let map = dir.path().join("System.map");
        std::fs::write(&map, MAP).expect("write");
        let (t, arm) = install(Arc::new(PatchedSites::new()), Some(&map), Box::new(|| {}));
        assert!(arm.is_none(), "taken by the arm point");
        assert_eq!(t.guest_debug().debugreg[0], AT);
    }

    #[test]
    fn fires_once_arms_and_drops_its_breakpoint() {
        let mem = Arc::new(SliceMemory::new(0x1000));
        mem.write_phys(Gpa(0x100), &FENTRY_NOP).expect("in range");
        let patched = Arc::new(PatchedSites::new());
        let calls = Arc::new(AtomicU32::new(0));
        let (p2, m2, c2) = (patched.clone(), mem.clone(), calls.clone());
        let site = Site {
            gva: Gva(0xffff_ffff_8000_0100),
            gpa: Gpa(0x100),
        };
        let ap = ArmPoint::new(
            patched,
            Gva(AT),
            Box::new(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                p2.arm(ProbeId(0), site, m2.as_ref()).expect("arm");
            }),
        );
        // Before: only the breakpoint, in slot 0, with hardware breakpoints on.
        let d = ap.guest_debug();
        assert_eq!(d.debugreg[0], AT);
        assert_eq!(d.debugreg[7], dr7_enable(0, 0));
        assert_eq!(
            d.control,
            kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP
        );
        let g0 = ap.generation();
        // A single-step exit at the address is not the arm point.
        let step = TrapExit::Debug {
            dr6: 0xffff_4ff0,
            pc: AT,
        };
        assert_eq!(ap.recognise(step), None);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // The breakpoint: armed once, the probe's site patched.
        let hit = TrapExit::Debug {
            dr6: dr6_slot(0),
            pc: AT,
        };
        let h = ap.recognise(hit).expect("arm point");
        assert_eq!(
            (h.probe, h.site.gva, h.step_over),
            (ARM_POINT_PROBE, Gva(AT), None)
        );
        assert!(ap.fired());
        let mut b = [0u8; 5];
        mem.read_phys(Gpa(0x100), &mut b).expect("in range");
        assert_eq!(b, PATCHED_SITE);
        assert_ne!(ap.generation(), g0, "vCPUs must reload");
        assert_eq!(
            ap.guest_debug(),
            GuestDebug::default(),
            "breakpoint dropped"
        );
        // A late arrival (another vCPU's stale breakpoint) does not arm again.
        assert_eq!(ap.recognise(hit).map(|h| h.probe), Some(ARM_POINT_PROBE));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The probe's own exits go to the inner backend (RIP at the `out`).
        let h = ap
            .recognise(TrapExit::ProbePort {
                rip: site.gva.raw(),
            })
            .expect("probe");
        assert_eq!(h.probe, ProbeId(0));
    }

    #[test]
    fn takes_a_slot_the_backend_leaves_free() {
        let mem = SliceMemory::new(0x1000);
        let regs = Arc::new(DebugRegs::new());
        let s = |a: u64| Site {
            gva: Gva(0x1000 + a),
            gpa: Gpa(a),
        };
        regs.arm(ProbeId(1), s(0), &mem).expect("slot 0");
        regs.arm(ProbeId(2), s(8), &mem).expect("slot 1");
        let ap = ArmPoint::new(regs, Gva(AT), Box::new(|| {}));
        let d = ap.guest_debug();
        assert_eq!(d.debugreg[..3], [0x1000, 0x1008, AT]);
        assert_eq!(
            d.debugreg[7],
            dr7_enable(dr7_enable(dr7_enable(0, 0), 1), 2)
        );
        // The backend's own hit is still its own.
        let h = ap
            .recognise(TrapExit::Debug {
                dr6: dr6_slot(1),
                pc: 0x1008,
            })
            .expect("probe 2");
        assert_eq!(h.probe, ProbeId(2));
    }
}
