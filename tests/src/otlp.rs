//! A real OTLP/HTTP receiver for the export tests: `tests/receivers/otlp_logs.py`, which
//! decodes each request with OpenTelemetry's own protobuf definitions (PyPI's
//! `opentelemetry-proto`, pinned, installed once into a virtual environment under the
//! image cache) and writes every log record it accepted as a JSON line.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `opentelemetry-proto` release the receiver decodes with.
pub const PROTO_VERSION: &str = "1.45.2";

/// The receiver script.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("receivers/otlp_logs.py")
}

/// Run `cmd`; why it failed, if it did.
fn run(cmd: &mut Command) -> Result<(), String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// The Python of a virtual environment with `opentelemetry-proto` [`PROTO_VERSION`]:
/// `<cache>/otlp-receiver/<version>/venv`, made on first use (`python3 -m venv`, pip).
pub fn python() -> Result<PathBuf, String> {
    let dir = ornament_images::cache::cache_root(None)
        .join("otlp-receiver")
        .join(PROTO_VERSION);
    let venv = dir.join("venv");
    let py = venv.join("bin/python");
    if py.exists() {
        return Ok(py);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let part = dir.join(format!("venv.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&part);
    run(Command::new("python3").args(["-m", "venv"]).arg(&part))?;
    run(Command::new(part.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("opentelemetry-proto=={PROTO_VERSION}"),
    ]))?;
    match std::fs::rename(&part, &venv) {
        Ok(()) => {}
        // Another test made it meanwhile.
        Err(_) if py.exists() => {
            let _ = std::fs::remove_dir_all(&part);
        }
        Err(e) => return Err(format!("{}: {e}", venv.display())),
    }
    Ok(py)
}

/// A running receiver; killed when dropped.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
}

impl Receiver {
    /// Start one that writes to `out` and answers the first `refuse` requests with 503.
    pub fn start(out: &Path, refuse: u32) -> Result<Self, String> {
        let py = python()?;
        let mut child = Command::new(py)
            .arg(script())
            .arg("--out")
            .arg(out)
            .arg("--refuse")
            .arg(refuse.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", script().display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok());
        match port {
            Some(port) => Ok(Self {
                child,
                port,
                out: out.to_owned(),
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the receiver said {line:?}, not its port"))
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every log record it accepted so far, in order.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a receiver line"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
