//! Reference files of a catalogue kernel, for the tests that check what ornament reads
//! from a kernel file alone: its bzImage (linux-image package) and its real System.map
//! (the `-dbg` package, about 300 MB, fetched only when asked), kept in
//! `<cache root>/reference/<release>/`. A cached image built before images came from the
//! kernel package alone (manifest format 1) already holds both and is used instead.

use crate::cache;
use crate::catalog::Reference;
use crate::debian;
use crate::image::{files, ImageError};
use crate::resolve::{self, KernelRequest};
use std::fs;
use std::path::{Path, PathBuf};

/// Manifest format of the images that held the `-dbg` package's System.map.
const DBG_IMAGE_FORMAT: u32 = 1;

/// What is read of such an image's manifest.
#[derive(serde::Deserialize)]
struct OldManifest {
    format: u32,
    release: String,
}

/// A kernel's files for reference.
#[derive(Debug, Clone)]
pub struct ReferenceFiles {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The real System.map of the `-dbg` package, when asked for.
    pub system_map: Option<PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The bzImage of reference kernel `spec` (and its real System.map when `system_map`),
/// fetched into the cache on first use.
pub fn fetch(
    spec: &Reference,
    system_map: bool,
    cache_dir: Option<&Path>,
) -> Result<ReferenceFiles, ImageError> {
    let root = cache::cache_root(cache_dir);
    let dir = root.join("reference").join(spec.release);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let kernel = dir.join(files::KERNEL);
    let map = dir.join(files::SYSTEM_MAP);
    let want_map = system_map && !map.exists();
    if !kernel.exists() || want_map {
        if let Some(old) = dbg_image(&root, spec) {
            for (f, dest) in [(files::KERNEL, &kernel), (files::SYSTEM_MAP, &map)] {
                copy_into(&old.join(f), dest)?;
            }
        }
    }
    if !kernel.exists() {
        let work = tempfile::tempdir_in(&dir).map_err(io_err(&dir))?;
        let debs = debian::download(&[spec.package], work.path())?;
        let tmp = work.path().join(files::KERNEL);
        debian::extract(
            &debs[0],
            &[(format!("./boot/vmlinuz-{}", spec.release), tmp.clone())],
        )?;
        fs::rename(&tmp, &kernel).map_err(io_err(&kernel))?;
    }
    if system_map && !map.exists() {
        let work = tempfile::tempdir_in(&dir).map_err(io_err(&dir))?;
        let debs = debian::download(&[spec.dbg_package], work.path())?;
        let tmp = work.path().join(files::SYSTEM_MAP);
        debian::extract(
            &debs[0],
            &[(
                format!("./usr/lib/debug/boot/System.map-{}", spec.release),
                tmp.clone(),
            )],
        )?;
        fs::rename(&tmp, &map).map_err(io_err(&map))?;
    }
    Ok(ReferenceFiles {
        kernel,
        system_map: system_map.then_some(map),
    })
}

/// The bzImage of the kernel package a Debian meta-package (`linux-image-rt-amd64`, ...)
/// names now, fetched into `<cache root>/reference/<package>/` on first use; returns
/// the kernel package's name and its bzImage.
pub fn fetch_meta(meta: &str, cache_dir: Option<&Path>) -> Result<(String, PathBuf), ImageError> {
    let req = KernelRequest::parse(meta).map_err(ImageError::Request)?;
    let target = resolve::resolve(&req).map_err(ImageError::Request)?;
    let (package, release) = (target.package.clone(), target.release.clone());
    let dir = cache::cache_root(cache_dir)
        .join("reference")
        .join(&release);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let lock_path = dir.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let kernel = dir.join(files::KERNEL);
    if !kernel.exists() {
        let work = tempfile::tempdir_in(&dir).map_err(io_err(&dir))?;
        let pinned = format!("{}={}", target.package, target.version);
        let debs = debian::download(&[pinned.as_str()], work.path())?;
        let tmp = work.path().join(files::KERNEL);
        debian::extract(
            &debs[0],
            &[(format!("./boot/vmlinuz-{release}"), tmp.clone())],
        )?;
        fs::rename(&tmp, &kernel).map_err(io_err(&kernel))?;
    }
    Ok((package, kernel))
}

/// A complete cached image of `spec`'s kernel built from the `-dbg` package.
fn dbg_image(root: &Path, spec: &Reference) -> Option<PathBuf> {
    let images = fs::read_dir(root.join("images")).ok()?;
    let dirs = images
        .flatten()
        .filter_map(|d| fs::read_dir(d.path()).ok())
        .flat_map(|rd| rd.flatten());
    dirs.into_iter().find_map(|e| {
        let dir = e.path();
        let text = fs::read_to_string(dir.join(cache::MANIFEST)).ok()?;
        let m: OldManifest = serde_json::from_str(&text).ok()?;
        (m.format == DBG_IMAGE_FORMAT && m.release == spec.release).then_some(dir)
    })
}

/// Copy `src` to `dest` through a temporary name beside it.
fn copy_into(src: &Path, dest: &Path) -> Result<(), ImageError> {
    if dest.exists() {
        return Ok(());
    }
    let tmp = dest.with_extension("partial");
    fs::copy(src, &tmp).map_err(io_err(src))?;
    fs::rename(&tmp, dest).map_err(io_err(dest))
}
