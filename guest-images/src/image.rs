//! Build (or find in the cache) one guest image: kernel, symbols, BTF, profile, initramfs.

use crate::cache::{self, CacheError, FileEntry, Manifest};
use crate::catalog::{self, ImageSpec};
use crate::cpio::CpioWriter;
use crate::debian::{self, DebianError};
use crate::progress;
use crate::resolve::{self, KernelRequest, ResolveError, Resolved};
use crate::workloads::{self, WorkloadError};
use flate2::write::GzEncoder;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// File names inside an image directory.
pub mod files {
    /// The compressed kernel (bzImage).
    pub const KERNEL: &str = "vmlinuz";
    /// The System.map, written from the kernel's own kallsyms (per-CPU symbols typed `A`,
    /// no absolute symbols; see `ornament_introspect::kallsyms`).
    pub const SYSTEM_MAP: &str = "System.map";
    /// The kernel config.
    pub const CONFIG: &str = "config";
    /// The uncompressed ELF kernel (for direct ELF boot): the bzImage's decompressed
    /// payload, which has `.BTF` but no symbol table.
    pub const VMLINUX: &str = "vmlinux";
    /// The raw `.BTF` section of vmlinux (struct layouts).
    pub const BTF: &str = "vmlinux.btf";
    /// The kernel's profile, generated at build time from the bzImage alone.
    pub const PROFILE: &str = "profile.json";
    /// The initramfs: busybox, /init, workloads (newc cpio, gzip).
    pub const INITRAMFS: &str = "initramfs.cpio.gz";
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ImageError {
    /// unknown image {name}; known images: {known}
    UnknownImage {
        /// The name asked for.
        name: String,
        /// The names we know.
        known: String,
    },
    /// Debian package step failed
    Debian(#[from] DebianError),
    /// cannot tell which kernel package {requested} means now, and no image of it is cached
    Resolve {
        /// What was asked for.
        requested: String,
        /// Why.
        #[source]
        source: ResolveError,
    },
    /// bad kernel package
    Request(#[source] ResolveError),
    /// compiling guest programs failed
    Workload(#[from] WorkloadError),
    /// image cache error
    Cache(#[from] CacheError),
    /// {path} is not a static executable; install the busybox-static package (apt-get install busybox-static)
    BusyboxNotStatic {
        /// The busybox found.
        path: PathBuf,
    },
    /// no busybox found at {path}; install the busybox-static package (apt-get install busybox-static)
    NoBusybox {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// cannot make the profile of kernel {path}
    Profile {
        /// The kernel file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ornament_introspect::profile::ProfileError>,
    },
    /// kernel {path} is release {found}, its package name says {expected}
    WrongRelease {
        /// The kernel file.
        path: PathBuf,
        /// The package's release.
        expected: String,
        /// The banner's release.
        found: String,
    },
    /// file {path} to add to the image cannot be read
    AddFile {
        /// The host file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// I/O on {path} failed
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Cache root (see `cache::cache_root`).
    pub cache_dir: Option<PathBuf>,
    /// Rebuild even if a valid image is cached.
    pub rebuild: bool,
    /// Host files to add: (host path, guest path).
    pub add: Vec<(PathBuf, String)>,
    /// `--kernel-package NAME[=VERSION]`: build from this package (a meta-package or a
    /// kernel package) instead of the catalogue's meta-packages.
    pub kernel_package: Option<String>,
}

impl BuildOptions {
    /// Options that pin image `name`'s reference kernel (the one whose profile is
    /// committed), for the tests that check against it.
    pub fn reference(name: &str) -> Self {
        BuildOptions {
            kernel_package: Some(catalog::reference(name).package.to_owned()),
            ..BuildOptions::default()
        }
    }
}

/// A built image: where its files are.
#[derive(Debug, Clone)]
pub struct Image {
    /// Image name.
    pub name: String,
    /// Kernel release.
    pub release: String,
    /// The kernel package.
    pub package: String,
    /// Debian package version.
    pub package_version: String,
    /// What the kernel package was resolved from (see `cache::Manifest::requested`).
    pub requested: String,
    /// Directory holding the files.
    pub dir: PathBuf,
    /// True when it came from the cache without building.
    pub cached: bool,
    /// Set when the kernel package could not be resolved now (apt's lists do not have
    /// it, the archive cannot be reached) and a cached image was used instead: why.
    pub resolution_skipped: Option<String>,
}

impl Image {
    /// Path of one of the `files::*` of this image.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
    /// The bzImage.
    pub fn kernel(&self) -> PathBuf {
        self.path(files::KERNEL)
    }
    /// The initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.path(files::INITRAMFS)
    }
    /// The System.map.
    pub fn system_map(&self) -> PathBuf {
        self.path(files::SYSTEM_MAP)
    }
}

/// Find a valid cached image or build it. The kernel package is resolved now (the
/// catalogue's meta-packages, or `opts.kernel_package`); when that cannot be done (no
/// apt lists, the archive unreachable) the newest cached image of the same request is
/// used, its `resolution_skipped` saying why.
pub fn build_image(name: &str, opts: &BuildOptions) -> Result<Image, ImageError> {
    let spec = catalog::find(name).ok_or_else(|| ImageError::UnknownImage {
        name: name.to_owned(),
        known: catalog::names().join(", "),
    })?;
    let req = match &opts.kernel_package {
        Some(p) => KernelRequest::parse(p).map_err(ImageError::Request)?,
        None => KernelRequest::Catalogue(spec.sources),
    };
    let requested = req.describe();
    let root = cache::cache_root(opts.cache_dir.as_deref())
        .join("images")
        .join(spec.name);
    let suffix = add_suffix(&opts.add)?;
    // Partial builds of builders that died (a SIGKILL mid-build) go at the next start,
    // unless a build is running now (it holds the lock; it sweeps them itself).
    if let Ok(lock) = fs::File::open(root.join(LOCK_FILE)) {
        if lock.try_lock().is_ok() {
            sweep_partials(&root);
        }
    }
    // NAME=VERSION of a kernel package already cached needs no lookup.
    if let (Some(exact), false) = (req.exact(), opts.rebuild) {
        if let Some(img) = cached_at(spec, &root.join(format!("{}{suffix}", exact.dir_name()))) {
            return Ok(img);
        }
    }
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let target = match resolve::resolve_remembered(&req, &root.join(RESOLVED_FILE)) {
        Ok(t) => t,
        Err(e) if !opts.rebuild && resolution_unavailable(&e) => {
            return match newest_cached(spec, &root, &suffix, &requested) {
                Some(mut img) => {
                    // The caller says so (`resolution_skipped`); the log only records it.
                    tracing::info!(image = spec.name, error = %e, "kernel package resolution skipped; using the cached image");
                    img.resolution_skipped = Some(e.to_string());
                    Ok(img)
                }
                None => Err(ImageError::Resolve {
                    requested,
                    source: e,
                }),
            };
        }
        Err(e) => return Err(ImageError::Request(e)),
    };
    tracing::info!(image = spec.name, %requested, package = %target.package, version = %target.version, "kernel package resolved");
    let dest = root.join(format!("{}{suffix}", target.dir_name()));
    if !opts.rebuild {
        if let Some(img) = cached_at(spec, &dest) {
            tracing::info!(image = spec.name, dir = %img.dir.display(), "using cached image");
            return Ok(img);
        }
    }
    // One builder at a time per image (parallel runs and tests share the cache);
    // whoever waited finds the image the first one built.
    let lock_path = root.join(LOCK_FILE);
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    // Every builder holds the lock until it has renamed its partial directory: those
    // left now are of builders that died.
    sweep_partials(&root);
    if !opts.rebuild {
        if let Some(img) = cached_at(spec, &dest) {
            return Ok(img);
        }
    }
    let work = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .tempdir_in(&root)
        .map_err(io_err(&root))?;
    match build_into(spec, &target, &requested, work.path(), &opts.add) {
        Ok(()) => {}
        // The archive cannot be reached (or no longer has the package): an older
        // cached image of the same request still runs.
        Err(ImageError::Debian(e @ DebianError::Download { .. })) if !opts.rebuild => {
            drop(work);
            return match newest_cached(spec, &root, &suffix, &requested) {
                Some(mut img) => {
                    let why = format!("cannot download {} {}: {e}", target.package, target.version);
                    tracing::info!(image = spec.name, error = %why, "kernel package resolution skipped; using the cached image");
                    img.resolution_skipped = Some(why);
                    Ok(img)
                }
                None => Err(ImageError::Debian(e)),
            };
        }
        Err(e) => return Err(e),
    }
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    let tmp = work.keep();
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    tracing::info!(image = spec.name, dir = %dest.display(), "image built");
    Ok(Image {
        name: spec.name.to_owned(),
        release: target.release,
        package: target.package,
        package_version: target.version,
        requested,
        dir: dest,
        cached: false,
        resolution_skipped: None,
    })
}

/// A resolution error that says apt cannot answer now (no lists, no apt), as opposed
/// to one about what was asked for.
fn resolution_unavailable(e: &ResolveError) -> bool {
    matches!(
        e,
        ResolveError::ToolMissing { .. } | ResolveError::UnknownPackage { .. }
    )
}

/// The lock file of an image's cache directory: held (flock) by its builder for the
/// whole build, released by the kernel when the builder dies.
const LOCK_FILE: &str = ".lock";
/// The remembered resolutions of an image's requests (`resolve::resolve_remembered`).
pub const RESOLVED_FILE: &str = ".resolved.json";
/// Prefix of a build in progress (renamed to its version when complete).
const PARTIAL_PREFIX: &str = ".partial-";

/// Remove the partial builds in `root`; call with the lock held.
fn sweep_partials(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let partial = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PARTIAL_PREFIX));
        if !partial {
            continue;
        }
        let path = e.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed the partial build of a builder that died")
            }
            Err(err) => {
                tracing::warn!(dir = %path.display(), error = %err, "cannot remove a dead builder's partial build")
            }
        }
    }
}

/// Images with `--add` files are cached apart: the directory name carries a hash
/// of the added files' names and contents.
fn add_suffix(add: &[(PathBuf, String)]) -> Result<String, ImageError> {
    if add.is_empty() {
        return Ok(String::new());
    }
    let mut desc = String::new();
    for (host, guest) in add {
        let e = cache::hash_file(host).map_err(|_| ImageError::AddFile {
            path: host.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "cannot read"),
        })?;
        desc.push_str(&format!("{guest}:{}\n", e.sha256));
    }
    // Hashed in memory: a temporary file here would outlive a SIGKILL.
    use sha2::Digest;
    let h: String = sha2::Sha256::digest(desc.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("+add-{}", &h[..12]))
}

/// The image in `dir` if it passes the per-run check (`cache::check`); a damaged one is
/// logged and left to be rebuilt.
fn cached_at(spec: &ImageSpec, dir: &Path) -> Option<Image> {
    match cache::check(dir) {
        Ok(c) if c.manifest.guest != workloads::guest_digest() => {
            tracing::info!(
                dir = %dir.display(),
                "cached image holds another ornament's guest programs; rebuilding"
            );
            None
        }
        Ok(c) => {
            let m = c.manifest;
            Some(Image {
                name: spec.name.to_owned(),
                release: m.release,
                package: m.package,
                package_version: m.package_version,
                requested: m.requested,
                dir: dir.to_path_buf(),
                cached: true,
                resolution_skipped: None,
            })
        }
        Err(CacheError::Missing { .. }) if !dir.exists() => None,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cached image is damaged; rebuilding");
            None
        }
    }
}

/// Every image directory of `root` (not the partial builds), sorted by name: those with
/// files added as `suffix` says (`Some("")`: none added), or all (`None`).
pub fn cached_dirs(root: &Path, suffix: Option<&str>) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let fits = suffix.is_none_or(|suffix| {
                n.ends_with(suffix) && suffix.is_empty() != n.contains("+add-")
            });
            !n.starts_with('.') && fits && e.path().is_dir()
        })
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// The newest (Debian version order) complete cached image of `requested`.
fn newest_cached(spec: &ImageSpec, root: &Path, suffix: &str, requested: &str) -> Option<Image> {
    let mut best: Option<Image> = None;
    for dir in cached_dirs(root, Some(suffix)) {
        let Ok(m) = cache::read_manifest(&dir) else {
            continue;
        };
        if m.requested != requested {
            continue;
        }
        let newer = best.as_ref().is_none_or(|b| {
            resolve::version_gt(&m.package_version, &b.package_version).unwrap_or(false)
        });
        if newer {
            if let Some(img) = cached_at(spec, &dir) {
                best = Some(img);
            }
        }
    }
    best
}

/// Build every file of `spec` into `dir`; returns the package version. Only the
/// kernel package is downloaded: the vmlinux is the bzImage's decompressed payload,
/// the System.map and the profile come from the kernel's own kallsyms and `.BTF`.
fn build_into(
    spec: &ImageSpec,
    target: &Resolved,
    requested: &str,
    dir: &Path,
    add: &[(PathBuf, String)],
) -> Result<(), ImageError> {
    let debs_dir = dir.join("debs");
    fs::create_dir_all(&debs_dir).map_err(io_err(&debs_dir))?;
    let pinned = format!("{}={}", target.package, target.version);
    let debs = debian::download(&[pinned.as_str()], &debs_dir)?;
    let version = debian::deb_version(&debs[0])?;
    let rel = target.release.as_str();
    let kernel = dir.join(files::KERNEL);
    debian::extract(
        &debs[0],
        &[
            (format!("./boot/vmlinuz-{rel}"), kernel.clone()),
            (format!("./boot/config-{rel}"), dir.join(files::CONFIG)),
        ],
    )?;
    fs::remove_dir_all(&debs_dir).map_err(io_err(&debs_dir))?;
    let pb = progress::spinner("reading the kernel's symbols and BTF");
    let made = ornament_introspect::profile::generate_from_kernel(&kernel).map_err(|source| {
        ImageError::Profile {
            path: kernel.clone(),
            source: Box::new(source),
        }
    })?;
    if made.profile.kernel.release != rel {
        return Err(ImageError::WrongRelease {
            path: kernel,
            expected: rel.to_owned(),
            found: made.profile.kernel.release,
        });
    }
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, bytes).map_err(io_err(&p))
    };
    write(files::VMLINUX, &made.vmlinux.bytes)?;
    let btf = ornament_introspect::elf::section_in(&made.vmlinux.bytes, ".BTF", &kernel)
        .ok()
        .flatten()
        .unwrap_or_default();
    write(files::BTF, btf)?;
    write(
        files::SYSTEM_MAP,
        ornament_introspect::kallsyms::system_map_text(&made.symbols).as_bytes(),
    )?;
    write(files::PROFILE, made.profile.to_json().as_bytes())?;
    drop(made);
    pb.finish_and_clear();
    write_initramfs(&dir.join(files::INITRAMFS), add)?;
    let mut entries: Vec<FileEntry> = Vec::new();
    for f in [
        files::KERNEL,
        files::SYSTEM_MAP,
        files::CONFIG,
        files::VMLINUX,
        files::BTF,
        files::PROFILE,
        files::INITRAMFS,
    ] {
        entries.push(cache::hash_file(&dir.join(f))?);
    }
    cache::write_manifest(
        dir,
        Manifest {
            format: cache::MANIFEST_FORMAT,
            image: spec.name.to_owned(),
            release: rel.to_owned(),
            package: target.package.clone(),
            package_version: version,
            requested: requested.to_owned(),
            guest: workloads::guest_digest(),
            files: entries,
        },
    )?;
    Ok(())
}

/// Where the host's static busybox is (Debian's busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// Write the base initramfs: directories, device nodes, busybox, /init, workloads, added files.
pub fn write_initramfs(path: &Path, add: &[(PathBuf, String)]) -> Result<(), ImageError> {
    let busybox_path = Path::new(BUSYBOX);
    let busybox = fs::read(busybox_path).map_err(|_| ImageError::NoBusybox {
        path: busybox_path.to_path_buf(),
    })?;
    if !is_static_elf(&busybox) {
        return Err(ImageError::BusyboxNotStatic {
            path: busybox_path.to_path_buf(),
        });
    }
    let build = tempfile::tempdir().map_err(io_err(Path::new("/tmp")))?;
    let programs = workloads::compile_all(build.path())?;
    let f = fs::File::create(path).map_err(io_err(path))?;
    let gz = GzEncoder::new(io::BufWriter::new(f), flate2::Compression::new(6));
    let mut w = CpioWriter::new(gz);
    let io = io_err(path);
    (|| -> io::Result<()> {
        for d in [
            "/bin",
            "/sbin",
            "/dev",
            "/proc",
            "/sys",
            "/tmp",
            "/run",
            "/root",
            "/etc",
            "/usr",
            "/usr/bin",
            "/usr/sbin",
            "/ornament",
            "/ornament/bin",
        ] {
            w.dir(d, 0o755)?;
        }
        w.char_dev("/dev/console", 0o600, 5, 1)?;
        w.char_dev("/dev/null", 0o666, 1, 3)?;
        w.file("/bin/busybox", 0o755, &busybox)?;
        w.symlink("/bin/sh", "busybox")?;
        w.file("/init", 0o755, workloads::INIT_SCRIPT.as_bytes())?;
        for (name, bin) in &programs {
            let data = fs::read(bin)?;
            w.file(&format!("/ornament/bin/{name}"), 0o755, &data)?;
        }
        Ok(())
    })()
    .map_err(io)?;
    crate::overlay::add_files(&mut w, add)?;
    let gz = w.finish().map_err(io_err(path))?;
    let buf = gz.finish().map_err(io_err(path))?;
    buf.into_inner()
        .map_err(|e| ImageError::Io {
            path: path.to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(io_err(path))?;
    Ok(())
}

/// An ELF executable without a PT_INTERP program header.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let rd16 = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let rd64 = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    // Every program header must be in the file (a truncated one proves nothing) and
    // none may be PT_INTERP (3).
    (0..usize::from(phnum)).all(|i| {
        let o = i
            .checked_mul(usize::from(phentsize))
            .and_then(|d| phoff.checked_add(d));
        o.and_then(|o| b.get(o..o.checked_add(4)?))
            .is_some_and(|t| t != 3u32.to_le_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit ELF header with program headers of `types` right after it.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        let n = u16::try_from(types.len()).expect("few headers");
        b[0x38..0x3a].copy_from_slice(&n.to_le_bytes()); // e_phnum
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b
    }

    #[test]
    fn partial_builds_of_dead_builders_go_at_the_next_start() {
        let root = tempfile::tempdir().expect("tmp");
        let partial = root.path().join(format!("{PARTIAL_PREFIX}abc123"));
        fs::create_dir_all(partial.join("debs")).expect("mkdir");
        fs::write(partial.join("debs/x.deb"), b"half a download").expect("write");
        let built = root
            .path()
            .join("linux-image-6.1.0-50-cloud-amd64_6.1.176-1");
        fs::create_dir(&built).expect("mkdir");
        sweep_partials(root.path());
        assert!(!partial.exists());
        assert!(built.is_dir(), "complete images stay");
    }

    #[test]
    fn add_suffix_hashes_names_and_contents() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("f");
        fs::write(&f, b"abc").expect("write");
        // sha256("/x:" + sha256("abc") + "\n"), as the cache has always named it.
        let s = add_suffix(&[(f.clone(), "/x".into())]).expect("hash");
        assert_eq!(s, "+add-054bda346c90");
        assert_ne!(s, add_suffix(&[(f, "/y".into())]).expect("hash"));
        assert_eq!(add_suffix(&[]).expect("empty"), "");
    }

    #[test]
    fn busybox_static_check() {
        const LOAD: u32 = 1;
        const INTERP: u32 = 3;
        const NOTE: u32 = 4;
        // Static: no PT_INTERP among the program headers.
        assert!(is_static_elf(&elf(&[LOAD, NOTE, LOAD])));
        assert!(is_static_elf(&elf(&[])));
        // Dynamic: a PT_INTERP anywhere.
        assert!(!is_static_elf(&elf(&[LOAD, INTERP])));
        assert!(!is_static_elf(&elf(&[INTERP, LOAD])));
        // Not ELF64, truncated, or program headers past the end: never static.
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let mut elf32 = elf(&[LOAD]);
        elf32[4] = 1;
        assert!(!is_static_elf(&elf32));
        let full = elf(&[LOAD, LOAD]);
        assert!(!is_static_elf(&full[..full.len() - 60]));
        let mut far = elf(&[LOAD]);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!is_static_elf(&far));
        // Real files: this test executable is dynamically linked; the host's busybox
        // (Debian's busybox-static, which images need) is static.
        let me = fs::read(std::env::current_exe().expect("test path")).expect("read self");
        assert!(!is_static_elf(&me));
        let busybox = ornament_test_gate::require!(
            "/bin/busybox (apt-get install busybox-static)",
            fs::read(BUSYBOX)
        );
        assert!(is_static_elf(&busybox));
    }

    #[test]
    fn unknown_image_names_the_known_ones() {
        let e = build_image("nope", &BuildOptions::default()).expect_err("unknown");
        let msg = e.to_string();
        assert!(msg.contains("unknown image nope"), "{msg}");
        assert!(msg.contains("debian-6.1-cloud"), "{msg}");
    }
}
