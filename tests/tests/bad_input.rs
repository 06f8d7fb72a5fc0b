//! Bad input to `ornament run`: each a clear error naming the file and the
//! problem, exit status 125, and nothing left behind (process, socket, RAM file).

use ornament_tests::{
    assert_nothing_left, can_build_images, has_kvm, has_qemu, ornament, ornament_env, require_host,
    Ran,
};
use std::path::PathBuf;

/// Build (or find) an image with its reference kernel (the messages checked here name
/// that kernel's release) and return its directory.
fn image_dir(name: &str) -> PathBuf {
    let pin = ornament_tests::reference_package(name);
    let (r, _rt) = ornament(&["image", "build", name, "--kernel-package", pin]);
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
            // Refused before boot: the map's linux_banner is not where the kernel
            // file has it (every run makes or loads the kernel's profile).
            "is not of kernel",
            "(6.1.0-50-cloud-amd64): linux_banner is at",
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

/// What our own VMM cannot trap (every syscall: `do_syscall_64` has no fentry site) is
/// refused before the guest runs (no minutes-long boot), with the reason and the way out.
#[test]
fn kvm_engine_refuses_every_syscall_watching() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    require_host!("/dev/kvm (read-write)", has_kvm());
    let (r, rt) = ornament(&[
        "run", "--engine", "kvm", "--force", "--watch", "syscall", "--", "true",
    ]);
    expect_failure(
        &r,
        rt.path(),
        &["do_syscall_64", "--watch syscall=NAME", "--engine qemu"],
    );
    assert!(
        !r.stderr.contains("Linux version"),
        "the guest ran: {}",
        r.stderr
    );
}

#[test]
fn usage_error_exits_125_as_documented() {
    let (r, rt) = ornament(&["run", "--no-such-flag", "--", "true"]);
    expect_failure(&r, rt.path(), &["--no-such-flag"]);
    let (r, _rt) = ornament(&["frobnicate"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    // Asking for help is not an error.
    let (r, _rt) = ornament(&["run", "--help"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("--watch"), "{}", r.stdout);
}

#[test]
fn empty_watch_list_is_refused() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    for list in ["", ","] {
        let (r, rt) = ornament(&["run", "--engine", "qemu", "--watch", list, "--", "true"]);
        expect_failure(
            &r,
            rt.path(),
            &[&format!("--watch {list:?} names no event")],
        );
    }
}

#[test]
fn add_larger_than_guest_memory_is_refused_before_boot() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let dir = tempfile::tempdir().expect("tmp");
    let big = dir.path().join("big.bin");
    // Sparse: 300 MiB long, nothing on disk.
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(300 << 20))
        .expect("sparse file");
    let spec = format!("{}:/big.bin", big.display());
    let (r, rt) = ornament(&["run", "--engine", "qemu", "--add", &spec, "--", "true"]);
    expect_failure(
        &r,
        rt.path(),
        &[
            &format!("--add {} (300 MiB)", big.display()),
            "more than --memory 512 MiB",
            "give --memory",
        ],
    );
    assert!(
        !r.stderr.contains("Linux version"),
        "it booted: {}",
        r.stderr
    );
}

#[test]
fn add_over_ornaments_own_files_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("fake-init");
    std::fs::write(&f, "#!/bin/sh\n").expect("write");
    for guest in ["/init", "//init", "/ornament/cmd", "/ornament"] {
        let spec = format!("{}:{guest}", f.display());
        let (r, rt) = ornament(&["run", "--add", &spec, "--", "true"]);
        expect_failure(
            &r,
            rt.path(),
            &[&format!("guest path {guest} is ornament's own")],
        );
    }
}

#[test]
fn qemu_refusing_to_start_is_reported_in_its_own_words() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, rt) = ornament(&[
        "run", "--engine", "qemu", "--memory", "10000000", "--", "true",
    ]);
    expect_failure(
        &r,
        rt.path(),
        &[
            "QEMU exited with code 1 during start-up",
            "QEMU said:\nqemu-system-x86_64: ",
        ],
    );
    assert!(!r.stderr.contains("gdbstub"), "{}", r.stderr);
}

#[test]
fn system_map_is_checked_when_a_profile_is_in_use() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let k61 = image_dir("debian-6.1-cloud");
    let k612 = image_dir("debian-6.12-cloud");
    let map = k612.join("System.map");
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles/6.1.0-50-cloud-amd64.json");
    let (r, rt) = ornament(&[
        "run",
        "--engine",
        "qemu",
        "--timeout",
        "300",
        "--kernel",
        k61.join("vmlinuz").to_str().expect("utf8"),
        "--profile",
        profile.to_str().expect("utf8"),
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
            map.to_str().expect("utf8"),
            // Refused before boot: the map's linux_banner is not where the kernel
            // file has it (every run makes or loads the kernel's profile).
            "is not of kernel",
            "(6.1.0-50-cloud-amd64): linux_banner is at",
        ],
    );
    assert!(
        !r.stderr.contains("Power down"),
        "the guest ran on: {}",
        r.stderr
    );
}

#[test]
fn ps_against_a_socket_that_never_answers_times_out() {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    // Accepts, reads nothing, answers nothing, keeps the connection open.
    let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let begin = std::time::Instant::now();
    let (r, _rt) = ornament(&[
        "ps",
        "--control",
        sock.to_str().expect("utf-8"),
        "--timeout",
        "2",
    ]);
    let took = begin.elapsed();
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "the control socket {} did not answer within 2 s",
            sock.display()
        )),
        "{}",
        r.stderr
    );
    assert!(
        took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(10),
        "{took:?}"
    );
    drop(held.join().expect("accept thread"));
}
