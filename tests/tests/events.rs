//! Events from real guests (issue #5): a workload that does known things
//! (`ornament-workload all`: forks with distinct exit codes, threads, an exec with
//! an argv longer than a page, a failed exec, vfork, a three-level tree, a syscall
//! with recognisable arguments K times, a child killed by SIGKILL) prints what it
//! did; every event of its process tree is checked against that, one by one:
//! nothing missing, duplicated or invented.

use ornament_tests::schema::{check_lineage, check_schema};
use ornament_tests::workload::{self, check_workload_events, events, facts, i};
use ornament_tests::{assert_nothing_left, has_kvm, ornament, require_host, GUEST_TIMEOUT_SECS};
use serde_json::Value;

fn check(image: &str, vcpus: &str) {
    check_on(image, vcpus, &[], GUEST_TIMEOUT_SECS);
}

/// Run the workload with `engine` arguments (empty: the default engine) and check
/// every event against what it says it did.
fn check_on(image: &str, vcpus: &str, engine: &[&str], timeout_secs: u64) {
    check_boot(&["--image", image], vcpus, engine, timeout_secs);
}

/// Run the workload on the guest `boot` names (`--image NAME` or `--kernel FILE`).
fn check_boot(boot: &[&str], vcpus: &str, engine: &[&str], timeout_secs: u64) {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
    let timeout = timeout_secs.to_string();
    let args: Vec<&str> = ["run"]
        .into_iter()
        .chain(engine.iter().copied())
        .chain(boot.iter().copied())
        .chain(["--vcpus", vcpus])
        .chain(workload::json_events_args(
            &timeout,
            out.to_str().expect("utf8"),
        ))
        .chain(["--"])
        .chain(workload::COMMAND)
        .collect();
    let (r, rt) = ornament(&args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let evs = events(&out);
    // Our VMM traps fentry sites only: no syscall results or failed execs there.
    let results = !engine.contains(&"kvm");
    check_workload_events(&r.stderr, &evs, results);
    check_schema(&evs);
    check_lineage(&evs);
}

macro_rules! gate {
    () => {
        ornament_tests::require_qemu_guest!()
    };
}

#[test]
fn events_6_1_one_vcpu() {
    gate!();
    check("debian-6.1-cloud", "1");
}

#[test]
fn events_6_1_two_vcpus() {
    gate!();
    check("debian-6.1-cloud", "2");
}

/// Issue #8: the same workload and the same checks through our own VMM. On this
/// project's PVM hosts it runs in PVM compatibility mode (`--force`): kernel mode is
/// emulated, so the boot takes minutes (~7 to `Run /init`); the one test allowed to.
#[test]
fn events_6_1_through_our_kvm_vmm() {
    gate!();
    require_host!("/dev/kvm (read-write)", has_kvm());
    check_on(
        "debian-6.1-cloud",
        "1",
        &["--engine", "kvm", "--force"],
        KVM_TIMEOUT_SECS,
    );
}

/// The KVM test's time box: a PVM boot plus the workload in emulated kernel mode.
const KVM_TIMEOUT_SECS: u64 = 1800;

#[test]
fn events_6_12_one_vcpu() {
    gate!();
    check("debian-6.12-cloud", "1");
}

#[test]
fn events_6_12_two_vcpus() {
    gate!();
    check("debian-6.12-cloud", "2");
}

/// Issue #18: a kernel file alone (the 6.12 bzImage of its linux-image package, no
/// image, profile or System.map): ornament makes the profile from the kernel's own
/// kallsyms and BTF, caches it by the file's SHA-256, and the events are exact.
#[test]
fn events_from_a_kernel_file_alone() {
    gate!();
    let spec = ornament_images::catalog::reference("debian-6.12-cloud");
    let files = match ornament_images::reference::fetch(&spec, false, None) {
        Ok(f) => f,
        Err(e) => {
            if !ornament_tests::require(&format!("the bzImage of {} ({e})", spec.package), false) {
                return;
            }
            unreachable!("require fails under CI");
        }
    };
    let kernel = files.kernel.to_str().expect("utf-8");
    check_boot(&["--kernel", kernel], "1", &[], GUEST_TIMEOUT_SECS);
    let sha = ornament_images::cache::hash_file(&files.kernel)
        .expect("hash")
        .sha256;
    // `<sha>-r<revision>.json`: whatever revision the generator is at.
    let dir = ornament_images::cache_root(None).join("profiles");
    let cached = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{sha}-r")))
        })
        .unwrap_or_else(|| panic!("no cached profile for {sha} in {}", dir.display()));
    let profile =
        std::fs::read_to_string(&cached).unwrap_or_else(|e| panic!("{}: {e}", cached.display()));
    assert!(
        profile.contains("\"release\": \"6.12.117+deb12-cloud-amd64\""),
        "{}",
        cached.display()
    );
}

#[test]
fn unknown_syscall_and_bad_errno_are_refused() {
    gate!();
    let (r, rt) = ornament(&["run", "--watch", "syscall=nosuchcall", "--", "true"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(r.stderr.contains("nosuchcall"), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let (r, rt) = ornament(&["run", "--deny-syscall", "mkdirat:5000", "--", "true"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(r.stderr.contains("5000"), "{}", r.stderr);
    assert_nothing_left(&r, rt.path());
    let (r, _rt) = ornament(&["run", "--watch", "fork,bogus", "--", "true"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(r.stderr.contains("bogus"), "{}", r.stderr);
}

/// The workload's events, with pids relative to its root, and host times and the run's
/// identities (which differ from run to run) dropped.
fn tree_events(evs: &[Value], root: i64) -> Vec<Value> {
    let rel = |v: &Value| {
        v.as_i64()
            .map(|p| Value::from(p - root))
            .unwrap_or(Value::Null)
    };
    evs.iter()
        .filter(|e| e["tgid"].as_i64().is_some_and(|t| t >= root))
        .filter(|e| e["comm"] != "sync" && e["argv"][0] != "poweroff")
        .map(|e| {
            let mut e = e.clone();
            let o = e.as_object_mut().expect("object");
            // `seq` counts every event, and only the plugin reports syscall results.
            for k in [
                "seq",
                "entry_time_ns",
                "time_ns",
                "vcpu",
                "time",
                "run_id",
                "host",
                "exec_id",
                "parent_exec_id",
                "child_exec_id",
            ] {
                o.remove(k);
            }
            for k in ["pid", "tgid", "ppid", "child_pid", "child_tgid"] {
                if let Some(v) = o.get(k).cloned() {
                    if k == "ppid" && v.as_i64().is_some_and(|p| p < root) {
                        continue;
                    }
                    o.insert(k.to_owned(), rel(&v));
                }
            }
            e
        })
        .collect()
}

#[test]
fn gdbstub_and_plugin_backends_give_identical_events() {
    gate!();
    let mut runs = Vec::new();
    for trap in ["plugin", "gdbstub"] {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("events.json");
        let (r, rt) = ornament(&[
            "run",
            "--trap",
            trap,
            "--timeout",
            "600",
            "--watch",
            "fork,exec,exit,syscall=getpriority",
            "--format",
            "json",
            "--output",
            out.to_str().expect("utf8"),
            "--",
            "sh",
            "-c",
            "/ornament/bin/ornament-workload forkexit 3; /ornament/bin/ornament-workload syscall 2",
        ]);
        assert_eq!(r.code, Some(0), "{trap}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("ornament: trap {trap}")),
            "{}",
            r.stderr
        );
        assert_nothing_left(&r, rt.path());
        let f = facts(&r.stderr);
        let evs = events(&out);
        check_schema(&evs);
        check_lineage(&evs);
        // The shell that runs both workloads is the root of the tree.
        let root = evs
            .iter()
            .find(|e| e["event"] == "exec" && e["argv"][0] == "sh" && e["argv"][1] == "-c")
            .map(|e| i(e, "pid"))
            .expect("exec of the shell");
        let tree = tree_events(&evs, root);
        let forks = tree.iter().filter(|e| e["event"] == "fork").count();
        // sh forks the first workload and execs the last command itself.
        assert_eq!(
            forks,
            1 + 3,
            "{trap}: one fork by sh, three by forkexit: {tree:#?}"
        );
        let codes: Vec<i64> = tree
            .iter()
            .filter(|e| e["event"] == "exit")
            .map(|e| i(e, "exit_code"))
            .collect();
        assert_eq!(codes, vec![10, 11, 12, 0, 0], "{trap}: exit codes in order");
        let calls = tree
            .iter()
            .filter(|e| e["event"] == "syscall" && e["args"][1] == 4242)
            .count();
        assert_eq!(calls, 2, "{trap}: getpriority calls");
        assert!(f.root >= root, "the workloads run in the shell's tree");
        // Syscall results come from the plugin only (the gdbstub would stop the guest at
        // every syscall's return): two there, none through the gdbstub; the rest agrees.
        let returns = tree
            .iter()
            .filter(|e| e["event"] == "syscall_return" && e["errno"] == "ESRCH")
            .count();
        assert_eq!(
            returns,
            if trap == "plugin" { 2 } else { 0 },
            "{trap}: getpriority returns"
        );
        let tree: Vec<Value> = tree
            .into_iter()
            .filter(|e| e["event"] != "syscall_return")
            .collect();
        runs.push(tree);
    }
    assert_eq!(runs[0], runs[1], "the two backends disagree");
}

#[test]
fn qemu_killed_mid_run_keeps_the_events_and_fails() {
    gate!();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("events.json");
    let rt = tempfile::tempdir().expect("runtime dir");
    let child = std::process::Command::new(ornament_tests::ornament_bin())
        .args([
            "run",
            "--timeout",
            "300",
            "--watch",
            "fork,exec,exit",
            "--format",
            "json",
        ])
        .arg("--output")
        .arg(&out)
        .args(["--", "sh", "-c", "echo started; exec sleep 600"])
        .env("XDG_RUNTIME_DIR", rt.path())
        .env("TMPDIR", rt.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ornament");
    let pid = child.id();
    // Wait until the guest command runs (the sleep's exec event is in the file).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("\"sleep\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never ran sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Kill QEMU, ornament's child.
    let qemu = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .find(|p| {
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1));
            let exe = std::fs::read_link(p.path().join("exe")).unwrap_or_default();
            ppid == Some(&pid.to_string()) && exe.to_string_lossy().contains("qemu-system")
        })
        .expect("QEMU child of ornament");
    let qpid = qemu.file_name().to_string_lossy().into_owned();
    let st = std::process::Command::new("kill")
        .args(["-9", &qpid])
        .status()
        .expect("kill");
    assert!(st.success());
    let o = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    // QEMU's own death is the story, not a guest that stopped without a status.
    assert!(
        stderr.contains("QEMU was killed by signal 9 (SIGKILL) while the guest ran"),
        "{stderr}"
    );
    let evs = events(&out);
    assert!(
        evs.iter()
            .any(|e| e["event"] == "exec" && e["argv"][0] == "sleep"),
        "events before the kill are kept"
    );
    let left: Vec<_> = std::fs::read_dir(rt.path())
        .expect("rt")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Whether `ornament ps` lists the exec'd workload: a row whose ARGS (after PID, PPID,
/// UID, COMM) are `/ornament/bin/ornament-workload syscall 1` (the shell that execs it
/// has that text inside its one `-c` argument, not as its own arguments).
fn workload_listed(ps: &str) -> bool {
    ps.lines().any(|l| {
        l.split_whitespace().skip(4).collect::<Vec<_>>()
            == ["/ornament/bin/ornament-workload", "syscall", "1"]
    })
}

/// Deny, pause and the control socket, one boot, the same checks on every engine: the
/// command's `mkdir` is denied with EPERM while a file write works; `--pause-on-exec`
/// stops the whole guest (a shell loop in the background that prints `TICK n` five times
/// a second prints nothing for the two seconds the guest stays paused); `ornament ps`
/// lists the exec'd workload while paused; the workload runs only after `resume`.
fn deny_pause_and_ps(engine: &[&str], timeout_secs: u64) {
    let rt = tempfile::tempdir().expect("runtime dir");
    let sock = rt.path().join("ctl.sock");
    let script = "mkdir /tmp/denied; echo mkdir-rc=$?; [ -e /tmp/denied ] || echo denied-absent; \
                  echo data > /tmp/file && cat /tmp/file; \
                  i=0; (while :; do i=$((i+1)); echo \"TICK $i\"; sleep 0.2; done) & \
                  sleep 1; exec /ornament/bin/ornament-workload syscall 1";
    let mut child = std::process::Command::new(ornament_tests::ornament_bin())
        .arg("run")
        .args(engine)
        .args(["--timeout", &timeout_secs.to_string(), "--control"])
        .arg(&sock)
        // busybox's mkdir calls mkdir(2); others call mkdirat(2).
        .args([
            "--deny-syscall",
            "mkdir:EPERM",
            "--deny-syscall",
            "mkdirat:EPERM",
        ])
        .args(["--pause-on-exec", "/ornament/bin/ornament-workload"])
        .args(["--", "sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ornament");
    // The console (ornament's stderr) as it comes.
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        use std::io::Read;
        let console = console.clone();
        let mut err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                console.lock().expect("console").push_str(&text);
            }
        })
    };
    let last_tick = || -> u64 {
        let c = console.lock().expect("console");
        c.lines()
            .filter_map(|l| l.trim().strip_prefix("TICK "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let ctl = |cmd: &str| -> String {
        let o = std::process::Command::new(ornament_tests::ornament_bin())
            .args([cmd, "--control"])
            .arg(&sock)
            .output()
            .expect("ornament client");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // Wait until the workload has exec'd and the guest is paused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    loop {
        if sock.exists() && workload_listed(&ctl("ps")) {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "ornament ended ({st}) before the workload exec'd:\n{}",
                console.lock().expect("console")
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the workload never exec'd:\n{}",
            console.lock().expect("console")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Let console output already on its way arrive, then watch the ticks for 2 s.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let at_pause = last_tick();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after_2s = last_tick();
    let during = ctl("ps");
    assert!(workload_listed(&during), "{during}");
    assert!(
        at_pause >= 1,
        "the ticker ran before the pause (5 ticks a second for 1 s): last tick {at_pause}"
    );
    assert_eq!(
        after_2s, at_pause,
        "the guest made progress while paused (ticks {at_pause} -> {after_2s})"
    );
    assert_eq!(ctl("resume").trim(), "resumed");
    let st = child.wait().expect("wait");
    reader.join().expect("console reader");
    let err = console.lock().expect("console").clone();
    assert_eq!(st.code(), Some(0), "{err}");
    for line in [
        "can't create directory '/tmp/denied': Operation not permitted",
        "mkdir-rc=1",
        "denied-absent",
    ] {
        assert!(err.contains(line), "mkdir was not denied ({line}): {err}");
    }
    // (Our VMM's console keeps the guest's CRLF line ends.)
    assert!(
        err.lines().any(|l| l.trim_end() == "data"),
        "other syscalls work: {err}"
    );
    let paused_at = err
        .find("an ornament paused the guest")
        .expect("pause announced");
    let started = err.find("W start").expect("the workload ran after resume");
    assert!(
        paused_at < started,
        "the workload printed before the pause: {err}"
    );
    assert!(err.contains("W done"), "{err}");
}

#[test]
fn deny_pause_and_ps_on_qemu() {
    gate!();
    deny_pause_and_ps(&[], 300);
}

/// The same test function on our own VMM (issue #13): on this project's PVM hosts in PVM
/// compatibility mode (`--force`), minutes to boot.
#[test]
fn deny_pause_and_ps_on_our_kvm_vmm() {
    gate!();
    require_host!("/dev/kvm (read-write)", has_kvm());
    deny_pause_and_ps(&["--engine", "kvm", "--force"], KVM_TIMEOUT_SECS);
}

/// Issue #18: kernels in no catalogue entry, resolved now from Debian's meta-packages
/// (6.1 generic and PREEMPT_RT of the current ABI, 6.12 generic), each booted from its
/// bzImage alone (`--kernel`, profile from its kallsyms and BTF) on one vCPU, with the
/// same exact checks. Their packages are fetched once into `<cache>/reference/`.
#[test]
fn events_on_kernels_resolved_from_meta_packages() {
    gate!();
    for meta in [
        "linux-image-amd64",
        "linux-image-rt-amd64",
        "linux-image-6.12-amd64",
    ] {
        let (package, kernel) = match ornament_images::reference::fetch_meta(meta, None) {
            Ok(k) => k,
            Err(e) => {
                if !ornament_tests::require(&format!("the kernel of {meta} ({e})"), false) {
                    return;
                }
                unreachable!("require fails under CI");
            }
        };
        eprintln!("{meta}: {package}");
        check_boot(
            &["--kernel", kernel.to_str().expect("utf-8")],
            "1",
            &[],
            GUEST_TIMEOUT_SECS,
        );
    }
}

/// Issue #16: what syscalls return, paired with their own entries. `ornament-workload
/// results` opens a missing file, reads 5 bytes from a pipe that a child fills 300 ms later
/// (the read blocks while the child runs), then exits; `exit_group` never returns.
#[test]
fn syscall_results_pair_with_their_entries() {
    gate!();
    for image in ["debian-6.1-cloud", "debian-6.12-cloud"] {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("events.json");
        let (r, rt) = ornament(&[
            "run",
            "--image",
            image,
            "--timeout",
            "600",
            "--watch",
            "fork,exit,syscall=openat,read,write,exit_group",
            "--format",
            "json",
            "--output",
            out.to_str().expect("utf8"),
            "--",
            "/ornament/bin/ornament-workload",
            "results",
        ]);
        assert_eq!(r.code, Some(0), "{image}: {}", r.stderr);
        assert_nothing_left(&r, rt.path());
        let evs = events(&out);
        check_schema(&evs);
        let line = r
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("W results "))
            .unwrap_or_else(|| panic!("{image}: no results line: {}", r.stderr));
        let kv = |k: &str| -> i64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {line}"))
        };
        let (pid, fd) = (kv("pid"), kv("fd"));
        assert_eq!((kv("open"), kv("read")), (-2, 5), "{line}");
        let mine = |e: &&Value| i(e, "pid") == pid;
        // The entry, and the one return that names its time.
        let pair = |what: &str, entry: &dyn Fn(&Value) -> bool| {
            let es: Vec<&Value> = evs
                .iter()
                .filter(mine)
                .filter(|e| e["event"] == "syscall" && entry(e))
                .collect();
            assert_eq!(es.len(), 1, "{image}: {what} entries: {es:#?}");
            let rets: Vec<&Value> = evs
                .iter()
                .filter(mine)
                .filter(|e| {
                    e["event"] == "syscall_return" && e["entry_time_ns"] == es[0]["time_ns"]
                })
                .collect();
            assert_eq!(rets.len(), 1, "{image}: {what} returns: {rets:#?}");
            assert_eq!(rets[0]["nr"], es[0]["nr"], "{image}");
            (es[0].clone(), rets[0].clone())
        };
        let (_, ret) = pair("openat", &|e| e["path"] == "/nonexistent-ornament");
        assert_eq!(
            (&ret["ret"], &ret["errno"]),
            (&(-2).into(), &"ENOENT".into()),
            "{image}"
        );
        // The blocking read: the child's write that ends it came while it waited.
        let (entry, ret) = pair("read", &|e| e["name"] == "read" && e["args"][0] == fd);
        assert_eq!(
            (&ret["ret"], &ret["errno"]),
            (&5.into(), &Value::Null),
            "{image}"
        );
        let between: Vec<&Value> = evs
            .iter()
            .filter(|e| i(e, "seq") > i(&entry, "seq") && i(e, "seq") < i(&ret, "seq"))
            .filter(|e| e["event"] == "syscall" && e["name"] == "write" && i(e, "ppid") == pid)
            .collect();
        assert_eq!(
            between.len(),
            1,
            "{image}: the child's write during the read"
        );
        assert_eq!(between[0]["args"][2], 5, "{image}");
        // exit_group never returns: its return says so, just before the exit.
        let (entry, ret) = pair("exit_group", &|e| e["name"] == "exit_group");
        assert_eq!(entry["args"][0], 0, "{image}");
        assert!(
            ret["ret"].is_null() && ret["errno"].is_null(),
            "{image}: {ret}"
        );
        let exit = evs
            .iter()
            .find(|e| e["event"] == "exit" && i(e, "pid") == pid)
            .expect("exit");
        assert_eq!(i(exit, "seq"), i(&ret, "seq") + 1, "{image}: {exit}");
    }
}
