//! Which kernel package an image is built from: a catalogue entry's Debian meta-packages
//! (or the user's `--kernel-package NAME[=VERSION]`) resolved, when the image is built,
//! to the newest concrete `linux-image-<abi>-<flavour>` package in apt's package lists.
//!
//! apt's lists are Debian's `Packages` indices as of the host's last `apt-get update`;
//! `apt-cache madison` lists every version of a package with its suite, `apt-cache show
//! NAME=VERSION` one record (a meta-package's `Depends` names the kernel package).
//! Versions are ordered by `dpkg --compare-versions`.

use crate::catalog::Source;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// Why a kernel package could not be resolved.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ResolveError {
    /// cannot run `{tool}` to read apt's package lists (install it: apt-get install {package})
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// {name} is not a Debian kernel image package (expected linux-image-..., not a -dbg package)
    NotAKernelPackage {
        /// The name given.
        name: String,
    },
    /// package {package} is not in apt's package lists (run apt-get update, or check its name)
    UnknownPackage {
        /// The package.
        package: String,
    },
    /// package {package} has no version {version} in apt's package lists (it has: {known})
    NoSuchVersion {
        /// The package.
        package: String,
        /// The version asked for.
        version: String,
        /// The versions the lists have, newest first.
        known: String,
    },
    /// no version of {meta} in apt's package lists is of kernel series {series} (it has: {known})
    NoSeries {
        /// The meta-package.
        meta: String,
        /// The series (`6.1`).
        series: String,
        /// The versions the lists have.
        known: String,
    },
    /// meta-package {meta} {version} depends on no linux-image package
    NoTarget {
        /// The meta-package.
        meta: String,
        /// Its version.
        version: String,
    },
}

/// A concrete kernel package to build from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The kernel package (`linux-image-6.1.0-57-cloud-amd64`).
    pub package: String,
    /// Its version (`6.1.192-3`).
    pub version: String,
    /// The kernel release it installs (`6.1.0-57-cloud-amd64`).
    pub release: String,
}

impl Resolved {
    /// The cache directory name of an image of this package (`<package>_<version>`).
    pub fn dir_name(&self) -> String {
        format!("{}_{}", self.package, self.version)
    }
}

/// What an image is built from: the catalogue's sources or the user's package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelRequest {
    /// The newest kernel of these meta-packages' series.
    Catalogue(&'static [Source]),
    /// `--kernel-package NAME[=VERSION]`: a meta-package or a concrete kernel package,
    /// at VERSION or at apt's candidate version (what `apt-get install NAME` takes).
    Package {
        /// The package name.
        name: String,
        /// The version asked for.
        version: Option<String>,
    },
}

impl KernelRequest {
    /// Parse `NAME[=VERSION]`, refusing what is not a kernel image package.
    pub fn parse(s: &str) -> Result<Self, ResolveError> {
        let (name, version) = match s.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
            None => (s.trim(), None),
        };
        let valid = name.starts_with("linux-image-")
            && name.len() > "linux-image-".len()
            && !name.ends_with("-dbg")
            && !name.ends_with("-dbgsym")
            && version.as_deref() != Some("")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !valid {
            return Err(ResolveError::NotAKernelPackage { name: s.to_owned() });
        }
        Ok(KernelRequest::Package {
            name: name.to_owned(),
            version,
        })
    }

    /// How the manifest records this request (`linux-image-cloud-amd64 (6.1)`,
    /// `linux-image-6.1.0-50-cloud-amd64=6.1.176-1`).
    pub fn describe(&self) -> String {
        match self {
            KernelRequest::Catalogue(sources) => sources
                .iter()
                .map(|s| format!("{} ({})", s.meta, s.series))
                .collect::<Vec<_>>()
                .join(" | "),
            KernelRequest::Package {
                name,
                version: Some(v),
            } => format!("{name}={v}"),
            KernelRequest::Package {
                name,
                version: None,
            } => name.clone(),
        }
    }

    /// The concrete package and version when the request names both, so no lookup is
    /// needed (a cached image of it is used even when the lists no longer have it).
    pub fn exact(&self) -> Option<Resolved> {
        match self {
            KernelRequest::Package {
                name,
                version: Some(v),
            } => Some(Resolved {
                package: name.clone(),
                version: v.clone(),
                release: release_of(name),
            }),
            _ => None,
        }
    }
}

/// The release a kernel image package installs: its name without `linux-image-` (and
/// without the `-unsigned` of Debian's unsigned builds).
pub fn release_of(package: &str) -> String {
    let r = package.strip_prefix("linux-image-").unwrap_or(package);
    r.strip_suffix("-unsigned").unwrap_or(r).to_owned()
}

/// Resolve `req` against apt's package lists now.
pub fn resolve(req: &KernelRequest) -> Result<Resolved, ResolveError> {
    match req {
        KernelRequest::Catalogue(sources) => {
            let mut best: Option<Resolved> = None;
            let mut first_err = None;
            for s in *sources {
                match resolve_meta(s.meta, Some(s.series), None) {
                    Ok(r) => {
                        let newer = match &best {
                            Some(b) => version_gt(&r.version, &b.version)?,
                            None => true,
                        };
                        if newer {
                            best = Some(r);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(meta = s.meta, error = %e, "source does not resolve");
                        first_err.get_or_insert(e);
                    }
                }
            }
            match (best, first_err) {
                (Some(b), _) => Ok(b),
                (None, Some(e)) => Err(e),
                (None, None) => Err(ResolveError::UnknownPackage {
                    package: req.describe(),
                }),
            }
        }
        KernelRequest::Package { name, version } => {
            let versions = versions_of(name)?;
            if versions.is_empty() {
                return Err(ResolveError::UnknownPackage {
                    package: name.clone(),
                });
            }
            let version = match version {
                Some(v) if versions.iter().any(|(have, _)| have == v) => v.clone(),
                Some(v) => {
                    return Err(ResolveError::NoSuchVersion {
                        package: name.clone(),
                        version: v.clone(),
                        known: newest_first(versions)?.join(", "),
                    })
                }
                // What `apt-get install NAME` would take (pin priorities respected:
                // bookworm-backports only when asked for).
                None => candidate(name)?.ok_or_else(|| ResolveError::UnknownPackage {
                    package: name.clone(),
                })?,
            };
            match meta_target(name, &version)? {
                // A meta-package: the kernel package it names at this version.
                Some(_) => resolve_meta(name, None, Some(&version)),
                None => Ok(Resolved {
                    release: release_of(name),
                    package: name.clone(),
                    version,
                }),
            }
        }
    }
}

/// Where apt keeps its lists (unless `APT_CONFIG` moves them).
const APT_LISTS: &str = "/var/lib/apt/lists";

/// The state of apt's `Packages` lists: each file's name, size and mtime, hashed. A
/// resolution depends on nothing else, so it holds as long as this does. `None` when
/// `APT_CONFIG` points apt elsewhere or the lists cannot be read (no memo then).
fn lists_state() -> Option<String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    if std::env::var_os("APT_CONFIG").is_some() {
        return None;
    }
    let mut files: Vec<String> = std::fs::read_dir(APT_LISTS)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some(format!(
                "{} {} {}.{}",
                e.file_name().to_string_lossy(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ))
        })
        .collect();
    if files.is_empty() {
        return None;
    }
    files.sort();
    let h = sha2::Sha256::digest(files.join("\n").as_bytes());
    Some(h.iter().map(|b| format!("{b:02x}")).collect())
}

/// One remembered resolution.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Memo {
    lists: String,
    package: String,
    version: String,
    release: String,
}

/// [`resolve`], remembered in `memo` (a JSON file) for as long as apt's lists stay as
/// they were: `apt-cache` takes about a second a call, three calls a resolution, which
/// every run would otherwise pay. A memo that cannot be read or written is ignored.
pub fn resolve_remembered(req: &KernelRequest, memo: &Path) -> Result<Resolved, ResolveError> {
    let key = req.describe();
    let state = lists_state();
    let mut all: BTreeMap<String, Memo> = std::fs::read(memo)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let (Some(state), Some(m)) = (&state, all.get(&key)) {
        if m.lists == *state {
            tracing::debug!(requested = %key, package = %m.package, "resolution remembered: apt's lists are unchanged");
            return Ok(Resolved {
                package: m.package.clone(),
                version: m.version.clone(),
                release: m.release.clone(),
            });
        }
    }
    let pb = crate::progress::spinner(&format!("resolving {key} in apt's package lists"));
    let r = resolve(req);
    pb.finish_and_clear();
    let r = r?;
    if let Some(state) = state {
        all.insert(
            key,
            Memo {
                lists: state,
                package: r.package.clone(),
                version: r.version.clone(),
                release: r.release.clone(),
            },
        );
        let tmp = memo.with_extension(format!("tmp{}", std::process::id()));
        let written = serde_json::to_vec_pretty(&all)
            .ok()
            .and_then(|t| std::fs::write(&tmp, t).ok())
            .and_then(|()| std::fs::rename(&tmp, memo).ok());
        if written.is_none() {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(memo = %memo.display(), "cannot remember the resolution");
        }
    }
    Ok(r)
}

/// The kernel package that `meta` (at `version`, else its newest version of `series`)
/// depends on.
fn resolve_meta(
    meta: &str,
    series: Option<&str>,
    version: Option<&str>,
) -> Result<Resolved, ResolveError> {
    let versions = versions_of(meta)?;
    if versions.is_empty() {
        return Err(ResolveError::UnknownPackage {
            package: meta.to_owned(),
        });
    }
    let all: Vec<String> = versions.iter().map(|(v, _)| v.clone()).collect();
    let version = match version {
        Some(v) => v.to_owned(),
        None => {
            let series = series.unwrap_or("");
            let prefix = format!("{series}.");
            let fit: Vec<(String, String)> = versions
                .into_iter()
                .filter(|(v, _)| v.starts_with(&prefix))
                .collect();
            if fit.is_empty() {
                return Err(ResolveError::NoSeries {
                    meta: meta.to_owned(),
                    series: series.to_owned(),
                    known: all.join(", "),
                });
            }
            newest_first(fit)?.remove(0)
        }
    };
    let (package, pinned) = meta_target(meta, &version)?.ok_or_else(|| ResolveError::NoTarget {
        meta: meta.to_owned(),
        version: version.clone(),
    })?;
    let target_versions = versions_of(&package)?;
    if target_versions.is_empty() {
        return Err(ResolveError::UnknownPackage { package });
    }
    let version = match pinned {
        Some(v) => v,
        None => newest_first(target_versions.clone())?.remove(0),
    };
    if !target_versions.iter().any(|(v, _)| *v == version) {
        return Err(ResolveError::NoSuchVersion {
            package,
            known: newest_first(target_versions)?.join(", "),
            version,
        });
    }
    Ok(Resolved {
        release: release_of(&package),
        package,
        version,
    })
}

/// apt's candidate version of `package` (`apt-cache policy`), if it has one.
fn candidate(package: &str) -> Result<Option<String>, ResolveError> {
    let text = apt_cache(&["policy", package])?;
    Ok(parse_candidate(&text))
}

/// The `Candidate:` of `apt-cache policy` output; `None` for `(none)` or no such line.
fn parse_candidate(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
}

/// Every (version, suite line) of `package` in apt's lists (`apt-cache madison`).
fn versions_of(package: &str) -> Result<Vec<(String, String)>, ResolveError> {
    let out = apt_cache(&["madison", package])?;
    Ok(parse_madison(&out, package))
}

/// The `version | where` pairs of `apt-cache madison` output for `package`.
fn parse_madison(text: &str, package: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let mut cols = line.split('|').map(str::trim);
        let (Some(name), Some(version), Some(from)) = (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        // madison also lists source packages ("Sources"): binary records only.
        if name == package && from.ends_with("Packages") && !v.iter().any(|(x, _)| x == version) {
            v.push((version.to_owned(), from.to_owned()));
        }
    }
    v
}

/// The `linux-image-*` package that `package` `version` depends on, with the version
/// its `(= V)` constraint pins, if any; `None` when it depends on none (a kernel
/// package itself).
fn meta_target(
    package: &str,
    version: &str,
) -> Result<Option<(String, Option<String>)>, ResolveError> {
    let text = apt_cache(&["show", &format!("{package}={version}")])?;
    if text.trim().is_empty() {
        return Err(ResolveError::NoSuchVersion {
            package: package.to_owned(),
            version: version.to_owned(),
            known: String::new(),
        });
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .and_then(parse_kernel_dependency))
}

/// The first `linux-image-*` of a `Depends` field, and its `(= V)` version if any.
fn parse_kernel_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends.split(',').find_map(|d| {
        // An alternative (`a | b`): its first choice.
        let d = d.split('|').next()?.trim();
        let mut words = d.split_whitespace();
        let name = words.next()?;
        if !name.starts_with("linux-image-") {
            return None;
        }
        let rest: String = words.collect::<Vec<_>>().join(" ");
        let pinned = rest
            .strip_prefix("(=")
            .and_then(|r| r.strip_suffix(')'))
            .map(|v| v.trim().to_owned());
        Some((name.to_owned(), pinned))
    })
}

fn apt_cache(args: &[&str]) -> Result<String, ResolveError> {
    let out = Command::new("apt-cache")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| ResolveError::ToolMissing {
            tool: "apt-cache",
            package: "apt",
            source,
        })?;
    // apt-cache exits non-zero for a name it does not know: that is an empty answer.
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `a > b` in Debian's version order (`dpkg --compare-versions`).
pub fn version_gt(a: &str, b: &str) -> Result<bool, ResolveError> {
    let st = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| ResolveError::ToolMissing {
            tool: "dpkg",
            package: "dpkg",
            source,
        })?;
    Ok(st.success())
}

/// The versions of `v`, newest first.
fn newest_first(v: Vec<(String, String)>) -> Result<Vec<String>, ResolveError> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for (version, _) in v {
        // Insertion sort: a handful of versions, each comparison one dpkg call.
        let mut at = out.len();
        for (i, have) in out.iter().enumerate() {
            if version_gt(&version, have)? {
                at = i;
                break;
            }
        }
        out.insert(at, version);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madison_lines() {
        let text = "linux-image-cloud-amd64 | 6.12.95-1~bpo12+1 | http://deb.debian.org/debian bookworm-backports/main amd64 Packages\n\
                    linux-image-cloud-amd64 |  6.1.192-3 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n\
                    linux-image-cloud-amd64 |  6.1.192-3 | http://mirror/debian-security bookworm-security/main amd64 Packages\n\
                    linux-signed-amd64 | 6.1.192+3 | http://deb.debian.org/debian bookworm/main Sources\n\
                    garbage\n";
        assert_eq!(
            parse_madison(text, "linux-image-cloud-amd64"),
            vec![
                (
                    "6.12.95-1~bpo12+1".to_owned(),
                    "http://deb.debian.org/debian bookworm-backports/main amd64 Packages"
                        .to_owned()
                ),
                (
                    "6.1.192-3".to_owned(),
                    "http://deb.debian.org/debian-security bookworm-security/main amd64 Packages"
                        .to_owned()
                ),
            ]
        );
    }

    #[test]
    fn policy_candidate() {
        let text = "linux-image-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-3\n  Version table:\n     6.12.95-1~bpo12+1 100\n";
        assert_eq!(parse_candidate(text), Some("6.1.192-3".to_owned()));
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn kernel_dependency() {
        assert_eq!(
            parse_kernel_dependency("linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"),
            Some((
                "linux-image-6.1.0-57-cloud-amd64".into(),
                Some("6.1.192-3".into())
            ))
        );
        assert_eq!(
            parse_kernel_dependency("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"),
            None
        );
        assert_eq!(
            parse_kernel_dependency("foo, linux-image-6.12.95+deb12-cloud-amd64"),
            Some(("linux-image-6.12.95+deb12-cloud-amd64".into(), None))
        );
    }

    #[test]
    fn requests_parse_and_refuse() {
        assert_eq!(
            KernelRequest::parse("linux-image-6.1.0-50-cloud-amd64=6.1.176-1").expect("pin"),
            KernelRequest::Package {
                name: "linux-image-6.1.0-50-cloud-amd64".into(),
                version: Some("6.1.176-1".into())
            }
        );
        assert_eq!(
            KernelRequest::parse("linux-image-rt-amd64")
                .expect("meta")
                .describe(),
            "linux-image-rt-amd64"
        );
        for bad in [
            "linux-image-6.1.0-50-cloud-amd64-dbg",
            "bash",
            "linux-image-",
            "linux-image-amd64=",
            "linux-image-amd64;rm",
        ] {
            let e = KernelRequest::parse(bad).expect_err(bad);
            assert_eq!(
                e.to_string(),
                format!("{bad} is not a Debian kernel image package (expected linux-image-..., not a -dbg package)")
            );
        }
        assert_eq!(
            release_of("linux-image-6.12.117+deb12-cloud-amd64-unsigned"),
            "6.12.117+deb12-cloud-amd64"
        );
    }

    /// apt's lists, as the resolution reads them: a meta-package of every flavour known.
    fn apt_lists() -> Result<(), String> {
        for meta in ["linux-image-cloud-amd64", "linux-image-rt-amd64"] {
            if versions_of(meta).map_err(|e| e.to_string())?.is_empty() {
                return Err(format!(
                    "apt's lists do not have {meta} (run apt-get update)"
                ));
            }
        }
        Ok(())
    }

    /// `apt-cache show PACKAGE=VERSION`'s record: (Package, Version, Filename).
    fn index_record(package: &str, version: &str) -> (String, String, String) {
        let text = apt_cache(&["show", &format!("{package}={version}")]).expect("apt-cache");
        let field = |f: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(f))
                .unwrap_or_else(|| panic!("no {f} in the record of {package}={version}: {text}"))
                .to_owned()
        };
        (field("Package: "), field("Version: "), field("Filename: "))
    }

    /// Every catalogue name resolves to a concrete `linux-image-<abi>-<flavour>` package
    /// of its series that the Packages index has at exactly that version, in the pool
    /// of Debian's signed kernels, and no version of its meta-packages in that series
    /// is newer.
    #[test]
    fn catalogue_resolves_to_packages_in_the_index() {
        ornament_test_gate::require!("apt-cache with Debian bookworm's lists", apt_lists());
        for spec in crate::catalog::IMAGES {
            let r = resolve(&KernelRequest::Catalogue(spec.sources)).expect(spec.name);
            let expect_flavour = match spec.name {
                "debian-6.1-cloud" | "debian-6.12-cloud" => "-cloud-amd64",
                "debian-6.1-generic" => "-amd64",
                "debian-6.1-rt" => "-rt-amd64",
                other => panic!("no expectation for {other}"),
            };
            let series = spec.sources[0].series;
            assert!(
                r.package.starts_with(&format!("linux-image-{series}."))
                    && r.package.ends_with(expect_flavour)
                    && (expect_flavour != "-amd64"
                        || !(r.package.ends_with("-cloud-amd64")
                            || r.package.ends_with("-rt-amd64"))),
                "{}: {r:?}",
                spec.name
            );
            assert_eq!(r.release, r.package["linux-image-".len()..], "{r:?}");
            assert!(r.version.starts_with(&format!("{series}.")), "{r:?}");
            let (p, v, file) = index_record(&r.package, &r.version);
            assert_eq!(
                (p.as_str(), v.as_str()),
                (r.package.as_str(), r.version.as_str())
            );
            assert!(
                file.ends_with(&format!(
                    "/{}_{}_amd64.deb",
                    r.package,
                    r.version.replace(':', "%3a")
                )),
                "{file}"
            );
            for src in spec.sources {
                for (v, _) in versions_of(src.meta).expect("madison") {
                    if v.starts_with(&format!("{}.", src.series)) {
                        assert!(
                            !version_gt(&v, &r.version).expect("dpkg"),
                            "{}: {} {v} is newer than {r:?}",
                            spec.name,
                            src.meta
                        );
                    }
                }
            }
        }
    }

    /// A pinned version the index does not have is refused naming the package, the
    /// version and the versions it has; a pinned one it has resolves to itself; a
    /// meta-package named by the user resolves to its kernel package.
    #[test]
    fn pinned_versions() {
        ornament_test_gate::require!("apt-cache with Debian bookworm's lists", apt_lists());
        let pkg = crate::catalog::reference(crate::catalog::DEFAULT_IMAGE).package;
        let have: Vec<String> = versions_of(pkg)
            .expect("madison")
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        ornament_test_gate::require!(&format!("{pkg} in apt's lists"), !have.is_empty());
        let e = resolve(&KernelRequest::parse(&format!("{pkg}=0.0-nope")).expect("parse"))
            .expect_err("no such version");
        assert_eq!(
            e.to_string(),
            format!(
                "package {pkg} has no version 0.0-nope in apt's package lists (it has: {})",
                newest_first(have.iter().map(|v| (v.clone(), String::new())).collect())
                    .expect("dpkg")
                    .join(", ")
            )
        );
        let r = resolve(&KernelRequest::parse(&format!("{pkg}={}", have[0])).expect("parse"))
            .expect("pinned");
        assert_eq!(
            r,
            Resolved {
                package: pkg.to_owned(),
                version: have[0].clone(),
                release: "6.1.0-50-cloud-amd64".to_owned()
            }
        );
        let e = resolve(&KernelRequest::parse("linux-image-no-such-flavour").expect("parse"))
            .expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "package linux-image-no-such-flavour is not in apt's package lists (run apt-get update, or check its name)"
        );
        // The user's meta-package: the kernel package its candidate version (what
        // `apt-get install` would take; not bookworm-backports' 6.12) depends on.
        let meta =
            resolve(&KernelRequest::parse("linux-image-rt-amd64").expect("parse")).expect("meta");
        let cand = candidate("linux-image-rt-amd64")
            .expect("policy")
            .expect("a candidate");
        assert!(cand.starts_with("6.1."), "{cand}");
        let (target, pinned) = meta_target("linux-image-rt-amd64", &cand)
            .expect("show")
            .expect("depends");
        assert_eq!(meta.package, target);
        assert_eq!(Some(meta.version.clone()), pinned);
        index_record(&meta.package, &meta.version);
    }
}
