//! `ornament image`: kernels resolved from Debian's meta-packages when an image is built,
//! pinned only by `--kernel-package`, cached images used when apt cannot answer, and
//! the per-run check against `image verify` (issue #18 item 5, issue #14 item 7).

use ornament_images::resolve::{self, KernelRequest};
use ornament_images::{catalog, DEFAULT_IMAGE};
use ornament_tests::{can_build_images, ornament_env, require_host, Ran};
use std::path::{Path, PathBuf};

/// `ornament ARGS` with the image cache in `cache` and `env` set.
fn image_cmd(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut all = args.to_vec();
    all.extend(["--cache-dir", cache.to_str().expect("utf-8")]);
    ornament_env(&all, env).0
}

/// The directory at the end of `image build`'s last stdout line.
fn built_dir(r: &Ran) -> PathBuf {
    assert_eq!(
        r.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    let line = r.stdout.lines().last().expect("build prints the image");
    PathBuf::from(line.rsplit(": ").next().expect("dir at the end"))
}

/// An apt configuration under `dir` that moves apt's lists to an empty directory (as on
/// a host that never ran `apt-get update`) or, with `lists`, keeps the host's lists but
/// sends every download to a closed port (the archive cannot be reached).
fn apt_config(dir: &Path, lists: bool) -> PathBuf {
    let conf = dir.join(if lists {
        "offline.conf"
    } else {
        "nolists.conf"
    });
    let empty = dir.join("empty-lists");
    std::fs::create_dir_all(empty.join("partial")).expect("mkdir");
    let text = if lists {
        "Acquire::http::Proxy \"http://127.0.0.1:9\";\nAcquire::Retries \"0\";\n".to_owned()
    } else {
        format!(
            "Dir::State::Lists \"{}\";\nDir::Cache::pkgcache \"\";\nDir::Cache::srcpkgcache \"\";\n",
            empty.display()
        )
    };
    std::fs::write(&conf, text).expect("write apt.conf");
    conf
}

/// The default image is built from the kernel package its meta-package names now, the
/// manifest records it, a second build is a no-op, a pinned version that does not
/// exist is refused by name, and with apt unable to answer (no lists, or the archive
/// unreachable) the cached image is used with a message saying resolution was skipped.
#[test]
fn default_image_resolves_pins_and_works_offline() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let spec = catalog::find(DEFAULT_IMAGE).expect("default");
    let want = require_host!(
        "apt's lists with the default image's meta-package (apt-get update)",
        resolve::resolve(&KernelRequest::Catalogue(spec.sources))
    );
    let cache = tempfile::tempdir().expect("cache");
    let r = image_cmd(cache.path(), &["image", "build"], &[]);
    let dir = built_dir(&r);
    assert_eq!(
        dir,
        cache
            .path()
            .join("images")
            .join(DEFAULT_IMAGE)
            .join(format!("{}_{}", want.package, want.version))
    );
    assert!(
        r.stdout.contains(&format!(
            "{DEFAULT_IMAGE} built (kernel {}, package {} {})",
            want.release, want.package, want.version
        )),
        "{}",
        r.stdout
    );
    let m = ornament_images::cache::read_manifest(&dir).expect("manifest");
    assert_eq!(
        (
            m.package.as_str(),
            m.package_version.as_str(),
            m.release.as_str()
        ),
        (
            want.package.as_str(),
            want.version.as_str(),
            want.release.as_str()
        )
    );
    assert_eq!(m.requested, "linux-image-cloud-amd64 (6.1)");
    let r = image_cmd(cache.path(), &["image", "build"], &[]);
    assert!(
        r.stdout.contains(&format!("{DEFAULT_IMAGE} cached")),
        "{}",
        r.stdout
    );

    // A version the index does not have: refused, naming package and version.
    let pin = format!("{}=0.0-nope", want.package);
    let r = image_cmd(
        cache.path(),
        &["image", "build", "--kernel-package", &pin],
        &[],
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains(&format!(
            "package {} has no version 0.0-nope in apt's package lists (it has: {})",
            want.package, want.version
        )),
        "{}",
        r.stderr
    );
    // Not a kernel package at all.
    let r = image_cmd(
        cache.path(),
        &[
            "image",
            "build",
            "--kernel-package",
            "linux-image-6.1.0-50-cloud-amd64-dbg",
        ],
        &[],
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr
            .contains("linux-image-6.1.0-50-cloud-amd64-dbg is not a Debian kernel image package"),
        "{}",
        r.stderr
    );

    // No apt lists: the cached image, resolution skipped.
    let conf = apt_config(cache.path(), false);
    let env = [("APT_CONFIG", conf.to_str().expect("utf-8"))];
    let r = image_cmd(cache.path(), &["image", "build"], &env);
    assert_eq!(built_dir(&r), dir);
    assert!(
        r.stderr.contains(&format!(
            "ornament: kernel package resolution skipped (package linux-image-cloud-amd64 is not in apt's package lists (run apt-get update, or check its name)); using the cached {DEFAULT_IMAGE} with {} {}",
            want.package, want.version
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.contains(&format!("{DEFAULT_IMAGE} cached")),
        "{}",
        r.stdout
    );

    // The lists name a kernel that is not cached, and the archive cannot be reached:
    // the older cached image of the same flavour (here: the same one moved aside).
    let older = dir.with_file_name("linux-image-6.1.0-1-cloud-amd64_6.1.1-1");
    std::fs::rename(&dir, &older).expect("move the image aside");
    let conf = apt_config(cache.path(), true);
    let env = [("APT_CONFIG", conf.to_str().expect("utf-8"))];
    let r = image_cmd(cache.path(), &["image", "build"], &env);
    assert_eq!(built_dir(&r), older);
    assert!(
        r.stderr.contains(&format!(
            "ornament: kernel package resolution skipped (cannot download {p} {v}: `apt-get download {p}={v}` failed",
            p = want.package,
            v = want.version
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "using the cached {DEFAULT_IMAGE} with {} {}\n",
            want.package, want.version
        )),
        "{}",
        r.stderr
    );
    // With no image cached, the same failure is an error.
    std::fs::remove_dir_all(&older).expect("rm");
    let r = image_cmd(cache.path(), &["image", "build"], &env);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains(&format!(
            "`apt-get download {}={}` failed",
            want.package, want.version
        )),
        "{}",
        r.stderr
    );
}

/// A truncated image file is caught by the per-run check and the image rebuilt; a
/// same-size change that the stamp cannot show is found by `image verify`, which then
/// drops the stamp so that the next run hashes, finds it and rebuilds.
#[test]
fn damaged_images_are_found_and_rebuilt() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let cache = tempfile::tempdir().expect("cache");
    let pin = ornament_tests::reference_package(DEFAULT_IMAGE);
    let build = ["image", "build", "--kernel-package", pin];
    let dir = built_dir(&image_cmd(cache.path(), &build, &[]));
    let r = image_cmd(cache.path(), &["image", "verify"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("ok: {} (7 files, ", dir.display())),
        "{}",
        r.stdout
    );
    let config = dir.join("config");

    // Truncated: the per-run check (size) finds it; the build rebuilds.
    let len = std::fs::metadata(&config).expect("stat").len();
    std::fs::File::options()
        .write(true)
        .open(&config)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let r = image_cmd(cache.path(), &build, &[("ORNAMENT_LOG", "warn")]);
    assert_eq!(built_dir(&r), dir);
    assert!(r.stdout.contains("debian-6.1-cloud built"), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!(
            "{} does not match the manifest: {} bytes, the manifest says {len}",
            config.display(),
            len / 2
        )),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::metadata(&config).expect("stat").len(), len);

    // Same size, same mtime, and the stamp renewed as if nothing had happened (what
    // bit rot looks like): the per-run check passes; `image verify` does not.
    let mut bytes = std::fs::read(&config).expect("read");
    bytes[0] ^= 0x20;
    let mtime = std::fs::metadata(&config)
        .expect("stat")
        .modified()
        .expect("mtime");
    std::fs::write(&config, &bytes).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&config)
        .expect("open")
        .set_modified(mtime)
        .expect("mtime");
    let m = ornament_images::cache::read_manifest(&dir).expect("manifest");
    ornament_images::cache::write_stamp(&dir, &m).expect("stamp");
    let r = image_cmd(cache.path(), &build, &[]);
    assert!(r.stdout.contains("debian-6.1-cloud cached"), "{}", r.stdout);
    let r = image_cmd(cache.path(), &["image", "verify", DEFAULT_IMAGE], &[]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stdout.contains(&format!(
            "damaged: {}: {} does not match the manifest: its SHA-256 differs",
            dir.display(),
            config.display()
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains("1 of 1 cached images are damaged"),
        "{}",
        r.stderr
    );
    // The next build (or run) rebuilds it.
    let r = image_cmd(cache.path(), &build, &[]);
    assert!(r.stdout.contains("debian-6.1-cloud built"), "{}", r.stdout);
    let r = image_cmd(cache.path(), &["image", "verify"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stdout);
}
