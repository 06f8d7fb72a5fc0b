//! `ornament image`: build and list guest images.

use anyhow::Result;
use ornament_images::overlay::parse_add;
use ornament_images::{build_image, cache_root, BuildOptions, DEFAULT_IMAGE, IMAGES};
use std::path::PathBuf;

/// Guest image commands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCmd {
    /// Build an image (Debian kernel package, its symbols and profile read from the
    /// kernel itself, initramfs) into the cache; a no-op when a valid one is cached.
    Build {
        /// Image name (see `ornament image list`).
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
        /// Rebuild even when a valid image is cached.
        #[arg(long)]
        rebuild: bool,
        /// Add a host file to the image's initramfs: HOST:GUEST (repeatable).
        #[arg(long = "add", value_name = "HOST:GUEST")]
        add: Vec<String>,
        /// Cache directory (default: $ORNAMENT_CACHE_DIR, else $XDG_CACHE_HOME/ornament).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// List the images ornament can build.
    List,
}

/// Run an image command.
pub fn run(c: ImageCmd) -> Result<()> {
    match c {
        ImageCmd::Build {
            name,
            rebuild,
            add,
            cache_dir,
        } => {
            let add = add
                .iter()
                .map(|s| parse_add(s))
                .collect::<Result<Vec<_>, _>>()?;
            let img = build_image(
                &name,
                &BuildOptions {
                    cache_dir,
                    rebuild,
                    add,
                },
            )?;
            let how = if img.cached { "cached" } else { "built" };
            println!(
                "{} {} (kernel {}, package {}): {}",
                img.name,
                how,
                img.release,
                img.package_version,
                img.dir.display()
            );
        }
        ImageCmd::List => {
            println!("cache: {}", cache_root(None).display());
            for s in IMAGES {
                let mark = if s.name == DEFAULT_IMAGE {
                    " (default)"
                } else {
                    ""
                };
                println!("{:<20} {}{mark}", s.name, s.summary);
            }
        }
    }
    Ok(())
}
