//! KASLR: the virtual and physical slides of a running kernel, from registers and page tables.

use crate::paging::{translate, PageRoot, PagingError};
use crate::profile::{Profile, ProfileError};
use ornament_engine::{Gpa, Gva, PhysMemory, Regs};

/// Where the kernel image is linked: `__START_KERNEL_map` on x86-64. A kernel-image
/// address `v` (unslid) is at physical `v - KERNEL_MAP + phys_slide`.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// KASLR moves the kernel in steps of `CONFIG_PHYSICAL_ALIGN` (2 MiB on x86-64 distros).
pub const KASLR_ALIGN: u64 = 2 << 20;

/// Why the slides could not be found.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KaslrError {
    /// the profile lacks a symbol the detection needs
    Profile(#[from] ProfileError),
    /// virtual slide {slide:#x} is not a multiple of 2 MiB: the anchor does not match this kernel
    Unaligned {
        /// The computed slide.
        slide: u64,
    },
    /// cannot walk the kernel page tables to find the kernel's physical address
    Paging(#[from] PagingError),
    /// no 2 MiB-aligned slide maps linux_banner with this profile's release
    NoAnchor,
}

/// How a running kernel was moved from its link addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelLayout {
    /// Runtime virtual address minus link-time address of kernel-image symbols.
    pub virt_slide: u64,
    /// Runtime physical address minus link-time physical address (`phys_base`).
    pub phys_slide: u64,
}

impl KernelLayout {
    /// The layout of a kernel booted with `nokaslr`.
    pub const NONE: Self = Self {
        virt_slide: 0,
        phys_slide: 0,
    };

    /// Runtime virtual address of a kernel-image (link-time) address.
    pub fn virt(&self, link: Gva) -> Gva {
        link.wrapping_add(self.virt_slide)
    }

    /// Link-time address of a runtime kernel-image address.
    pub fn unslide(&self, runtime: Gva) -> Gva {
        runtime.wrapping_sub(self.virt_slide)
    }

    /// Physical address of a kernel-image (link-time) address, without page tables.
    pub fn phys(&self, link: Gva) -> Gpa {
        Gpa(link
            .raw()
            .wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(self.phys_slide))
    }

    /// Runtime address of profile symbol `name`.
    pub fn symbol(&self, profile: &Profile, name: &str) -> Result<Gva, ProfileError> {
        profile.symbol(name).map(|a| self.virt(a))
    }
}

/// What tells the virtual slide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor<'a> {
    /// The value of MSR_LSTAR: the runtime address of `entry_SYSCALL_64`.
    Lstar(u64),
    /// A kernel-mode stop whose rip is the runtime address of a known profile symbol
    /// (a probe hit, or the first instruction of a function).
    AtSymbol {
        /// The symbol's name in the profile.
        name: &'a str,
        /// The rip observed there.
        rip: u64,
    },
}

/// Virtual slide implied by `anchor`.
pub fn virt_slide(profile: &Profile, anchor: Anchor<'_>) -> Result<u64, KaslrError> {
    let (name, runtime) = match anchor {
        Anchor::Lstar(lstar) => ("entry_SYSCALL_64", lstar),
        Anchor::AtSymbol { name, rip } => (name, rip),
    };
    let slide = runtime.wrapping_sub(profile.symbol(name)?.raw());
    if !slide.is_multiple_of(KASLR_ALIGN) {
        return Err(KaslrError::Unaligned { slide });
    }
    Ok(slide)
}

/// Find both slides: the virtual one from `anchor`, the physical one by walking the
/// kernel page tables that `regs` (cr3, cr4) select for the slid `_text`.
pub fn detect(
    mem: &dyn PhysMemory,
    profile: &Profile,
    regs: &Regs,
    anchor: Anchor<'_>,
) -> Result<KernelLayout, KaslrError> {
    let virt_slide = virt_slide(profile, anchor)?;
    let text = profile.symbol("_text")?;
    let root = PageRoot::kernel_from_cr3(regs.cr3, regs.cr4);
    let t = translate(mem, root, text.wrapping_add(virt_slide))?;
    let phys_slide = t
        .gpa
        .raw()
        .wrapping_sub(text.raw().wrapping_sub(START_KERNEL_MAP));
    let layout = KernelLayout {
        virt_slide,
        phys_slide,
    };
    tracing::debug!(virt_slide = %format_args!("{virt_slide:#x}"), phys_slide = %format_args!("{phys_slide:#x}"), "KASLR slides found");
    Ok(layout)
}

/// Highest virtual slide KASLR can choose: the kernel image stays inside the 1 GiB
/// `[__START_KERNEL_map, __START_KERNEL_map + KERNEL_IMAGE_SIZE)` window.
pub const MAX_VIRT_SLIDE: u64 = 1 << 30;

/// Find the slides with nothing but the vCPU's page tables: try every 2 MiB-aligned
/// virtual slide, and take the one where the slid `linux_banner` is mapped and reads
/// `Linux version <release> ` of the profile's kernel. For stops at no known symbol and
/// engines that cannot read MSR_LSTAR (the QEMU gdbstub). At most 512 page walks.
pub fn detect_by_banner(
    mem: &dyn PhysMemory,
    profile: &Profile,
    regs: &Regs,
) -> Result<KernelLayout, KaslrError> {
    let banner = profile.symbol("linux_banner")?;
    let text = profile.symbol("_text")?;
    let root = PageRoot::kernel_from_cr3(regs.cr3, regs.cr4);
    let want = format!("Linux version {} ", profile.kernel.release);
    let mut buf = vec![0u8; want.len()];
    // Only when the tables themselves cannot be read is the walk's error reported.
    let mut mem_err = None;
    let mut slide = 0;
    while slide < MAX_VIRT_SLIDE {
        match translate(mem, root, banner.wrapping_add(slide)) {
            Ok(t) if mem.read_phys(t.gpa, &mut buf).is_ok() && buf == want.as_bytes() => {
                return detect(
                    mem,
                    profile,
                    regs,
                    Anchor::AtSymbol {
                        name: "_text",
                        rip: text.raw().wrapping_add(slide),
                    },
                );
            }
            Err(e @ PagingError::Mem(_)) => mem_err = Some(e),
            _ => {}
        }
        slide += KASLR_ALIGN;
    }
    Err(mem_err.map_or(KaslrError::NoAnchor, KaslrError::Paging))
}

/// Find the slides from what is at hand: `lstar` (MSR_LSTAR) when given and non-zero,
/// else a kernel-mode stop at the known symbol `at_symbol`, else [`detect_by_banner`].
pub fn detect_from_regs(
    mem: &dyn PhysMemory,
    profile: &Profile,
    regs: &Regs,
    at_symbol: Option<&str>,
    lstar: Option<u64>,
) -> Result<KernelLayout, KaslrError> {
    let anchor = match (lstar, at_symbol) {
        (Some(l), _) if l != 0 => Anchor::Lstar(l),
        (_, Some(name)) if regs.in_kernel_mode() => Anchor::AtSymbol {
            name,
            rip: regs.rip,
        },
        _ => return detect_by_banner(mem, profile, regs),
    };
    detect(mem, profile, regs, anchor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::PagingMode;
    use crate::testing::{committed_profiles, SynthConfig, SynthGuest};

    /// Run `check` on a synthetic guest of every committed profile at each paging mode and
    /// slide the tests use, with the layout it was built at.
    fn each_slid_guest(check: impl Fn(&Profile, &SynthGuest, KernelLayout)) {
        for p in committed_profiles() {
            for (mode, vs, ps) in [
                (PagingMode::Level4, 0x1e00_0000, 0x0200_0000),
                (PagingMode::Level5, 0x3a20_0000, 0x0160_0000),
                (PagingMode::Level4, 0, 0),
            ] {
                let cfg = SynthConfig {
                    mode,
                    virt_slide: vs,
                    phys_slide: ps,
                    ..SynthConfig::default()
                };
                let g = SynthGuest::new(p.clone(), cfg).expect("guest");
                let want = KernelLayout {
                    virt_slide: vs,
                    phys_slide: ps,
                };
                check(&p, &g, want);
            }
        }
    }

    #[test]
    fn slides_from_lstar_and_from_a_hit() {
        each_slid_guest(|p, g, want| {
            let entry = g.layout.virt(p.symbol("entry_SYSCALL_64").expect("sym"));
            // From user mode with LSTAR.
            let user = g.regs_user(0);
            assert_eq!(
                detect_from_regs(&g.phys.mem, p, &user, None, Some(entry.raw())).expect("lstar"),
                want
            );
            // User mode, no LSTAR: the banner scan.
            assert_eq!(
                detect_from_regs(&g.phys.mem, p, &user, Some("do_exit"), None).expect("scan"),
                want
            );
            // From a kernel-mode hit at a known symbol.
            let rip = g.layout.virt(p.symbol("do_exit").expect("sym"));
            let kregs = g.regs_kernel(1, rip);
            assert_eq!(
                detect_from_regs(&g.phys.mem, p, &kregs, Some("do_exit"), None).expect("hit"),
                want
            );
            // phys_base in guest memory agrees with the walk.
            let mut b = [0u8; 8];
            ornament_engine::PhysMemory::read_phys(
                &g.phys.mem,
                want.phys(p.symbol("phys_base").expect("sym")),
                &mut b,
            )
            .expect("read");
            assert_eq!(u64::from_le_bytes(b), want.phys_slide);
        });
    }

    #[test]
    fn slides_by_banner_scan() {
        each_slid_guest(|p, g, want| {
            assert_eq!(
                detect_by_banner(&g.phys.mem, p, &g.regs_user(1)).expect("scan"),
                want
            );
        });
        // Another kernel's profile finds nothing.
        let [p61, mut p612] = <[_; 2]>::try_from(committed_profiles()).expect("two");
        let g = SynthGuest::new(p61.clone(), SynthConfig::default()).expect("guest");
        p612.symbols = p61.symbols.clone();
        assert!(matches!(
            detect_by_banner(&g.phys.mem, &p612, &g.regs_kernel(0, Gva(0))),
            Err(KaslrError::NoAnchor)
        ));
        let mut far = g.regs_kernel(0, Gva(0));
        far.cr3 = 1 << 40;
        assert!(matches!(
            detect_by_banner(&g.phys.mem, &p61, &far),
            Err(KaslrError::Paging(PagingError::Mem(_)))
        ));
    }

    #[test]
    fn wrong_anchor_is_refused() {
        let p = committed_profiles().remove(0);
        let g = SynthGuest::new(p.clone(), SynthConfig::default()).expect("guest");
        let regs = g.regs_kernel(0, Gva(0));
        let rip = g.layout.virt(p.symbol("do_exit").expect("sym")).raw() + 5;
        assert!(matches!(
            detect(
                &g.phys.mem,
                &p,
                &regs,
                Anchor::AtSymbol {
                    name: "do_exit",
                    rip
                }
            ),
            Err(KaslrError::Unaligned { .. })
        ));
        assert!(matches!(
            detect(
                &g.phys.mem,
                &p,
                &regs,
                Anchor::AtSymbol {
                    name: "no_such",
                    rip
                }
            ),
            Err(KaslrError::Profile(_))
        ));
        // Aligned but wrong by 2 MiB more than the mapped image: _text is not mapped there.
        let far = Anchor::Lstar(
            g.layout
                .virt(p.symbol("entry_SYSCALL_64").expect("sym"))
                .raw()
                .wrapping_add(0x4000_0000),
        );
        assert!(matches!(
            detect(&g.phys.mem, &p, &regs, far),
            Err(KaslrError::Paging(_))
        ));
        assert_eq!(
            KernelLayout::NONE.phys(Gva(0xffff_ffff_8100_0000)),
            ornament_engine::Gpa(0x100_0000)
        );
        let l = KernelLayout {
            virt_slide: 0x200_0000,
            phys_slide: 0,
        };
        assert_eq!(
            l.unslide(l.virt(Gva(0xffff_ffff_8100_0000))),
            Gva(0xffff_ffff_8100_0000)
        );
    }
}
