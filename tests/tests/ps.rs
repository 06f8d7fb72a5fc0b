//! `ornament ps` on real Debian guests: a guest command starts processes with known
//! names, arguments, uids and parents and waits; `ornament ps --control SOCKET` must list
//! exactly those (besides the kernel threads) while the guest runs, on both kernels,
//! with 1 and 2 vCPUs, with KASLR on (a slide found, and equal to what the guest's own
//! `/proc/kallsyms` says) and off (no slide).

use ornament_tests::{
    assert_nothing_left, can_build_images, has_qemu, ornament, ornament_bin, require_host, Ran,
    GUEST_TIMEOUT_SECS,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest command (`sh -c SCRIPT`): a user, then three children of this shell (one
/// running as uid 1000 / gid 1001 through `su`, one a shell with odd arguments that has
/// a child of its own, both in `/tmp`), then the kernel's own `_text` address (`/proc/kallsyms`, as root)
/// and the pids on the console, then it waits.
const SCRIPT: &str = r#"echo 'pstest:x:1000:1001:ps test:/tmp:/bin/sh' >> /etc/passwd
echo 'pstest:x:1001:' >> /etc/group
sleep 1000 & a=$!
su -s /bin/sh pstest -c 'exec sleep 1001' & b=$!
sh -c 'cd /tmp; sleep 1002 & echo "PSTEST-MID mid=$$ d=$!"; wait' 'two words' '' & c=$!
echo "PSTEST-TEXT $(grep ' _text$' /proc/kallsyms)"
echo "PSTEST-READY main=$$ a=$a b=$b c=$c"
wait"#;
/// The middle shell's script.
const MID_SCRIPT: &str = r#"cd /tmp; sleep 1002 & echo "PSTEST-MID mid=$$ d=$!"; wait"#;

/// How long a guest may take to boot, start the processes and show them.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// An `ornament run --control` in the background; killed if the test fails.
struct Run {
    child: Option<Child>,
    /// Its private runtime directory (holds the control socket); taken by `terminate`.
    rt: Option<tempfile::TempDir>,
    /// Where its stdout and stderr go.
    logs: tempfile::TempDir,
    sock: PathBuf,
}

impl Run {
    fn start(image: &str, vcpus: u32, append: Option<&str>) -> Self {
        let rt = tempfile::tempdir().expect("runtime dir");
        let logs = tempfile::tempdir().expect("log dir");
        let sock = rt.path().join("control.sock");
        let timeout = GUEST_TIMEOUT_SECS.to_string();
        let vcpus = vcpus.to_string();
        let mut args = vec![
            "run",
            "--engine",
            "qemu",
            "--image",
            image,
            // The release checked is the reference kernel's.
            "--kernel-package",
            ornament_tests::reference_package(image),
            "--vcpus",
            &vcpus,
            "--timeout",
            &timeout,
            "--control",
            sock.to_str().expect("utf-8 path"),
        ];
        if let Some(a) = append {
            args.extend(["--append", a]);
        }
        args.extend(["--", "sh", "-c", SCRIPT]);
        let file = |name: &str| std::fs::File::create(logs.path().join(name)).expect("log file");
        let child = Command::new(ornament_bin())
            .args(&args)
            .env("XDG_RUNTIME_DIR", rt.path())
            .env("TMPDIR", rt.path())
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .expect("start ornament run");
        Run {
            child: Some(child),
            rt: Some(rt),
            logs,
            sock,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, then wait (at most a minute) for it to end; what it did as a `Ran`,
    /// and its runtime directory (to check that nothing is left in it).
    fn terminate(mut self) -> (Ran, tempfile::TempDir) {
        let mut child = self.child.take().expect("running");
        let pid = child.id();
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ornament run did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let ran = Ran {
            code: status.code(),
            stdout: std::fs::read_to_string(self.logs.path().join("stdout")).unwrap_or_default(),
            stderr: self.stderr(),
            pid,
        };
        (ran, self.rt.take().expect("runtime dir"))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `key=value` pairs of the console line that starts with `marker`.
fn marker(console: &str, marker: &str) -> Option<BTreeMap<String, i64>> {
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(marker))?;
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// What one expected process must look like.
struct Want<'a> {
    pid: i64,
    ppid: i64,
    uid: u32,
    gid: u32,
    comm: &'static str,
    args: Vec<&'a str>,
    cwd: &'static str,
}

/// Check a `ps --json` response: exactly the wanted user processes (in any order),
/// everything else kernel threads under kthreadd.
fn check_exact(v: &Value, want: &[Want<'_>]) -> Result<(), String> {
    if v["ok"] != true || v["walk"] != "complete" {
        return Err(format!(
            "not a complete ps: ok={} walk={}",
            v["ok"], v["walk"]
        ));
    }
    let procs = v["processes"].as_array().ok_or("no processes array")?;
    let mut users = BTreeMap::new();
    for p in procs {
        let pid = p["pid"].as_i64().ok_or_else(|| format!("no pid: {p}"))?;
        if p["pid"] != p["tgid"] {
            return Err(format!("pid {pid} is not a thread-group leader: {p}"));
        }
        if p["kernel_thread"] == true {
            let ppid = if pid == 2 { 0 } else { 2 };
            // Kernel threads share init's fs_struct: their working directory is `/`.
            if p["ppid"] != ppid
                || p["args"] != json!([])
                || !p["exe"].is_null()
                || p["uid"] != 0
                || p["cwd"] != "/"
            {
                return Err(format!("odd kernel thread: {p}"));
            }
        } else if users.insert(pid, p).is_some() {
            return Err(format!("pid {pid} listed twice"));
        }
    }
    let pids: Vec<_> = users.keys().collect();
    let want_pids: Vec<_> = {
        let mut w: Vec<_> = want.iter().map(|w| w.pid).collect();
        w.sort_unstable();
        w
    };
    if pids.iter().map(|p| **p).collect::<Vec<_>>() != want_pids {
        return Err(format!(
            "user processes {pids:?}, want {want_pids:?}: {}",
            serde_json::to_string(&users).unwrap_or_default()
        ));
    }
    for w in want {
        let p = users[&w.pid];
        let got = json!({
            "ppid": p["ppid"], "uid": p["uid"], "euid": p["euid"], "gid": p["gid"],
            "egid": p["egid"], "comm": p["comm"], "args": p["args"], "exe": p["exe"],
            "args_truncated": p["args_truncated"], "cwd": p["cwd"],
        });
        let expected = json!({
            "ppid": w.ppid, "uid": w.uid, "euid": w.uid, "gid": w.gid, "egid": w.gid,
            "comm": w.comm, "args": w.args, "exe": "/bin/busybox", "args_truncated": false,
            "cwd": w.cwd,
        });
        if got != expected {
            return Err(format!("pid {}: got {got}, want {expected}", w.pid));
        }
    }
    Ok(())
}

/// Send request lines on one connection; one response per line.
fn converse(sock: &Path, lines: &[&str]) -> Vec<Value> {
    let mut s = UnixStream::connect(sock).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    for l in lines {
        s.write_all(format!("{l}\n").as_bytes()).expect("send");
    }
    let mut r = BufReader::new(s);
    lines
        .iter()
        .map(|_| {
            let mut line = String::new();
            r.read_line(&mut line).expect("response");
            serde_json::from_str(&line).expect("JSON response")
        })
        .collect()
}

fn ps_in_guest(image: &str, release: &str, vcpus: u32, append: Option<&str>) {
    let mut run = Run::start(image, vcpus, append);
    let begin = Instant::now();
    let mut last = String::from("the guest never printed its pids");
    let want = loop {
        if let Some(s) = run.exited() {
            panic!("ornament run ended early ({s}):\n{}", run.stderr());
        }
        assert!(
            begin.elapsed() < READY_TIMEOUT,
            "the processes did not show up within {READY_TIMEOUT:?}: {last}\nconsole:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(500));
        let console = run.stderr();
        let (Some(ready), Some(mid)) = (
            marker(&console, "PSTEST-READY"),
            marker(&console, "PSTEST-MID"),
        ) else {
            continue;
        };
        let want = vec![
            Want {
                pid: 1,
                ppid: 0,
                uid: 0,
                gid: 0,
                comm: "init",
                // The kernel hands the command-line words it does not know
                // (`nokaslr` is read only by the boot code) to init.
                args: ["/bin/busybox", "sh", "/init"]
                    .into_iter()
                    .chain(append.into_iter().flat_map(str::split_whitespace))
                    .collect(),
                cwd: "/",
            },
            Want {
                pid: ready["main"],
                ppid: 1,
                uid: 0,
                gid: 0,
                comm: "sh",
                args: vec!["sh", "-c", SCRIPT],
                cwd: "/",
            },
            Want {
                pid: ready["a"],
                ppid: ready["main"],
                uid: 0,
                gid: 0,
                comm: "sleep",
                args: vec!["sleep", "1000"],
                cwd: "/",
            },
            Want {
                pid: ready["b"],
                ppid: ready["main"],
                uid: 1000,
                gid: 1001,
                comm: "sleep",
                args: vec!["sleep", "1001"],
                cwd: "/",
            },
            Want {
                pid: ready["c"],
                ppid: ready["main"],
                uid: 0,
                gid: 0,
                comm: "sh",
                args: vec!["sh", "-c", MID_SCRIPT, "two words", ""],
                cwd: "/tmp",
            },
            Want {
                pid: mid["d"],
                ppid: mid["mid"],
                uid: 0,
                gid: 0,
                comm: "sleep",
                args: vec!["sleep", "1002"],
                cwd: "/tmp",
            },
        ];
        assert_eq!(mid["mid"], ready["c"], "{console}");
        let sock = run.sock.to_str().expect("utf-8").to_owned();
        let (r, _rt) = ornament(&["ps", "--control", &sock, "--json"]);
        if r.code != Some(0) {
            last = format!("ornament ps failed: {}", r.stderr);
            continue;
        }
        let v: Value = serde_json::from_str(&r.stdout).expect("ps --json prints JSON");
        match check_exact(&v, &want) {
            Ok(()) => break want,
            Err(e) => last = e,
        }
    };

    // Once settled, the list stays exact; the table shows the same.
    let sock = run.sock.to_str().expect("utf-8").to_owned();
    let (r, _rt) = ornament(&["ps", "--control", &sock, "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("JSON");
    check_exact(&v, &want).unwrap_or_else(|e| panic!("second ps: {e}"));
    let (r, _rt) = ornament(&["ps", "--control", &sock]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut lines = r.stdout.lines();
    let header: Vec<_> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["PID", "PPID", "UID", "COMM", "ARGS"]);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let b = want[3].pid.to_string();
    let main = want[1].pid.to_string();
    assert!(
        rows.contains(&vec![
            b.as_str(),
            main.as_str(),
            "1000",
            "sleep",
            "sleep",
            "1001"
        ]),
        "{}",
        r.stdout
    );
    assert!(
        rows.contains(&vec!["2", "0", "0", "kthreadd", "[kthreadd]"]),
        "{}",
        r.stdout
    );

    // The protocol itself: several requests on one connection, errors answered.
    let answers = converse(
        &run.sock,
        &[r#"{"cmd":"info"}"#, r#"{"cmd":"nope","id":5}"#, "{"],
    );
    let info = &answers[0];
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["release"], release, "{info}");
    assert_eq!(info["vcpus"], vcpus, "{info}");
    // The virtual slide ornament found is the guest's own: its /proc/kallsyms `_text`
    // minus System.map's.
    let slide = |k: &str| {
        info["layout"][k]
            .as_str()
            .and_then(|v| u64::from_str_radix(v.strip_prefix("0x")?, 16).ok())
            .unwrap_or_else(|| panic!("no layout.{k} in {info}"))
    };
    let (virt, phys) = (slide("virt_slide"), slide("phys_slide"));
    let console = run.stderr();
    let guest_text = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("PSTEST-TEXT "))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no PSTEST-TEXT line with an address:\n{console}"));
    let img = ornament_images::build_image(image, &ornament_images::BuildOptions::reference(image))
        .expect("the image the guest runs");
    let map = std::fs::read_to_string(img.system_map()).expect("System.map");
    let map_text = map
        .lines()
        .find_map(|l| l.strip_suffix(" T _text"))
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .expect("_text in System.map");
    assert_eq!(
        guest_text.wrapping_sub(map_text),
        virt,
        "virt_slide {virt:#x}, but the guest's _text is {guest_text:#x} and System.map's {map_text:#x}"
    );
    // Slides move the kernel in 2 MiB steps (CONFIG_PHYSICAL_ALIGN).
    assert_eq!((virt % 0x20_0000, phys % 0x20_0000), (0, 0), "{info}");
    if append == Some("nokaslr") {
        assert_eq!((virt, phys), (0, 0), "{info}");
    } else {
        // KASLR on: both slides are random (about 480 virtual and, in this guest's RAM,
        // over 200 physical 2 MiB slots), so both being 0 means it did not happen (or
        // was not found): about 1 run in 100000 by chance.
        assert_ne!((virt, phys), (0, 0), "KASLR on but no slide found: {info}");
    }
    assert_eq!(answers[1]["ok"], false);
    assert_eq!(answers[1]["id"], 5);
    assert!(answers[1]["error"]
        .as_str()
        .is_some_and(|e| e.contains("unknown command")));
    assert_eq!(answers[2]["ok"], false);

    let (r, rt) = run.terminate();
    assert_nothing_left(&r, rt.path());
    assert_eq!(
        r.code,
        Some(130),
        "SIGTERM should end the run with 130 (as Ctrl-C does):\n{}",
        r.stderr
    );
}

#[test]
fn ps_missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("nobody-here.sock");
    let (r, _rt) = ornament(&["ps", "--control", sock.to_str().expect("utf-8")]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "cannot connect to the control socket {}",
            sock.display()
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn ps_6_1_one_vcpu() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    ps_in_guest("debian-6.1-cloud", "6.1.0-50-cloud-amd64", 1, None);
}

#[test]
fn ps_6_1_two_vcpus() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    ps_in_guest("debian-6.1-cloud", "6.1.0-50-cloud-amd64", 2, None);
}

#[test]
fn ps_6_1_two_vcpus_nokaslr() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    ps_in_guest(
        "debian-6.1-cloud",
        "6.1.0-50-cloud-amd64",
        2,
        Some("nokaslr"),
    );
}

#[test]
fn ps_6_12_one_vcpu() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    ps_in_guest("debian-6.12-cloud", "6.12.117+deb12-cloud-amd64", 1, None);
}

#[test]
fn ps_6_12_two_vcpus() {
    require_host!("qemu-system-x86_64", has_qemu());
    require_host!("apt-get, dpkg-deb and busybox-static", can_build_images());
    ps_in_guest("debian-6.12-cloud", "6.12.117+deb12-cloud-amd64", 2, None);
}
