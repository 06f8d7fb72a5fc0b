//! Identify the running kernel from outside: wait until it has unpacked itself,
//! stop the guest once, read vCPU 0's registers, find the KASLR slides and check
//! the banner against the profile. The guest is left stopped so that probes can
//! be armed before it runs on.

use crate::banner::{self, Verdict};
use crate::watch::Kernel;
use anyhow::{bail, Context, Result};
use ornament_engine::{Engine, EngineEvent};
use ornament_images::image::files;
use ornament_introspect::profile::Profile;
use ornament_introspect::{identity, kaslr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the kernel may take to unpack itself and set up its page tables.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// The profile of an image: the one generated when it was built (its manifest
/// vouches for it).
pub fn image_profile(dir: &Path) -> Result<Profile> {
    let path = dir.join(files::PROFILE);
    Profile::load(&path).with_context(|| format!("the profile of image {}", dir.display()))
}

/// Revision of the profiles cached by [`kernel_profile`]: the generator's.
const KERNEL_PROFILE_REVISION: u32 = ornament_introspect::profile::GENERATOR_REVISION;

/// The profile of a kernel file (bzImage or ELF vmlinux) given with `--kernel`: made
/// from the file alone (its kallsyms and `.BTF`) on first use and cached under
/// `<cache root>/profiles/<SHA-256 of the file>-r<revision>.json`.
pub fn kernel_profile(kernel: &Path, cache_dir: Option<&Path>) -> Result<Profile> {
    let hash = ornament_images::cache::hash_file(kernel)
        .with_context(|| format!("kernel {}", kernel.display()))?;
    let dir = ornament_images::cache_root(cache_dir).join("profiles");
    let path = dir.join(format!("{}-r{KERNEL_PROFILE_REVISION}.json", hash.sha256));
    if path.exists() {
        match Profile::load(&path) {
            Ok(p) => return Ok(p),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached profile unusable; making it again")
            }
        }
    }
    eprintln!(
        "ornament: making the profile of {} from its kallsyms and BTF",
        kernel.display()
    );
    let p = ornament_introspect::profile::generate_from_kernel(kernel)
        .with_context(|| format!("cannot make a profile from kernel {}", kernel.display()))?
        .profile;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.{}", hash.sha256, std::process::id()));
    p.save(&tmp)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(p)
}

/// A `--system-map` given with `--kernel` must be that kernel's: its `linux_banner`
/// and `_text` must be where the kernel's profile has them.
pub fn check_system_map(map: &Path, kernel: &Path, profile: &Profile) -> Result<()> {
    let syms = ornament_introspect::symbols::SymbolTable::from_system_map(map)?;
    for name in ["_text", "linux_banner"] {
        let want = profile.symbols.get(name).copied();
        let got = syms.lookup(name);
        if got != want {
            bail!(
                "System.map {} is not of kernel {} ({}): {name} is at {} there, at {} in the kernel",
                map.display(),
                kernel.display(),
                profile.kernel.release,
                got.map_or("nowhere".into(), |g| format!("{:#x}", g.raw())),
                want.map_or("nowhere".into(), |g| format!("{:#x}", g.raw())),
            );
        }
    }
    Ok(())
}

/// Load a profile given with `--profile`.
pub fn load_profile(path: &Path) -> Result<Profile> {
    Ok(Profile::load(path)?)
}

/// Why identification found nothing.
#[derive(Debug, thiserror::Error)]
#[error("the guest ended before its kernel could be identified")]
pub struct EndedEarly;

/// Stop the guest and wait until no vCPU runs (no probe is armed yet, so nothing else
/// comes but the guest's end).
fn pause(engine: &mut dyn Engine) -> Result<()> {
    engine.pause()?;
    let begin = Instant::now();
    loop {
        match engine.next_event(Duration::from_millis(50))? {
            EngineEvent::Paused => return Ok(()),
            EngineEvent::Exited(_) => return Err(EndedEarly.into()),
            EngineEvent::Hit(_) | EngineEvent::Idle => {}
        }
        if begin.elapsed() > Duration::from_secs(10) {
            bail!("the guest did not stop within 10 s to be identified");
        }
    }
}

/// Wait for the kernel, stop the guest, and identify it. On success the guest is
/// stopped (the session resumes it once its probes are armed).
pub fn identify(
    engine: &mut dyn Engine,
    profile: Arc<Profile>,
    stop: &AtomicBool,
) -> Result<Kernel> {
    let ram = engine.memory();
    let anchors = banner::Anchors::from_profile(&profile)?;
    let begin = Instant::now();
    let mut last_err: Option<String> = None;
    // The engine starts stopped: let the kernel unpack itself.
    engine.resume()?;
    let mut rounds = 0u32;
    while begin.elapsed() < IDENTIFY_TIMEOUT {
        if stop.load(Ordering::Relaxed) {
            return Err(crate::cmd::run::Interrupted.into());
        }
        if let EngineEvent::Exited(_) = engine.next_event(Duration::from_millis(15))? {
            return Err(EndedEarly.into());
        }
        // Look for a banner elsewhere about once a second: another kernel's banner
        // means the profile is the wrong one, and the guest must not run on unobserved.
        rounds += 1;
        match banner::check(ram.as_ref(), anchors, rounds.is_multiple_of(60)) {
            Verdict::Match(_) => {}
            Verdict::Mismatch(running) => {
                let want = format!("Linux version {} ", profile.kernel.release);
                if !running.starts_with(&want) {
                    engine.stop();
                    bail!(
                        "the profile of kernel {} does not belong to the running kernel ({running})",
                        profile.kernel.release
                    );
                }
                continue;
            }
            Verdict::NotYet => continue,
        }
        // The image is unpacked; is the kernel running on its own page tables?
        pause(engine)?;
        let regs = engine.registers(0)?;
        let kernel_running = regs.rip >= 0xffff_ffff_8000_0000 || regs.cs & 3 == 3;
        if kernel_running {
            match kaslr::detect_from_regs(ram.as_ref(), &profile, &regs, None, None) {
                Ok(layout) => {
                    identity::verify_banner(ram.as_ref(), &layout, &profile)
                        .context("the profile does not belong to the running kernel")?;
                    tracing::info!(
                        virt_slide = format_args!("{:#x}", layout.virt_slide),
                        phys_slide = format_args!("{:#x}", layout.phys_slide),
                        after_ms = begin.elapsed().as_millis(),
                        "kernel identified"
                    );
                    return Ok(Kernel {
                        profile,
                        layout,
                        regs,
                    });
                }
                Err(e) => last_err = Some(e.to_string()),
            }
        }
        engine.resume()?;
        std::thread::sleep(Duration::from_millis(30));
    }
    bail!(
        "the running kernel could not be identified within {IDENTIFY_TIMEOUT:?}{}",
        last_err.map(|e| format!(": {e}")).unwrap_or_default()
    )
}
