//! `ornament profile`: generate a kernel profile (symbols and struct offsets, JSON).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

/// Kernel profile commands.
#[derive(Debug, clap::Subcommand)]
pub enum ProfileCmd {
    /// Generate a kernel's profile, from its bzImage alone (`--bzimage`: symbols from the
    /// kernel's own kallsyms, struct layouts from its `.BTF`), or from its System.map and
    /// its vmlinux (ELF with a `.BTF` section, or the raw `.BTF` data); writes JSON to
    /// stdout or to -o FILE.
    Generate {
        /// The kernel file alone: a bzImage (as in Debian's linux-image package) or an
        /// ELF vmlinux; no System.map or -dbg package needed.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["system_map", "vmlinux"], required_unless_present_all = ["system_map", "vmlinux"])]
        bzimage: Option<PathBuf>,
        /// The kernel's real System.map (from its -dbg package).
        #[arg(long, value_name = "FILE", requires = "vmlinux")]
        system_map: Option<PathBuf>,
        /// The kernel's vmlinux ELF (its `.BTF` section and `linux_banner` are read),
        /// or a raw BTF file (the profile then has no banner).
        #[arg(long, value_name = "FILE", requires = "system_map")]
        vmlinux: Option<PathBuf>,
        /// Write the profile here instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// Run a profile command.
pub fn run(c: ProfileCmd) -> Result<()> {
    match c {
        ProfileCmd::Generate {
            bzimage,
            system_map,
            vmlinux,
            output,
        } => {
            let profile = match (bzimage, system_map, vmlinux) {
                (Some(k), _, _) => {
                    ornament_introspect::profile::generate_from_kernel(&k)
                        .with_context(|| {
                            format!("cannot generate a profile from kernel {}", k.display())
                        })?
                        .profile
                }
                (None, Some(system_map), Some(vmlinux)) => {
                    ornament_introspect::profile::generate(&system_map, &vmlinux).with_context(
                        || {
                            format!(
                                "cannot generate a profile from {} and {}",
                                system_map.display(),
                                vmlinux.display()
                            )
                        },
                    )?
                }
                _ => anyhow::bail!("give --bzimage FILE, or --system-map FILE and --vmlinux FILE"),
            };
            match output {
                Some(path) => {
                    profile.save(&path)?;
                    eprintln!(
                        "ornament: profile of {} written to {}",
                        profile.kernel.release,
                        path.display()
                    );
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(profile.to_json().as_bytes())
                        .and_then(|()| out.flush())
                        .context("cannot write the profile to stdout")?;
                }
            }
        }
    }
    Ok(())
}
