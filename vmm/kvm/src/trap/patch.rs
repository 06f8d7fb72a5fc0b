//! Patched probe sites: a verified 5-byte fentry NOP becomes `out PROBE_PORT, al` + a
//! 3-byte NOP. Every pass through the site exits to the VMM on [`PROBE_PORT`]; the guest
//! then runs on at the next instruction by itself (no single-step), on any number of
//! vCPUs at once. The original bytes are never put back: a disarmed site still exits,
//! and the exit is ignored.

use super::{GuestDebug, Site, TrapBackend, TrapError, TrapExit, TrapHit, TrapKind};
use crate::layout::PROBE_PORT;
use ornament_engine::{PhysMemory, ProbeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// The 5-byte NOP (`nopl 0x0(%rax,%rax,1)`) the kernel leaves at each fentry site.
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// Length of the `out imm8, al` instruction that starts a patched site.
pub const OUT_LEN: u64 = 2;
/// What a patched site holds: `out PROBE_PORT, al` (`e6 ef`), then `nopl (%rax)` (`0f 1f 00`).
pub const PATCHED_SITE: [u8; 5] = [0xe6, probe_port_imm8(), 0x0f, 0x1f, 0x00];

const _: () = assert!(PROBE_PORT <= 0xff, "the probe port must fit an imm8");

const fn probe_port_imm8() -> u8 {
    PROBE_PORT.to_le_bytes()[0]
}

/// How far past the site RIP is when its `out` exits to the VMM.
///
/// Measured on PVM (and what KVM does on VMX/SVM with `kvm_fast_pio` since Linux 5.x
/// for `out`): the exit reports RIP after the 2-byte `out`, so a hit's RIP is
/// site + 2; writing the registers back unchanged through SYNC_REGS resumes at the
/// 3-byte NOP. The KVM tests assert it and the self-test in `support` re-checks it on
/// the running host.
pub const EXIT_RIP_OFFSET: u64 = OUT_LEN;

/// Patched sites, keyed by the RIP their exit reports.
#[derive(Debug, Default)]
pub struct PatchedSites {
    sites: RwLock<HashMap<u64, (ProbeId, Site)>>,
    /// Sites patched once and never restored (gpa -> gva), armed or not.
    patched: RwLock<HashMap<u64, u64>>,
    generation: AtomicU64,
}

impl PatchedSites {
    /// No sites.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many sites hold the patch (armed or not).
    pub fn patched_count(&self) -> usize {
        self.patched.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl TrapBackend for PatchedSites {
    fn kind(&self) -> TrapKind {
        TrapKind::PatchedSite
    }

    fn arm(&self, probe: ProbeId, site: Site, mem: &dyn PhysMemory) -> Result<(), TrapError> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        if sites.values().any(|(p, _)| *p == probe) {
            return Err(TrapError::AlreadyArmed(probe));
        }
        let key = site
            .gva
            .checked_add(EXIT_RIP_OFFSET)
            .ok_or(TrapError::BadSite(site.gva))?
            .raw();
        if sites.contains_key(&key) {
            return Err(TrapError::SiteTaken(site.gva));
        }
        let mut patched = self.patched.write().unwrap_or_else(|p| p.into_inner());
        let mut bytes = [0u8; 5];
        mem.read_phys(site.gpa, &mut bytes)
            .map_err(|e| TrapError::Memory(site.gpa, e))?;
        let ours = patched.get(&site.gpa.raw()) == Some(&site.gva.raw());
        if !(bytes == FENTRY_NOP || (ours && bytes == PATCHED_SITE)) {
            return Err(TrapError::NotFentryNop {
                gva: site.gva,
                found: bytes,
            });
        }
        if bytes == FENTRY_NOP {
            // Cross-modifying code: the caller arms while no vCPU runs this text (the
            // machine is built paused; the engine pauses the vCPUs around `arm`).
            mem.write_phys(site.gpa, &PATCHED_SITE)
                .map_err(|e| TrapError::Memory(site.gpa, e))?;
            patched.insert(site.gpa.raw(), site.gva.raw());
        }
        sites.insert(key, (probe, site));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn disarm(&self, probe: ProbeId) -> Result<(), TrapError> {
        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
        let key = sites
            .iter()
            .find(|(_, (p, _))| *p == probe)
            .map(|(k, _)| *k)
            .ok_or(TrapError::NotArmed(probe))?;
        sites.remove(&key);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn guest_debug(&self) -> GuestDebug {
        GuestDebug::default()
    }

    fn recognise(&self, exit: TrapExit) -> Option<TrapHit> {
        let TrapExit::ProbePort { rip } = exit else {
            return None;
        };
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        sites.get(&rip).map(|&(probe, site)| TrapHit {
            probe,
            site,
            step_over: None,
            skip_bytes: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ornament_engine::{Gpa, Gva, SliceMemory};

    fn site(a: u64) -> Site {
        Site {
            gva: Gva(0xffff_ffff_8000_0000 + a),
            gpa: Gpa(a),
        }
    }

    #[test]
    fn patched_bytes() {
        assert_eq!(PATCHED_SITE, [0xe6, 0xef, 0x0f, 0x1f, 0x00]);
    }

    #[test]
    fn verifies_patches_and_never_restores() {
        let mem = SliceMemory::new(0x100);
        mem.write_phys(Gpa(0x10), &FENTRY_NOP).expect("in range");
        mem.write_phys(Gpa(0x40), &[0xe8, 1, 2, 3, 4])
            .expect("in range");
        let p = PatchedSites::new();
        p.arm(ProbeId(1), site(0x10), &mem).expect("fentry NOP");
        let mut b = [0u8; 5];
        mem.read_phys(Gpa(0x10), &mut b).expect("in range");
        assert_eq!(b, PATCHED_SITE);

        let err = p
            .arm(ProbeId(2), site(0x40), &mem)
            .expect_err("a call, not the NOP");
        assert!(matches!(
            err,
            TrapError::NotFentryNop { gva, found: [0xe8, 1, 2, 3, 4] } if gva == site(0x40).gva
        ));
        assert_eq!(
            err.to_string(),
            "probe site 0xffffffff80000040 holds [e8, 01, 02, 03, 04], not the fentry NOP [0f, 1f, 44, 00, 00]"
        );
        assert!(matches!(
            p.arm(ProbeId(3), site(0xfe), &mem),
            Err(TrapError::Memory(..))
        ));

        let rip = site(0x10).gva.raw() + EXIT_RIP_OFFSET;
        let hit = p.recognise(TrapExit::ProbePort { rip }).expect("armed");
        assert_eq!((hit.probe, hit.step_over), (ProbeId(1), None));
        assert_eq!(p.recognise(TrapExit::ProbePort { rip: rip + 1 }), None);

        p.disarm(ProbeId(1)).expect("armed");
        mem.read_phys(Gpa(0x10), &mut b).expect("in range");
        assert_eq!(b, PATCHED_SITE, "never restored");
        assert_eq!(p.recognise(TrapExit::ProbePort { rip }), None);
        // Re-arming our own patched site works; a foreign patch-like site does not.
        p.arm(ProbeId(4), site(0x10), &mem).expect("our patch");
        assert_eq!(p.patched_count(), 1);
        mem.write_phys(Gpa(0x80), &PATCHED_SITE).expect("in range");
        assert!(matches!(
            p.arm(ProbeId(5), site(0x80), &mem),
            Err(TrapError::NotFentryNop { .. })
        ));
    }
}
