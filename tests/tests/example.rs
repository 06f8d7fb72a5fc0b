//! The example ornament (`cli/examples/exec_counter.rs`, issue #13): a program of its
//! own running `ornament run` with an ornament that counts execs per binary and denies
//! `mkdir` under `/tmp/deny/`, on the default image.

use ornament_tests::{can_build_images, has_qemu, ornament_bin, require_host};

#[test]
fn the_example_ornament_counts_execs_and_denies_mkdir_under_tmp_deny() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    // `cargo test` builds the examples beside the binaries.
    let example = ornament_bin()
        .parent()
        .expect("target dir")
        .join("examples/exec_counter");
    assert!(
        example.exists(),
        "{} not built: run `cargo build --examples`",
        example.display()
    );
    let out = std::process::Command::new(&example)
        .args(["--timeout", "300", "--"])
        .args([
            "sh",
            "-c",
            "mkdir -p /tmp/deny; mkdir /tmp/deny/x; echo rc=$?; \
             [ -e /tmp/deny/x ] || echo x-absent; mkdir /tmp/ok && echo ok-made; /bin/true; exit 2",
        ])
        .output()
        .expect("run the example");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for line in [
        "mkdir: can't create directory '/tmp/deny/x': Operation not permitted\n",
        "\nrc=1\n",
        "\nx-absent\n",
        "\nok-made\n",
        // sh -c, then /bin/true: both busybox (mkdir and echo are applets in forks).
        "exec-counter:    3 /bin/busybox\n",
        "exec-counter: 1 mkdir under /tmp/deny/ denied\n",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
}
