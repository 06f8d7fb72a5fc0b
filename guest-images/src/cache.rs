//! Where built images live, and how a complete image is told from a partial one.
//!
//! Layout: `<root>/images/<image name>/<kernel package>_<package version>/` holding the
//! image files and `manifest.json`, written last, with the size and SHA-256 of every file.
//! A directory without a manifest, or whose files do not match it, is damaged
//! and is rebuilt.
//!
//! Hashing a whole image (about 75 MB) on every run costs seconds on a slow host, so it
//! is done once, when the image is built, and recorded with each file's size, mtime,
//! ctime and inode in `stamp.json`. Each run compares only those ([`check`]): a file
//! whose size differs is damaged at once; one whose other metadata differs (touched,
//! copied, rewritten) is hashed again, and the stamp renewed if it still matches. The
//! full hash of every file runs only on request ([`verify`], `ornament image verify`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Environment variable that moves the cache.
pub const CACHE_ENV: &str = "ORNAMENT_CACHE_DIR";

/// Version of the manifest format; a different one means rebuild. 4: the kernel package
/// is resolved when the image is built (the manifest records what was asked for and
/// what it resolved to) and a stamp spares the per-run hash; 3: the profile
/// records the mount tree (exec paths across mount points); 2: images from the kernel
/// package alone (System.map from kallsyms, vmlinux from the bzImage, a profile); 1 held
/// the `-dbg` package's System.map and vmlinux.
pub const MANIFEST_FORMAT: u32 = 4;

/// Name of the manifest file inside an image directory.
pub const MANIFEST: &str = "manifest.json";

/// Name of the stamp file inside an image directory: each file's metadata when it was
/// last hashed and found to match the manifest.
pub const STAMP: &str = "stamp.json";

/// Why a cached image cannot be used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CacheError {
    /// {path} is missing
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// {path} cannot be read
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// manifest {path} is not valid
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// manifest {path} has format {found}, expected {expected}
    ManifestFormat {
        /// The manifest.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// {path} does not match the manifest: its SHA-256 differs (damaged image)
    Mismatch {
        /// The damaged file.
        path: PathBuf,
    },
    /// {path} does not match the manifest: {found} bytes, the manifest says {expected} (damaged or partial image)
    SizeMismatch {
        /// The damaged file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        found: u64,
    },
}

/// One file of an image, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: String,
}

/// What `manifest.json` records about a complete image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `MANIFEST_FORMAT` at build time.
    pub format: u32,
    /// Image name.
    pub image: String,
    /// Kernel release.
    pub release: String,
    /// The kernel package (`linux-image-6.1.0-57-cloud-amd64`; empty in older formats).
    #[serde(default)]
    pub package: String,
    /// Debian package version the kernel came from.
    pub package_version: String,
    /// What was asked for: the catalogue's meta-package (`linux-image-cloud-amd64`, with
    /// its series) or the user's `--kernel-package NAME[=VERSION]`; empty in older
    /// formats.
    #[serde(default)]
    pub requested: String,
    /// [`crate::workloads::guest_digest`] of the ornament that built it (empty in older
    /// images: rebuilt).
    #[serde(default)]
    pub guest: String,
    /// Every file of the image.
    pub files: Vec<FileEntry>,
}

/// The cache root: `override_dir`, else `$ORNAMENT_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/ornament`, else `$HOME/.cache/ornament`, else a directory in /tmp.
pub fn cache_root(override_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = override_dir {
        return d.to_path_buf();
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env(CACHE_ENV) {
        return d;
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return d.join("ornament");
    }
    if let Some(h) = env("HOME") {
        return h.join(".cache").join("ornament");
    }
    std::env::temp_dir().join("ornament-cache")
}

/// Size and SHA-256 of a file.
pub fn hash_file(path: &Path) -> Result<FileEntry, CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileEntry { name, size, sha256 })
}

/// Write the manifest for `dir` (call last, after every file is in place and hashed),
/// and the stamp of the files as they are now.
pub fn write_manifest(dir: &Path, mut manifest: Manifest) -> Result<Manifest, CacheError> {
    manifest.format = MANIFEST_FORMAT;
    let path = dir.join(MANIFEST);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|source| CacheError::BadManifest {
            path: path.clone(),
            source,
        })?;
    fs::write(&path, text).map_err(|source| CacheError::Io { path, source })?;
    write_stamp(dir, &manifest)?;
    Ok(manifest)
}

/// Read and parse `dir`'s manifest, refusing another format.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CacheError> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CacheError::Missing { path })
        }
        Err(source) => return Err(CacheError::Io { path, source }),
    };
    let m: Manifest = serde_json::from_str(&text).map_err(|source| CacheError::BadManifest {
        path: path.clone(),
        source,
    })?;
    if m.format != MANIFEST_FORMAT {
        return Err(CacheError::ManifestFormat {
            path,
            found: m.format,
            expected: MANIFEST_FORMAT,
        });
    }
    Ok(m)
}

/// What a file's metadata was when it was last hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StampEntry {
    name: String,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    dev: u64,
    ino: u64,
}

impl StampEntry {
    fn of(name: &str, meta: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        StampEntry {
            name: name.to_owned(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The path and metadata of `f` in `dir`, which must be there with its recorded size.
fn stat_sized(dir: &Path, f: &FileEntry) -> Result<(PathBuf, fs::Metadata), CacheError> {
    let p = dir.join(&f.name);
    let meta = fs::metadata(&p).map_err(|_| CacheError::Missing { path: p.clone() })?;
    if meta.len() != f.size {
        return Err(CacheError::SizeMismatch {
            path: p,
            expected: f.size,
            found: meta.len(),
        });
    }
    Ok((p, meta))
}

/// How [`check`] found an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The image's manifest.
    pub manifest: Manifest,
    /// True when the stamp was missing or disagreed, so every file was hashed again.
    pub hashed: bool,
}

/// The cheap per-run check of `dir`: every file of the manifest present with its
/// size, and its mtime, ctime, device and inode as the stamp recorded them. A size
/// that differs is damage ([`CacheError::SizeMismatch`]) without hashing; a stamp
/// that is missing or disagrees in anything else means a full [`verify`] (which
/// renews the stamp when the files still match).
pub fn check(dir: &Path) -> Result<Checked, CacheError> {
    let manifest = read_manifest(dir)?;
    let stamp: Option<Vec<StampEntry>> = fs::read(dir.join(STAMP))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut agrees = stamp
        .as_ref()
        .is_some_and(|s| s.len() == manifest.files.len());
    for (i, f) in manifest.files.iter().enumerate() {
        let (_, meta) = stat_sized(dir, f)?;
        agrees = agrees
            && stamp
                .as_ref()
                .and_then(|s| s.get(i))
                .is_some_and(|e| *e == StampEntry::of(&f.name, &meta));
    }
    if agrees {
        return Ok(Checked {
            manifest,
            hashed: false,
        });
    }
    tracing::info!(dir = %dir.display(), "the image's stamp is missing or disagrees: hashing every file");
    Ok(Checked {
        manifest: verify(dir)?,
        hashed: true,
    })
}

/// The full check of `dir`: every file present with its recorded size and SHA-256.
/// Renews the stamp on success (a stamp that cannot be written is logged: the next
/// run hashes again). Returns the manifest of a complete image.
pub fn verify(dir: &Path) -> Result<Manifest, CacheError> {
    let m = read_manifest(dir)?;
    if let Err(e) = hash_all(dir, &m) {
        // The stamp vouches for files that were hashed and matched: no longer so, and
        // without it the next per-run check hashes again (and the image is rebuilt).
        let _ = fs::remove_file(dir.join(STAMP));
        return Err(e);
    }
    if let Err(e) = write_stamp(dir, &m) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the image's stamp");
    }
    Ok(m)
}

/// Every file of `m` in `dir` with its size and SHA-256.
fn hash_all(dir: &Path, m: &Manifest) -> Result<(), CacheError> {
    for f in &m.files {
        let (p, _) = stat_sized(dir, f)?;
        if hash_file(&p)?.sha256 != f.sha256 {
            return Err(CacheError::Mismatch { path: p });
        }
    }
    Ok(())
}

/// Record the metadata of `m`'s files in `dir`'s stamp; call only when they have just
/// been hashed (or written) and match the manifest.
pub fn write_stamp(dir: &Path, m: &Manifest) -> Result<(), CacheError> {
    let mut entries = Vec::with_capacity(m.files.len());
    for f in &m.files {
        let p = dir.join(&f.name);
        let meta = fs::metadata(&p).map_err(|source| CacheError::Io { path: p, source })?;
        entries.push(StampEntry::of(&f.name, &meta));
    }
    let path = dir.join(STAMP);
    let text = serde_json::to_vec(&entries).map_err(|source| CacheError::BadManifest {
        path: path.clone(),
        source,
    })?;
    // Through a temporary name: a half-written stamp must not be read as one.
    let tmp = dir.join(format!(".{STAMP}.tmp"));
    fs::write(&tmp, text).map_err(|source| CacheError::Io {
        path: tmp.clone(),
        source,
    })?;
    fs::rename(&tmp, &path).map_err(|source| CacheError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn sample(dir: &Path) -> Manifest {
        fs::write(dir.join("a"), b"hello").expect("write");
        fs::write(dir.join("b"), b"world!").expect("write");
        let files = vec![
            hash_file(&dir.join("a")).expect("hash"),
            hash_file(&dir.join("b")).expect("hash"),
        ];
        write_manifest(
            dir,
            Manifest {
                format: 0,
                image: "x".into(),
                release: "r".into(),
                package: "linux-image-r".into(),
                package_version: "1".into(),
                requested: "linux-image-meta".into(),
                guest: String::new(),
                files,
            },
        )
        .expect("manifest")
    }

    fn mtime(p: &Path) -> SystemTime {
        fs::metadata(p).expect("stat").modified().expect("mtime")
    }

    fn set_mtime(p: &Path, t: SystemTime) {
        fs::File::options()
            .write(true)
            .open(p)
            .expect("open")
            .set_modified(t)
            .expect("set mtime");
    }

    #[test]
    fn complete_image_verifies() {
        let d = tempfile::tempdir().expect("tempdir");
        let m = sample(d.path());
        assert_eq!(verify(d.path()).expect("valid"), m);
        assert_eq!(
            m.files[0].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        // The build wrote the stamp: the per-run check hashes nothing.
        let c = check(d.path()).expect("valid");
        assert_eq!((c.manifest, c.hashed), (m, false));
    }

    #[test]
    fn truncated_file_is_caught_by_the_cheap_check() {
        let d = tempfile::tempdir().expect("tempdir");
        sample(d.path());
        let b = d.path().join("b");
        let t = mtime(&b);
        fs::File::options()
            .write(true)
            .open(&b)
            .expect("open")
            .set_len(3)
            .expect("truncate");
        set_mtime(&b, t);
        match check(d.path()) {
            Err(CacheError::SizeMismatch {
                path,
                expected,
                found,
            }) => assert_eq!((path, expected, found), (b, 6, 3)),
            other => panic!("expected a size mismatch, got {other:?}"),
        }
    }

    #[test]
    fn same_size_same_mtime_change() {
        let d = tempfile::tempdir().expect("tempdir");
        sample(d.path());
        let a = d.path().join("a");
        let t = mtime(&a);
        fs::write(&a, b"hellO").expect("write");
        set_mtime(&a, t);
        // The kernel moved the ctime, which no one can set back: the stamp disagrees,
        // the per-run check hashes and finds the damage.
        assert!(matches!(check(d.path()), Err(CacheError::Mismatch { path }) if path == a));
        // A change the metadata cannot show (bit rot on the disk: here, the stamp
        // taken again after the change) passes the per-run check, which is the price of
        // not hashing; `image verify` (the full check) finds it.
        let mut m = read_manifest(d.path()).expect("manifest");
        write_stamp(d.path(), &m).expect("stamp");
        let c = check(d.path()).expect("the cheap check cannot see it");
        assert!(!c.hashed);
        assert!(matches!(verify(d.path()), Err(CacheError::Mismatch { path }) if path == a));
        // ... and drops the stamp, so the next run hashes, finds it, and rebuilds.
        assert!(!d.path().join(STAMP).exists());
        assert!(matches!(check(d.path()), Err(CacheError::Mismatch { path }) if path == a));
        // Content put back, only touched: hashed once, stamp renewed, then cheap again.
        fs::write(&a, b"hello").expect("write");
        set_mtime(&a, t + Duration::from_secs(5));
        let c = check(d.path()).expect("same content");
        assert!(c.hashed);
        m.format = MANIFEST_FORMAT;
        assert_eq!(c.manifest, m);
        assert!(!check(d.path()).expect("stamped").hashed);
    }

    #[test]
    fn missing_stamp_means_one_full_hash() {
        let d = tempfile::tempdir().expect("tempdir");
        sample(d.path());
        fs::remove_file(d.path().join(STAMP)).expect("rm");
        assert!(check(d.path()).expect("valid").hashed);
        assert!(d.path().join(STAMP).is_file());
        assert!(!check(d.path()).expect("valid").hashed);
        fs::write(d.path().join(STAMP), b"[{").expect("write");
        assert!(check(d.path()).expect("valid").hashed);
    }

    #[test]
    fn damage_is_detected() {
        let d = tempfile::tempdir().expect("tempdir");
        sample(d.path());
        fs::write(d.path().join("a"), b"hellO").expect("write");
        assert!(matches!(verify(d.path()), Err(CacheError::Mismatch { .. })));
        fs::write(d.path().join("a"), b"hell").expect("write");
        assert!(matches!(
            verify(d.path()),
            Err(CacheError::SizeMismatch { .. })
        ));
        fs::remove_file(d.path().join("a")).expect("rm");
        assert!(matches!(verify(d.path()), Err(CacheError::Missing { .. })));
        assert!(matches!(check(d.path()), Err(CacheError::Missing { .. })));
        fs::remove_file(d.path().join(MANIFEST)).expect("rm");
        assert!(matches!(verify(d.path()), Err(CacheError::Missing { .. })));
        fs::write(d.path().join(MANIFEST), b"{").expect("write");
        assert!(matches!(
            verify(d.path()),
            Err(CacheError::BadManifest { .. })
        ));
    }

    #[test]
    fn root_precedence() {
        assert_eq!(cache_root(Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
