//! Is the guest running the kernel the profile describes? `linux_banner` compared.

use crate::kaslr::KernelLayout;
use crate::profile::{Profile, ProfileError};
use ornament_engine::{MemError, PhysMemory};

/// Longest banner read from guest memory.
const MAX_BANNER: usize = 512;

/// Why the guest's kernel is not the profile's.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum IdentityError {
    /// the guest runs {guest_release}, but the profile is for {profile_release}
    Mismatch {
        /// Release in the profile.
        profile_release: String,
        /// Release read from the guest's banner (or the banner's start when unparsable).
        guest_release: String,
        /// The guest's whole banner.
        guest_banner: String,
    },
    /// the profile lacks linux_banner
    Profile(#[from] ProfileError),
    /// cannot read linux_banner from guest memory
    Unreadable(#[from] MemError),
}

/// Read `linux_banner` from guest memory (physically, at the layout's physical slide)
/// and compare it with the profile: the whole banner when the profile has it, else the
/// release.
pub fn verify_banner(
    mem: &dyn PhysMemory,
    layout: &KernelLayout,
    profile: &Profile,
) -> Result<(), IdentityError> {
    let guest = read_banner(mem, layout, profile)?;
    let release = release_of(&guest);
    let ok = match &profile.kernel.banner {
        Some(b) => *b == guest,
        None => release == profile.kernel.release,
    };
    if ok {
        return Ok(());
    }
    Err(IdentityError::Mismatch {
        profile_release: profile.kernel.release.clone(),
        guest_release: if release.is_empty() {
            guest.chars().take(64).collect()
        } else {
            release.to_owned()
        },
        guest_banner: guest,
    })
}

/// The NUL-terminated `linux_banner` text of the guest (capped, lossy).
pub fn read_banner(
    mem: &dyn PhysMemory,
    layout: &KernelLayout,
    profile: &Profile,
) -> Result<String, IdentityError> {
    let gpa = layout.phys(profile.symbol("linux_banner")?);
    let mut out = Vec::new();
    // Read in small pieces so the end of RAM does not fail a short banner.
    let mut chunk = [0u8; 64];
    while out.len() < MAX_BANNER {
        let at = gpa
            .checked_add(out.len() as u64)
            .ok_or(MemError::OutOfRange { gpa, len: 64 })?;
        mem.read_phys(at, &mut chunk)?;
        if let Some(nul) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..nul]);
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn release_of(banner: &str) -> &str {
    banner
        .strip_prefix("Linux version ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{committed_profiles, SynthConfig, SynthGuest};

    #[test]
    fn banner_matches_and_mismatch_names_both() {
        let [p61, p612] = <[_; 2]>::try_from(committed_profiles()).expect("two profiles");
        let g = SynthGuest::new(p61.clone(), SynthConfig::default()).expect("guest");
        verify_banner(&g.phys.mem, &g.layout, &p61).expect("same kernel");
        let banner = read_banner(&g.phys.mem, &g.layout, &p61).expect("banner");
        assert_eq!(Some(banner.clone()), p61.kernel.banner);
        // A profile for another kernel whose linux_banner symbol sits at the same place.
        let mut other = p612.clone();
        other.symbols.insert(
            "linux_banner".into(),
            p61.symbol("linux_banner").expect("sym"),
        );
        match verify_banner(&g.phys.mem, &g.layout, &other) {
            Err(e @ IdentityError::Mismatch { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "the guest runs 6.1.0-50-cloud-amd64, but the profile is for 6.12.117+deb12-cloud-amd64"
                );
                let IdentityError::Mismatch { guest_banner, .. } = e else {
                    unreachable!()
                };
                assert_eq!(guest_banner, banner);
            }
            other => panic!("{other:?}"),
        }
        // A profile without banner text (raw BTF) compares releases only.
        let mut no_banner = p61.clone();
        no_banner.kernel.banner = None;
        verify_banner(&g.phys.mem, &g.layout, &no_banner).expect("release matches");
        no_banner.kernel.release = "6.1.0-99-cloud-amd64".into();
        assert!(matches!(
            verify_banner(&g.phys.mem, &g.layout, &no_banner),
            Err(IdentityError::Mismatch { .. })
        ));
        // Wrong physical slide: garbage or unreadable, never a panic.
        let far = crate::kaslr::KernelLayout {
            virt_slide: 0,
            phys_slide: 1 << 40,
        };
        assert!(matches!(
            verify_banner(&g.phys.mem, &far, &p61),
            Err(IdentityError::Unreadable(_))
        ));
    }
}
