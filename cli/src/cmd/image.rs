//! `ornament image`: build, list and verify guest images.

use anyhow::{bail, Result};
use ornament_images::image::{cached_dirs, RESOLVED_FILE};
use ornament_images::overlay::parse_add;
use ornament_images::resolve::{self, KernelRequest};
use ornament_images::{
    build_image, cache, cache_root, catalog, BuildOptions, Image, DEFAULT_IMAGE, IMAGES,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Guest image commands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCmd {
    /// Build an image (the newest Debian kernel package of its flavour, its symbols and
    /// profile read from the kernel itself, initramfs) into the cache; a no-op when a
    /// valid one is cached.
    Build {
        /// Image name (see `ornament image list`).
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
        /// Rebuild even when a valid image is cached.
        #[arg(long)]
        rebuild: bool,
        /// Build the kernel from this Debian package instead of the newest of the
        /// image's meta-packages: a meta-package or a kernel package, at VERSION if given.
        #[arg(long, value_name = "NAME[=VERSION]")]
        kernel_package: Option<String>,
        /// Add a host file to the image's initramfs: HOST:GUEST (repeatable).
        #[arg(long = "add", value_name = "HOST:GUEST")]
        add: Vec<String>,
        /// Cache directory (default: $ORNAMENT_CACHE_DIR, else $XDG_CACHE_HOME/ornament).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// List the images ornament can build: what each resolves to now, what is cached.
    List {
        /// Cache directory (default: $ORNAMENT_CACHE_DIR, else $XDG_CACHE_HOME/ornament).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Hash every file of the cached images (of NAME, else all) against their manifests;
    /// each run checks only sizes and a stamp of the files' metadata.
    Verify {
        /// Image name (default: every image).
        name: Option<String>,
        /// Cache directory (default: $ORNAMENT_CACHE_DIR, else $XDG_CACHE_HOME/ornament).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

/// Say so on stderr when `img` was used without resolving its kernel package now.
pub fn announce_skipped(img: &Image) {
    if let Some(why) = &img.resolution_skipped {
        eprintln!(
            "ornament: kernel package resolution skipped ({why}); using the cached {} with {} {}",
            img.name, img.package, img.package_version
        );
    }
}

/// Run an image command.
pub fn run(c: ImageCmd) -> Result<()> {
    match c {
        ImageCmd::Build {
            name,
            rebuild,
            kernel_package,
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
                    kernel_package,
                },
            )?;
            announce_skipped(&img);
            let how = if img.cached { "cached" } else { "built" };
            println!(
                "{} {} (kernel {}, package {} {}): {}",
                img.name,
                how,
                img.release,
                img.package,
                img.package_version,
                img.dir.display()
            );
        }
        ImageCmd::List { cache_dir } => list(cache_dir.as_deref()),
        ImageCmd::Verify { name, cache_dir } => verify(name.as_deref(), cache_dir.as_deref())?,
    }
    Ok(())
}

fn list(cache_dir: Option<&Path>) {
    let root = cache_root(cache_dir);
    println!("cache: {}", root.display());
    for s in IMAGES {
        let mark = if s.name == DEFAULT_IMAGE {
            " (default)"
        } else {
            ""
        };
        println!("{}{mark}: {}", s.name, s.summary);
        let req = KernelRequest::Catalogue(s.sources);
        let dir = root.join("images").join(s.name);
        // Remembered where the image's cache directory exists (as `image build` does).
        match resolve::resolve_remembered(&req, &dir.join(RESOLVED_FILE)) {
            Ok(r) => println!(
                "  resolves to: {} {} (newest of {})",
                r.package,
                r.version,
                req.describe()
            ),
            Err(e) => println!("  resolves to: nothing now ({e})"),
        }
        let dirs = cached_dirs(&dir, Some(""));
        if dirs.is_empty() {
            println!("  cached:      none");
        }
        for d in dirs {
            match cache::check(&d) {
                Ok(c) => println!(
                    "  cached:      {} {}{}",
                    c.manifest.package,
                    c.manifest.package_version,
                    if c.manifest.requested == req.describe() {
                        String::new()
                    } else {
                        format!(" (--kernel-package {})", c.manifest.requested)
                    }
                ),
                Err(e) => println!("  cached:      {} is not usable: {e}", d.display()),
            }
        }
    }
}

fn verify(name: Option<&str>, cache_dir: Option<&Path>) -> Result<()> {
    let names: Vec<&str> = match name {
        Some(n) => {
            if catalog::find(n).is_none() {
                bail!(
                    "unknown image {n}; known images: {}",
                    catalog::names().join(", ")
                );
            }
            vec![n]
        }
        None => catalog::names(),
    };
    let root = cache_root(cache_dir).join("images");
    let (mut good, mut bad) = (0u32, 0u32);
    for n in names {
        for dir in cached_dirs(&root.join(n), None) {
            let t = Instant::now();
            match cache::verify(&dir) {
                Ok(m) => {
                    let full = t.elapsed();
                    let bytes: u64 = m.files.iter().map(|f| f.size).sum();
                    let t = Instant::now();
                    let cheap = cache::check(&dir);
                    let per_run = t.elapsed();
                    if let Err(e) = cheap {
                        bail!(
                            "{} verified, then failed the per-run check: {e}",
                            dir.display()
                        );
                    }
                    println!(
                        "ok: {} ({} files, {:.1} MB: SHA-256 in {:.2} s; the per-run check takes {:.3} ms)",
                        dir.display(),
                        m.files.len(),
                        bytes as f64 / 1e6,
                        full.as_secs_f64(),
                        per_run.as_secs_f64() * 1e3
                    );
                    good += 1;
                }
                // Another ornament's image (runs of this one never use it): not damage.
                Err(e @ cache::CacheError::ManifestFormat { .. }) => {
                    println!("not checked: {}: {e}", dir.display());
                }
                Err(e) => {
                    println!(
                        "damaged: {}: {e} (the next run or build rebuilds it)",
                        dir.display()
                    );
                    bad += 1;
                }
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {} cached images are damaged", good + bad);
    }
    if good == 0 {
        println!("no cached images in {}", root.display());
    }
    Ok(())
}
