//! Bad input to `ornament run`: each a clear error naming the file and the
//! problem, exit status 125, and nothing left behind (process, socket, RAM file).

use ornament_tests::{
    assert_nothing_left, can_build_images, has_kvm, has_qemu, ornament, ornament_env, require_host,
    Ran,
};
use std::path::PathBuf;

/// Build (or find) an image and return its directory.
fn image_dir(name: &str) -> PathBuf {
    let (r, _rt) = ornament(&["image", "build", name]);
    assert_eq!(r.code, Some(0), "image build {name}: {}", r.stderr);
    let line = r.stdout.lines().last().expect("build prints the image");
    PathBuf::from(line.rsplit(": ").next().expect("dir at the end"))
}

fn expect_failure(r: &Ran, rt: &std::path::Path, needles: &[&str]) {
    assert_eq!(
        r.code,
        Some(125),
        "stdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    for n in needles {
        assert!(r.stderr.contains(n), "expected {n:?} in: {}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_nothing_left(r, rt);
}

#[test]
fn missing_kernel_file() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = ornament(&["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"]);
    expect_failure(&r, rt.path(), &["/nonexistent/vmlinuz", "cannot be read"]);
}

#[test]
fn truncated_bzimage() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let img = image_dir("debian-6.1-cloud");
    let bytes = std::fs::read(img.join("vmlinuz")).expect("kernel");
    let dir = tempfile::tempdir().expect("tmp");
    let k = dir.path().join("truncated-vmlinuz");
    std::fs::write(&k, &bytes[..bytes.len() / 2]).expect("write");
    let (r, rt) = ornament(&["run", "--kernel", k.to_str().expect("utf8"), "--", "true"]);
    expect_failure(&r, rt.path(), &[k.to_str().expect("utf8"), "is truncated"]);
}

#[test]
fn neither_bzimage_nor_elf() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let dir = tempfile::tempdir().expect("tmp");
    let k = dir.path().join("not-a-kernel");
    std::fs::write(&k, vec![b'x'; 8192]).expect("write");
    let (r, rt) = ornament(&["run", "--kernel", k.to_str().expect("utf8"), "--", "true"]);
    expect_failure(&r, rt.path(), &["neither a bzImage", "nor an ELF"]);
}

#[test]
fn system_map_of_the_other_kernel() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let k61 = image_dir("debian-6.1-cloud");
    let k612 = image_dir("debian-6.12-cloud");
    let map = k612.join("System.map");
    let (r, rt) = ornament(&[
        "run",
        "--engine",
        "qemu",
        "--timeout",
        "300",
        "--kernel",
        k61.join("vmlinuz").to_str().expect("utf8"),
        "--system-map",
        map.to_str().expect("utf8"),
        "--",
        "sleep",
        "30",
    ]);
    expect_failure(
        &r,
        rt.path(),
        &[
            map.to_str().expect("utf8"),
            "does not belong to the running kernel",
            "Linux version 6.1.0-50-cloud-amd64",
        ],
    );
}

/// With `--watch` and no `--profile`, the profile is made from `--kernel` itself, and a
/// `--system-map` of another build is refused before anything boots.
#[test]
fn system_map_of_another_build_than_the_kernel_file() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let k61 = image_dir("debian-6.1-cloud");
    let map = image_dir("debian-6.12-cloud").join("System.map");
    let kernel = k61.join("vmlinuz");
    let (r, rt) = ornament(&[
        "run",
        "--kernel",
        kernel.to_str().expect("utf8"),
        "--system-map",
        map.to_str().expect("utf8"),
        "--watch",
        "exit",
        "--",
        "true",
    ]);
    expect_failure(
        &r,
        rt.path(),
        &[
            &format!(
                "System.map {} is not of kernel {} (6.1.0-50-cloud-amd64): linux_banner",
                map.display(),
                kernel.display()
            ),
            "is at 0xffffffff821529e0 there, at 0xffffffff8211fa00 in the kernel",
        ],
    );
    assert!(
        !r.stderr.contains("Linux version"),
        "it booted: {}",
        r.stderr
    );
}

#[test]
fn missing_qemu_binary() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = ornament_env(
        &["run", "--engine", "qemu", "--", "true"],
        &[("ORNAMENT_QEMU", "/nonexistent/qemu-system-x86_64")],
    );
    expect_failure(
        &r,
        rt.path(),
        &[
            "/nonexistent/qemu-system-x86_64",
            "apt-get install qemu-system-x86",
        ],
    );
}

#[test]
fn zero_vcpus() {
    let (r, rt) = ornament(&["run", "--vcpus", "0", "--", "true"]);
    expect_failure(&r, rt.path(), &["--vcpus 0", "between 1 and"]);
}

#[test]
fn memory_too_small() {
    let (r, rt) = ornament(&["run", "--memory", "64", "--", "true"]);
    expect_failure(&r, rt.path(), &["--memory 64 MiB is too small"]);
}

#[test]
fn unknown_image() {
    let (r, rt) = ornament(&["run", "--image", "debian-0.1", "--", "true"]);
    expect_failure(
        &r,
        rt.path(),
        &["unknown image debian-0.1", "debian-6.1-cloud"],
    );
}

#[test]
fn plugin_library_missing() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = ornament_env(
        &["run", "--trap", "plugin", "--watch", "exit", "--", "true"],
        &[(
            "ORNAMENT_TCG_PLUGIN",
            "/nonexistent/libornament_tcg_plugin.so",
        )],
    );
    expect_failure(
        &r,
        rt.path(),
        &["/nonexistent/libornament_tcg_plugin.so", "no such file"],
    );
}

#[test]
fn plugin_library_that_is_not_a_qemu_plugin() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    // Any shared library without qemu_plugin_install / qemu_plugin_version.
    let not_a_plugin = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libz is part of every Debian system");
    let (r, rt) = ornament_env(
        &["run", "--trap", "plugin", "--watch", "exit", "--", "true"],
        &[("ORNAMENT_TCG_PLUGIN", not_a_plugin)],
    );
    expect_failure(&r, rt.path(), &["Could not load plugin", not_a_plugin]);
}

#[test]
fn profile_of_the_other_kernel_is_refused() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let k61 = image_dir("debian-6.1-cloud");
    let other = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/6.12.117+deb12-cloud-amd64.json");
    let (r, rt) = ornament(&[
        "run",
        "--timeout",
        "300",
        "--kernel",
        k61.join("vmlinuz").to_str().expect("utf8"),
        "--profile",
        other.to_str().expect("utf8"),
        "--watch",
        "exit",
        "--",
        "true",
    ]);
    expect_failure(
        &r,
        rt.path(),
        &[
            "profile of kernel 6.12.117+deb12-cloud-amd64 does not belong to the running kernel",
            "Linux version 6.1.0-50-cloud-amd64",
        ],
    );
    assert!(
        !r.stderr.contains("Power down"),
        "the guest ran on unobserved: {}",
        r.stderr
    );
}

/// What our own VMM does not carry yet is refused before the (minutes-long) boot, each
/// with the reason and the way out.
#[test]
fn kvm_engine_refuses_what_it_cannot_do_yet() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    require_host!("/dev/kvm (read-write)", has_kvm());
    let kvm = ["run", "--engine", "kvm", "--force"];
    // (--pause-on-exec needs --control, refused here.)
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--deny-syscall", "mkdirat"],
            &[
                "--deny-syscall is not wired through --engine kvm",
                "--engine qemu",
            ],
        ),
        (
            &["--watch", "syscall"],
            &["do_syscall_64", "--watch syscall=NAME", "--engine qemu"],
        ),
        (
            &["--control", "/tmp/ornament-test-unused.sock"],
            &[
                "--control is not wired through --engine kvm",
                "--engine qemu",
            ],
        ),
    ];
    for (extra, needles) in cases {
        let args: Vec<&str> = kvm
            .iter()
            .chain(extra)
            .copied()
            .chain(["--", "true"])
            .collect();
        let (r, rt) = ornament(&args);
        expect_failure(&r, rt.path(), needles);
    }
}
