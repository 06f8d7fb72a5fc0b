//! `ornament ps`: the guest's processes, read from outside through the control socket
//! of `ornament run --control SOCKET`, printed like `ps -ef`.

use crate::control::{Process, ProcessList};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for the whole answer unless `--timeout` says otherwise.
const RESPONSE_TIMEOUT_SECS: u64 = 30;
/// Longest answer read (a `ps` of a full task budget fits many times over).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// List the guest's processes (like `ps -ef`): PID, PPID, UID, COMM, ARGS; kernel
/// threads show their name in [brackets].
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// The control socket of `ornament run --control SOCKET`.
    #[arg(long, value_name = "SOCKET")]
    control: PathBuf,
    /// Print the server's JSON response as it is.
    #[arg(long)]
    json: bool,
    /// Give up when the whole answer has not come within SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = RESPONSE_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// Send one request line to the control socket at `path`; the response line and its
/// parsed value, which has `"ok": true` (else the server's error is returned).
pub fn request(path: &Path, request: &str) -> Result<(String, Value)> {
    request_within(path, request, Duration::from_secs(RESPONSE_TIMEOUT_SECS))
}

/// `request`, with the whole response due within `timeout` (a server that accepts and
/// never answers, or trickles, is given up on).
pub fn request_within(path: &Path, request: &str, timeout: Duration) -> Result<(String, Value)> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot connect to the control socket {} (is `ornament run --control {}` running?)",
            path.display(),
            path.display()
        )
    })?;
    let late = || {
        anyhow!(
            "the control socket {} did not answer within {} s (is it the socket of a running `ornament run --control`?)",
            path.display(),
            timeout.as_secs()
        )
    };
    stream.set_write_timeout(Some(timeout))?;
    let mut w = &stream;
    match w
        .write_all(request.as_bytes())
        .and_then(|()| w.write_all(b"\n"))
    {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(late()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot send a request to {}", path.display()))
        }
    }
    let mut bytes = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let mut r = &stream;
    while !bytes.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        stream.set_read_timeout(Some(left))?;
        match r.read(&mut buf) {
            Ok(0) => bail!(
                "the control socket {} closed the connection without a complete response",
                path.display()
            ),
            Ok(n) => {
                // One line per response: what follows the first newline is not ours.
                let n = buf[..n]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(n, |i| i + 1);
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() > MAX_RESPONSE_BYTES {
                    bail!(
                        "the control socket {} sent a response longer than {MAX_RESPONSE_BYTES} bytes",
                        path.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(late()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("no response from the control socket {}", path.display())
                })
            }
        }
    }
    bytes.pop();
    let line = String::from_utf8(bytes)
        .with_context(|| format!("the control socket {} sent invalid UTF-8", path.display()))?;
    let value: Value = serde_json::from_str(&line)
        .with_context(|| format!("the control socket {} sent invalid JSON", path.display()))?;
    if value.get("ok") != Some(&Value::Bool(true)) {
        let error = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("(no message)");
        bail!("the control socket {} answered: {error}", path.display());
    }
    Ok((line, value))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Run `ps`.
pub fn run(a: PsArgs) -> Result<()> {
    let (line, value) = request_within(
        &a.control,
        r#"{"cmd":"ps"}"#,
        Duration::from_secs(a.timeout),
    )?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let list: ProcessList = serde_json::from_value(value).with_context(|| {
        format!(
            "the control socket {} sent an unexpected ps response",
            a.control.display()
        )
    })?;
    out.write_all(table(&list.processes).as_bytes())?;
    out.flush()?;
    if list.walk != "complete" {
        eprintln!(
            "ornament: warning: the guest's task list was not read to its end ({}{}); processes may be missing",
            list.walk,
            list.walk_at
                .map(|a| format!(" at {a}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Text from the guest, made safe for a terminal: control characters become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn or_unknown<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

/// The ARGS column: the command line, or `[comm]` for kernel threads (and tasks
/// without a command line), as `ps` shows them.
fn args_column(p: &Process) -> String {
    let comm = printable(p.comm.as_deref().unwrap_or("?"));
    match &p.args {
        Some(args) if !args.is_empty() && p.kernel_thread != Some(true) => {
            let mut s = args
                .iter()
                .map(|a| printable(a))
                .collect::<Vec<_>>()
                .join(" ");
            if p.args_truncated {
                s.push_str(" ...");
            }
            s
        }
        Some(_) => format!("[{comm}]"),
        None => format!("[{comm}] ?"),
    }
}

/// The `ps -ef`-like table.
fn table(processes: &[Process]) -> String {
    let rows: Vec<[String; 5]> = processes
        .iter()
        .map(|p| {
            [
                or_unknown(p.pid),
                or_unknown(p.ppid),
                or_unknown(p.uid),
                printable(p.comm.as_deref().unwrap_or("?")),
                args_column(p),
            ]
        })
        .collect();
    let header = ["PID", "PPID", "UID", "COMM", "ARGS"].map(String::from);
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|r| r[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
    let mut s = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:>w0$} {:>w1$} {:>w2$} {:<w3$} {}",
            r[0], r[1], r[2], r[3], r[4]
        );
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: i32, comm: &str, args: Option<&[&str]>, kthread: bool) -> Process {
        Process {
            pid: Some(pid),
            tgid: Some(pid),
            ppid: Some(if pid == 1 { 0 } else { 1 }),
            uid: Some(0),
            gid: Some(0),
            euid: Some(0),
            egid: Some(0),
            comm: Some(comm.into()),
            args: args.map(|a| a.iter().map(|s| (*s).to_owned()).collect()),
            args_truncated: false,
            exe: None,
            cwd: None,
            kernel_thread: Some(kthread),
            task: "0xffff888000000000".into(),
        }
    }

    #[test]
    fn table_looks_like_ps() {
        let mut sleeper = proc(123, "sleep", Some(&["sleep", "1000"]), false);
        sleeper.uid = Some(1000);
        let mut evil = proc(7, "e\x1b[2Jvil", Some(&["a\nb", "c"]), false);
        evil.args_truncated = true;
        evil.ppid = None;
        let t = table(&[
            proc(1, "init", Some(&["/bin/sh", "/init"]), false),
            proc(2, "kthreadd", Some(&[]), true),
            sleeper,
            evil,
            proc(9, "gone", None, false),
        ]);
        assert_eq!(
            t,
            "PID PPID  UID COMM     ARGS\n  \
               1    0    0 init     /bin/sh /init\n  \
               2    1    0 kthreadd [kthreadd]\n\
             123    1 1000 sleep    sleep 1000\n  \
               7    ?    0 e?[2Jvil a?b c ...\n  \
               9    1    0 gone     [gone] ?\n"
        );
    }
}
