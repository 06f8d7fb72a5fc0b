//! Identify the running kernel from outside: wait until it has unpacked itself,
//! stop the guest once, read vCPU 0's registers, find the KASLR slides and check
//! the banner against the profile. The guest is left stopped so that probes can
//! be armed before it runs on.

use crate::banner::{self, Verdict};
use crate::guest::GuestView;
use anyhow::{bail, Context, Result};
use ornament_introspect::profile::Profile;
use ornament_introspect::{identity, kaslr};
use ornament_qemu::QemuMachine;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the kernel may take to unpack itself and set up its page tables.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// File name of the generated profile inside an image directory; the number
/// changes whenever the generator records more, so older caches are regenerated.
pub const PROFILE_FILE: &str = "profile-r3.json";

/// The profile for an image directory: `profile.json` there, generated from the
/// image's System.map and vmlinux on first use.
pub fn image_profile(dir: &Path) -> Result<Profile> {
    let path = dir.join(PROFILE_FILE);
    if path.exists() {
        if let Ok(p) = Profile::load(&path) {
            return Ok(p);
        }
        tracing::warn!(path = %path.display(), "cached profile unusable; generating it again");
    }
    let p = ornament_introspect::profile::generate(&dir.join("System.map"), &dir.join("vmlinux"))
        .with_context(|| format!("generating the kernel profile for {}", dir.display()))?;
    let tmp = dir.join(format!(".{PROFILE_FILE}.{}", std::process::id()));
    p.save(&tmp)?;
    std::fs::rename(&tmp, &path)?;
    Ok(p)
}

/// Load a profile given with `--profile`.
pub fn load_profile(path: &Path) -> Result<Profile> {
    Ok(Profile::load(path)?)
}

/// Wait for the kernel, stop the guest, and identify it. On success the guest is
/// stopped (call `machine.resume()`).
pub fn identify(
    machine: &mut QemuMachine,
    profile: Arc<Profile>,
    stop: &AtomicBool,
) -> Result<GuestView> {
    let ram = machine.ram();
    let anchors = banner::Anchors::from_profile(&profile)?;
    let begin = Instant::now();
    let mut last_err: Option<String> = None;
    // QEMU starts stopped (-S): let the kernel unpack itself.
    machine.resume()?;
    let mut rounds = 0u32;
    while begin.elapsed() < IDENTIFY_TIMEOUT {
        if stop.load(Ordering::Relaxed) {
            return Err(crate::cmd::run::Interrupted.into());
        }
        if machine.poll_exit(Duration::from_millis(15))? {
            if let Some(why) = machine.early_end() {
                return Err(why.into());
            }
            bail!("the guest ended before its kernel could be identified");
        }
        // Look for a banner elsewhere about once a second: another kernel's banner
        // means the profile is the wrong one, and the guest must not run on unobserved.
        rounds += 1;
        match banner::check(ram.as_ref(), anchors, rounds.is_multiple_of(60)) {
            Verdict::Match(_) => {}
            Verdict::Mismatch(running) => {
                let want = format!("Linux version {} ", profile.kernel.release);
                if !running.starts_with(&want) {
                    machine.kill();
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
        machine.gdb().interrupt()?;
        let regs = machine.gdb().registers(0)?;
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
                    return Ok(GuestView {
                        ram: ram.clone(),
                        ram_for_writes: Some(ram.clone()),
                        control: Arc::default(),
                        profile,
                        layout,
                        vcpus: machine.vcpus(),
                        regs,
                    });
                }
                Err(e) => last_err = Some(e.to_string()),
            }
        }
        machine.resume()?;
        std::thread::sleep(Duration::from_millis(30));
    }
    bail!(
        "the running kernel could not be identified within {IDENTIFY_TIMEOUT:?}{}",
        last_err.map(|e| format!(": {e}")).unwrap_or_default()
    )
}
