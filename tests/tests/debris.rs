//! Nothing left behind: `ornament` SIGKILLed during start-up (QEMU started, the kernel
//! not yet run), mid-run, and during `image build --rebuild` (with a cache of its own)
//! leaves no RAM file in /dev/shm and no QEMU, and the next start removes its run
//! directory and partial image.

use ornament_tests::{
    can_build_images, has_qemu, ornament, ornament_env, processes_mentioning, require_host,
    send_signal, wait_until, Background, GUEST_TIMEOUT_SECS,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// /dev/shm entries named with `pid` (older versions named the RAM file
/// `ornament-ram-<pid>-...` there).
fn shm_files_of(pid: u32) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("ornament-ram-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Every file (not directory) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// After ornament (pid `pid`) was SIGKILLed: its QEMU dies with it (at once: it has
/// PDEATHSIG) and no RAM file of it is in /dev/shm.
fn check_killed_run(pid: u32, rt: &Path) {
    let rt_name = rt.to_string_lossy().into_owned();
    let gone = wait_until(Duration::from_secs(10), || {
        processes_mentioning(&rt_name).is_empty()
    });
    assert!(
        gone,
        "still running 10 s after ornament's SIGKILL: {:?}",
        processes_mentioning(&rt_name)
    );
    assert_eq!(shm_files_of(pid), Vec::<String>::new(), "RAM file left");
}

/// The next start in the same runtime directory (one that fails at once: --memory 64)
/// removes what the killed run left; then nothing is there.
fn next_start_sweeps(rt: tempfile::TempDir) {
    let next = Background::start_in(rt, &["run", "--memory", "64", "--", "true"], &[]);
    let (r, rt) = next.wait(Duration::from_secs(60));
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert_eq!(
        entries(rt.path()),
        Vec::<String>::new(),
        "left after the next start"
    );
}

fn guest_args(extra: &[&str], cmd: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--engine", "qemu", "--timeout"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(GUEST_TIMEOUT_SECS.to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a.push("--".into());
    a.extend(cmd.iter().map(|s| s.to_string()));
    a
}

fn start(extra: &[&str], cmd: &[&str]) -> Background {
    let args = guest_args(extra, cmd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Background::start(&args, &[])
}

#[test]
fn sigkill_during_start_up_leaves_nothing_after_the_next_start() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    // Built first, so that the run below spends no time on it.
    let (r, _rt) = ornament(&["image", "build"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut run = start(&["--watch", "exit"], &["true"]);
    // QEMU is up (started stopped, -S): ornament is attaching its gdbstub, plugin and
    // RAM, before the kernel has run an instruction.
    let up = wait_until(Duration::from_secs(60), || {
        !run.qemu_pids().is_empty() || run.has_exited()
    });
    assert!(up, "QEMU did not start: {}", run.stderr());
    assert!(!run.has_exited(), "{}", run.stderr());
    run.kill9();
    let pid = run.pid;
    check_killed_run(pid, run.rt());
    // What is left is named with the dead ornament's pid, for the next start to find.
    for e in entries(run.rt()) {
        assert!(e.starts_with(&format!("ornament-{pid}-")), "{e}");
    }
    next_start_sweeps(run.into_rt());
}

#[test]
fn sigkill_mid_run_leaves_no_file_and_nothing_after_the_next_start() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    let (r, _rt) = ornament(&["image", "build"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut run = start(
        &["--watch", "exec,exit"],
        &["sh", "-c", "echo ornament-test-ready; sleep 120"],
    );
    run.wait_for_stderr("ornament-test-ready", Duration::from_secs(240));
    // While it runs, no name is left of the run's RAM, sockets, status or initramfs:
    // QEMU and the plugin hold them open.
    assert_eq!(
        files_under(run.rt()),
        Vec::<PathBuf>::new(),
        "named files while running"
    );
    assert_eq!(shm_files_of(run.pid), Vec::<String>::new());
    let qemu = run.qemu_pids();
    assert_eq!(qemu.len(), 1, "one QEMU: {qemu:?}");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", qemu[0]))
        .expect("QEMU's fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    assert!(
        fds.iter().any(|l| l.starts_with("/memfd:ornament-ram")),
        "QEMU's guest RAM is the memfd: {fds:?}"
    );
    assert!(!fds.iter().any(|l| l.starts_with("/dev/shm/")), "{fds:?}");
    run.kill9();
    check_killed_run(run.pid, run.rt());
    next_start_sweeps(run.into_rt());
}

#[test]
fn sigkill_of_image_rebuild_leaves_no_partial_image_after_the_next_start() {
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    // The shared cache is only read: its image is copied into a cache of this test's own.
    let (r, _rt) = ornament(&["image", "build"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let shared = PathBuf::from(
        r.stdout
            .lines()
            .last()
            .and_then(|l| l.rsplit(": ").next())
            .expect("build prints the image dir"),
    );
    let version = shared.file_name().expect("version dir").to_owned();
    let cache = tempfile::tempdir().expect("cache");
    let images = cache.path().join("images/debian-6.1-cloud");
    let mine = images.join(&version);
    std::fs::create_dir_all(&mine).expect("mkdir");
    for e in std::fs::read_dir(&shared).expect("image dir").flatten() {
        std::fs::copy(e.path(), mine.join(e.file_name())).expect("copy image file");
    }
    let cache_env = [("ORNAMENT_CACHE_DIR", cache.path().to_str().expect("utf-8"))];
    let mut build = Background::start(
        &["image", "build", "debian-6.1-cloud", "--rebuild"],
        &cache_env,
    );
    let partial = || {
        entries(&images)
            .into_iter()
            .filter(|n| n.starts_with(".partial-"))
            .collect::<Vec<_>>()
    };
    let started = wait_until(Duration::from_secs(60), || {
        !partial().is_empty() || build.has_exited()
    });
    assert!(
        started && !build.has_exited(),
        "no partial build appeared: {}",
        build.stderr()
    );
    // Let it put something in it (the download starts at once).
    std::thread::sleep(Duration::from_millis(500));
    build.kill9();
    // apt-get, its child, does not die with it: stop it here so it downloads no more
    // into the cache (it works in the partial directory).
    let cache_name = cache.path().to_string_lossy().into_owned();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let in_cache = std::fs::read_link(p.path().join("cwd"))
            .is_ok_and(|c| c.to_string_lossy().starts_with(&cache_name));
        if in_cache {
            send_signal("KILL", &p.file_name().to_string_lossy());
        }
    }
    assert_eq!(partial().len(), 1, "the killed build's partial image");
    // The next start (the image is cached: nothing is built) removes it.
    let (r, _rt) = ornament_env(&["image", "build", "debian-6.1-cloud"], &cache_env);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains(&mine.display().to_string()),
        "{}",
        r.stdout
    );
    assert_eq!(partial(), Vec::<String>::new(), "partial image left");
    let mut left = entries(&images);
    left.sort();
    // The lock, the remembered resolution of the kernel package, the image.
    assert_eq!(
        left,
        vec![
            ".lock".to_owned(),
            ".resolved.json".to_owned(),
            version.to_string_lossy().into_owned()
        ]
    );
}
