//! Hardware breakpoints: DR0-DR3 hold addresses, DR7 enables them (execute, length 1).
//!
//! On PVM, resuming with RFLAGS.RF set fires the same breakpoint again, so a hit is
//! stepped over: disable its slot, single-step one instruction, re-enable. With
//! [`DebugRegs::skipping_nops`], a site verified to hold the 5-byte fentry NOP is
//! instead resumed at site + 5 (the NOP has no effect to emulate): one exit per hit.

use super::patch::FENTRY_NOP;
use super::{GuestDebug, Site, TrapBackend, TrapError, TrapExit, TrapHit, TrapKind};
use ornament_engine::{PhysMemory, ProbeId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Number of address breakpoint slots (DR0-DR3).
pub const SLOTS: usize = 4;
/// DR6.BS: the debug exception came from a single step.
pub const DR6_BS: u64 = 1 << 14;
/// DR7 bit 10 reads as one.
pub const DR7_FIXED_1: u64 = 1 << 10;
/// DR7.LE / GE: exact breakpoint matching (recommended with any enabled slot).
pub const DR7_LE_GE: u64 = (1 << 8) | (1 << 9);

/// DR7's local-enable bit for `slot`.
pub const fn dr7_local_enable(slot: usize) -> u64 {
    1 << (slot * 2)
}

/// DR7's R/W + LEN field for `slot` (bits 16 + 4 * slot); execute breakpoints use 0.
pub const fn dr7_rw_len_mask(slot: usize) -> u64 {
    0xf << (16 + slot * 4)
}

/// DR7 with `slot` enabled as an instruction breakpoint.
pub const fn dr7_enable(dr7: u64, slot: usize) -> u64 {
    (dr7 & !dr7_rw_len_mask(slot)) | dr7_local_enable(slot) | DR7_FIXED_1 | DR7_LE_GE
}

/// DR7 with `slot` disabled.
pub const fn dr7_disable(dr7: u64, slot: usize) -> u64 {
    dr7 & !(dr7_local_enable(slot) | (dr7_local_enable(slot) << 1))
}

/// The lowest breakpoint slot DR6 reports as hit, if any.
pub fn dr6_hit_slot(dr6: u64) -> Option<usize> {
    (0..SLOTS).find(|s| dr6 & (1 << s) != 0)
}

/// True when DR6 reports a single-step trap.
pub const fn dr6_single_step(dr6: u64) -> bool {
    dr6 & DR6_BS != 0
}

/// `KVM_GUESTDBG_*` control bits for hardware breakpoints (plus single-step when asked).
pub fn control(single_step: bool) -> u32 {
    let mut c = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
    if single_step {
        c |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
    }
    c
}

/// Up to four execute breakpoints, the same on every vCPU.
#[derive(Debug, Default)]
pub struct DebugRegs {
    /// Per slot: probe, site, and whether the site holds the fentry NOP.
    slots: RwLock<[Option<(ProbeId, Site, bool)>; SLOTS]>,
    generation: AtomicU64,
    skip_nops: bool,
}

impl DebugRegs {
    /// No breakpoints.
    pub fn new() -> Self {
        Self::default()
    }

    /// No breakpoints; hits at sites holding the fentry NOP are resumed past the NOP
    /// instead of single-stepped.
    pub fn skipping_nops() -> Self {
        Self {
            skip_nops: true,
            ..Self::default()
        }
    }

    fn debug_from(
        slots: &[Option<(ProbeId, Site, bool)>; SLOTS],
        skip: Option<usize>,
    ) -> GuestDebug {
        let mut debugreg = [0u64; 8];
        let mut dr7 = 0;
        for (i, s) in slots.iter().enumerate() {
            if let Some((_, site, _)) = s {
                debugreg[i] = site.gva.raw();
                if Some(i) != skip {
                    dr7 = dr7_enable(dr7, i);
                }
            }
        }
        debugreg[7] = dr7;
        GuestDebug {
            control: control(skip.is_some()),
            debugreg,
        }
    }
}

impl TrapBackend for DebugRegs {
    fn kind(&self) -> TrapKind {
        TrapKind::DebugRegs
    }

    fn arm(&self, probe: ProbeId, site: Site, mem: &dyn PhysMemory) -> Result<(), TrapError> {
        let is_nop = self.skip_nops && {
            let mut b = [0u8; 5];
            mem.read_phys(site.gpa, &mut b)
                .map_err(|e| TrapError::Memory(site.gpa, e))?;
            b == FENTRY_NOP
        };
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if slots.iter().flatten().any(|(p, _, _)| *p == probe) {
            return Err(TrapError::AlreadyArmed(probe));
        }
        let free = slots
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(TrapError::NoFreeSlot(site.gva))?;
        *free = Some((probe, site, is_nop));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn disarm(&self, probe: ProbeId) -> Result<(), TrapError> {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .iter_mut()
            .find(|s| matches!(s, Some((p, _, _)) if *p == probe))
            .ok_or(TrapError::NotArmed(probe))?;
        *slot = None;
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn guest_debug(&self) -> GuestDebug {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        if slots.iter().all(Option::is_none) {
            return GuestDebug::default();
        }
        Self::debug_from(&slots, None)
    }

    fn recognise(&self, exit: TrapExit) -> Option<TrapHit> {
        let TrapExit::Debug { dr6, pc } = exit else {
            return None;
        };
        // A breakpoint, not a single-step; which probe it is comes from the address
        // the vCPU stopped at (the same on VMX, SVM and PVM: an instruction breakpoint
        // is a fault, RIP is the breakpoint), not from DR6's slot: a vCPU that has not
        // reloaded its debug registers since a disarm and re-arm may have the probe
        // in another slot.
        dr6_hit_slot(dr6)?;
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .iter()
            .position(|s| matches!(s, Some((_, site, _)) if site.gva.raw() == pc))?;
        let (probe, site, is_nop) = slots[slot]?;
        Some(TrapHit {
            probe,
            site,
            step_over: (!is_nop).then(|| Self::debug_from(&slots, Some(slot))),
            skip_bytes: if is_nop { FENTRY_NOP.len() as u64 } else { 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::{Gpa, Gva, SliceMemory};

    #[test]
    fn dr7_encoding() {
        assert_eq!(dr7_enable(0, 0), 0x701);
        assert_eq!(dr7_enable(0, 3), 0x740);
        assert_eq!(dr7_enable(dr7_enable(0, 0), 1), 0x705);
        // An old R/W=write field in slot 1 is cleared when it becomes an exec breakpoint.
        assert_eq!(dr7_enable(0x0010_0000, 1), 0x704);
        assert_eq!(dr7_disable(0x705, 0), 0x704);
        assert_eq!(dr7_disable(0x706, 0), 0x704);
        assert_eq!(dr6_hit_slot(0xffff_0ff2), Some(1));
        assert_eq!(dr6_hit_slot(0xffff_4ff0), None);
        assert!(dr6_single_step(0xffff_4ff0));
        assert!(!dr6_single_step(0xffff_0ff1));
    }

    #[test]
    fn arm_recognise_step_over() {
        let regs = DebugRegs::new();
        let mem = SliceMemory::new(0);
        let site = |a| Site {
            gva: Gva(a),
            gpa: Gpa(a),
        };
        assert_eq!(regs.guest_debug(), GuestDebug::default());
        let g0 = regs.generation();
        regs.arm(ProbeId(7), site(0x1000), &mem).expect("slot 0");
        regs.arm(ProbeId(8), site(0x2000), &mem).expect("slot 1");
        assert!(regs.generation() > g0);
        let d = regs.guest_debug();
        assert_eq!(d.debugreg[..2], [0x1000, 0x2000]);
        assert_eq!(d.debugreg[7], 0x705);
        assert_eq!(d.control, control(false));
        let hit = regs
            .recognise(TrapExit::Debug {
                dr6: 0xffff_0ff2,
                pc: 0x2000,
            })
            .expect("slot 1 hit");
        assert_eq!(hit.probe, ProbeId(8));
        let step = hit.step_over.expect("hardware hits are stepped over");
        assert_eq!(step.debugreg[7], 0x701);
        assert_eq!(step.control, control(true));
        assert_eq!(
            regs.recognise(TrapExit::Debug {
                dr6: 0xffff_0ff2,
                pc: 0x2001
            }),
            None
        );
        assert_eq!(regs.recognise(TrapExit::ProbePort { rip: 0x2000 }), None);
        regs.arm(ProbeId(9), site(0x3000), &mem).expect("slot 2");
        regs.arm(ProbeId(10), site(0x4000), &mem).expect("slot 3");
        assert!(matches!(
            regs.arm(ProbeId(11), site(0x5000), &mem),
            Err(TrapError::NoFreeSlot(Gva(0x5000)))
        ));
        regs.disarm(ProbeId(7)).expect("armed");
        assert!(matches!(
            regs.disarm(ProbeId(7)),
            Err(TrapError::NotArmed(ProbeId(7)))
        ));
        assert_eq!(regs.guest_debug().debugreg[7], 0x754);
    }

    #[test]
    fn nop_sites_are_skipped_not_stepped() {
        let mem = SliceMemory::new(0x100);
        mem.write_phys(Gpa(0x10), &FENTRY_NOP).expect("in range");
        let regs = DebugRegs::skipping_nops();
        let site = |a| Site {
            gva: Gva(a),
            gpa: Gpa(a),
        };
        regs.arm(ProbeId(1), site(0x10), &mem).expect("slot 0");
        regs.arm(ProbeId(2), site(0x20), &mem).expect("slot 1");
        let hit = regs
            .recognise(TrapExit::Debug { dr6: 1, pc: 0x10 })
            .expect("hit");
        assert_eq!((hit.step_over, hit.skip_bytes), (None, 5));
        let hit = regs
            .recognise(TrapExit::Debug { dr6: 2, pc: 0x20 })
            .expect("hit");
        assert_eq!(hit.skip_bytes, 0);
        assert!(hit.step_over.is_some());
        assert!(matches!(
            regs.arm(ProbeId(3), site(0x1000), &mem),
            Err(TrapError::Memory(..))
        ));
    }
}
