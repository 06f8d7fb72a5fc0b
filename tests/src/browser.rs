//! A real headless browser for the tests of pages ornament writes (`--timeline`):
//! Debian's `chromium-headless-shell`, run with no network, its DOM after the page's
//! script ran, the console messages it logged, and its screenshot decoded (PNG, 8-bit
//! RGB or RGBA) to count the pixels of a colour.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The browser binary: `$ORNAMENT_CHROMIUM`, else Debian's
/// `/usr/bin/chromium-headless-shell`.
pub fn chromium_binary() -> PathBuf {
    std::env::var_os("ORNAMENT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium-headless-shell"))
}

/// Is the browser runnable? The error says why not.
pub fn has_chromium() -> Result<PathBuf, String> {
    let bin = chromium_binary();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(bin)
    } else {
        Err(format!(
            "`{} --version` failed: {}",
            bin.display(),
            out.status
        ))
    }
}

/// What the browser made of a page.
#[derive(Debug)]
pub struct Loaded {
    /// The DOM after the page's scripts ran (`--dump-dom`).
    pub dom: String,
    /// Console messages (uncaught errors included) the page logged.
    pub console: Vec<String>,
    /// Wall time of the browser's run, seconds.
    pub secs: f64,
}

/// The browser's arguments for a page: headless, no sandbox (tests run as root), no GPU,
/// no network (every host name resolves to nothing, no proxy is reachable), a profile
/// of its own in `profile`, logging to stderr.
fn args(profile: &Path, width: u32, height: u32) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--enable-logging=stderr",
        "--v=0",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        format!("--user-data-dir={}", profile.display()),
        format!("--window-size={width},{height}"),
    ])
    .collect()
}

fn run(bin: &Path, page: &Path, extra: &str, size: (u32, u32)) -> (String, String, f64) {
    let profile = tempfile::tempdir().expect("browser profile dir");
    let url = format!(
        "file://{}",
        page.canonicalize().expect("page path").display()
    );
    let began = std::time::Instant::now();
    let out = Command::new("timeout")
        .arg("120")
        .arg(bin)
        .args(args(profile.path(), size.0, size.1))
        .arg(extra)
        .arg(&url)
        .output()
        .expect("run the browser");
    let secs = began.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{} {extra} {url}: {}\n{stderr}",
        bin.display(),
        out.status
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        secs,
    )
}

/// Console lines of a browser's stderr (`...:INFO:CONSOLE:12] "message", source: ...`).
fn console_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect()
}

/// Load `page` in the browser `bin` at `width` x `height`: its DOM once its scripts ran,
/// and what it logged.
pub fn load(bin: &Path, page: &Path, width: u32, height: u32) -> Loaded {
    let (dom, stderr, secs) = run(bin, page, "--dump-dom", (width, height));
    Loaded {
        dom,
        console: console_lines(&stderr),
        secs,
    }
}

/// Screenshot `page` at `width` x `height` into `png`; the console lines it logged.
pub fn screenshot(bin: &Path, page: &Path, png: &Path, width: u32, height: u32) -> Vec<String> {
    let (_, stderr, _) = run(
        bin,
        page,
        &format!("--screenshot={}", png.display()),
        (width, height),
    );
    console_lines(&stderr)
}

/// The value of attribute `name` on the `<body>` of `dom`.
pub fn body_attr(dom: &str, name: &str) -> Option<String> {
    let start = dom.find("<body")?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let key = format!("{name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(tag[at..at + tag[at..].find('"')?].to_owned())
}

/// A decoded image: width, height, and RGB pixels row by row.
#[derive(Debug)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` RGB triples.
    pub rgb: Vec<[u8; 3]>,
}

impl Image {
    /// Pixels within `tolerance` (per channel) of `colour`.
    pub fn count(&self, colour: [u8; 3], tolerance: u8) -> usize {
        self.rgb
            .iter()
            .filter(|p| (0..3).all(|c| p[c].abs_diff(colour[c]) <= tolerance))
            .count()
    }
}

/// Decode a PNG of 8-bit RGB or RGBA, not interlaced (what the browser writes).
pub fn decode_png(bytes: &[u8]) -> Result<Image, String> {
    const SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !bytes.starts_with(SIG) {
        return Err("not a PNG".into());
    }
    let (mut at, mut idat, mut head) = (SIG.len(), Vec::new(), None);
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().map_err(|_| "chunk")?) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = bytes.get(at + 8..at + 8 + len).ok_or("truncated chunk")?;
        match kind {
            b"IHDR" => head = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let head = head.ok_or("no IHDR")?;
    let dim = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (width, height) = (dim(0) as usize, dim(4) as usize);
    let bpp = match (head[8], head[9], head[12]) {
        (8, 2, 0) => 3,
        (8, 6, 0) => 4,
        other => {
            return Err(format!(
                "unsupported PNG (depth, colour, interlace) {other:?}"
            ))
        }
    };
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .map_err(|e| format!("IDAT: {e}"))?;
    let stride = width * bpp;
    if raw.len() < height * (stride + 1) {
        return Err("short image data".into());
    }
    let mut prev = vec![0u8; stride];
    let mut rgb = Vec::with_capacity(width * height);
    for y in 0..height {
        let line = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
        let mut cur = line[1..].to_vec();
        for i in 0..stride {
            let a = if i >= bpp { cur[i - bpp] } else { 0 };
            let b = prev[i];
            let c = if i >= bpp { prev[i - bpp] } else { 0 };
            cur[i] = cur[i].wrapping_add(match line[0] {
                0 => 0,
                1 => a,
                2 => b,
                3 => a / 2 + b / 2 + (a & b & 1),
                4 => paeth(a, b, c),
                f => return Err(format!("bad filter {f}")),
            });
        }
        rgb.extend(cur.chunks(bpp).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    Ok(Image { width, height, rgb })
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = (
        (p - i16::from(a)).abs(),
        (p - i16::from(b)).abs(),
        (p - i16::from(c)).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}
