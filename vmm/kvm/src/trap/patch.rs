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
/// Length of a patched site (the fentry NOP it replaces).
pub const PATCH_LEN: u64 = 5;
/// What a patched site holds: `out PROBE_PORT, al` (`e6 ef`), then `nopl (%rax)` (`0f 1f 00`).
pub const PATCHED_SITE: [u8; 5] = [0xe6, probe_port_imm8(), 0x0f, 0x1f, 0x00];

const _: () = assert!(PROBE_PORT <= 0xff, "the probe port must fit an imm8");

const fn probe_port_imm8() -> u8 {
    PROBE_PORT.to_le_bytes()[0]
}

/// Where KVM leaves RIP when a guest `out` exits to user space.
///
/// On VMX and SVM (`kvm_fast_pio` in the kernel's `arch/x86/kvm/x86.c`) RIP is still
/// AT the `out`; KVM moves it past the instruction on the next `KVM_RUN`, when user
/// space left RIP unchanged. PVM reports RIP AFTER the `out`. A patched site's hit
/// is recognised under either (see [`PatchedSites`]); this names which one a host
/// shows, for tests and `doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PioExitRip {
    /// RIP is the `out` instruction itself (VMX, SVM).
    AtInstruction,
    /// RIP is the instruction after the `out` (PVM).
    AfterInstruction,
}

impl PioExitRip {
    /// The convention of a host of `kind`: PVM reports RIP after the `out`, hardware
    /// KVM (and anything not known to be PVM) at it.
    pub fn of(kind: crate::support::KvmKind) -> Self {
        match kind {
            crate::support::KvmKind::Pvm => Self::AfterInstruction,
            _ => Self::AtInstruction,
        }
    }

    /// How far past the start of an `out` of `len` bytes the exit's RIP is.
    pub fn offset(self, len: u64) -> u64 {
        match self {
            Self::AtInstruction => 0,
            Self::AfterInstruction => len,
        }
    }
}

/// Patched sites, keyed by their address. An exit on [`PROBE_PORT`] is a site's hit
/// when its RIP is the site (the `out` itself: VMX, SVM) or the site + [`OUT_LEN`]
/// (after it: PVM). Both cannot match two sites: armed sites are at least
/// [`PATCHED_SITE`]'s length apart (arming refuses closer ones).
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
        let key = site.gva.raw();
        if key.checked_add(PATCH_LEN).is_none() {
            return Err(TrapError::BadSite(site.gva));
        }
        // A site closer than a patch's length to another would overlap it, and make
        // "RIP at the out" of one "RIP after the out" of the other.
        if sites.keys().any(|&k| k.abs_diff(key) < PATCH_LEN) {
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
        // At the `out` (VMX, SVM), else just after it (PVM).
        let found = sites
            .get(&rip)
            .or_else(|| sites.get(&rip.checked_sub(OUT_LEN)?));
        found.map(|&(probe, site)| TrapHit {
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
    fn sites_closer_than_a_patch_are_refused() {
        let mem = SliceMemory::new(0x100);
        for a in [0x10, 0x15] {
            mem.write_phys(Gpa(a), &FENTRY_NOP).expect("in range");
        }
        let p = PatchedSites::new();
        p.arm(ProbeId(1), site(0x10), &mem).expect("fentry NOP");
        assert!(matches!(
            p.arm(ProbeId(2), site(0x14), &mem),
            Err(TrapError::SiteTaken(g)) if g == site(0x14).gva
        ));
        p.arm(ProbeId(3), site(0x15), &mem)
            .expect("a patch's length away");
        // The RIP after the first site's `out` is not the second site's.
        let hit = p
            .recognise(TrapExit::ProbePort {
                rip: 0xffff_ffff_8000_0012,
            })
            .expect("first");
        assert_eq!(hit.probe, ProbeId(1));
        let hit = p
            .recognise(TrapExit::ProbePort {
                rip: 0xffff_ffff_8000_0017,
            })
            .expect("second, PVM convention");
        assert_eq!(hit.probe, ProbeId(3));
    }

    #[test]
    fn exit_rip_conventions() {
        use crate::support::KvmKind;
        assert_eq!(PioExitRip::of(KvmKind::Pvm).offset(OUT_LEN), 2);
        assert_eq!(PioExitRip::of(KvmKind::Hardware).offset(OUT_LEN), 0);
        assert_eq!(PioExitRip::of(KvmKind::Hardware), PioExitRip::AtInstruction);
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

        // RIP at the `out` (VMX, SVM) and after it (PVM) are both this site's hit;
        // one byte further is nobody's.
        let at = site(0x10).gva.raw();
        for rip in [at, at + OUT_LEN] {
            let hit = p.recognise(TrapExit::ProbePort { rip }).expect("armed");
            assert_eq!((hit.probe, hit.step_over), (ProbeId(1), None));
            assert_eq!(hit.site, site(0x10));
        }
        assert_eq!(p.recognise(TrapExit::ProbePort { rip: at + 1 }), None);
        assert_eq!(p.recognise(TrapExit::ProbePort { rip: at + 3 }), None);
        assert_eq!(p.recognise(TrapExit::ProbePort { rip: at - 1 }), None);
        let rip = at;

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
