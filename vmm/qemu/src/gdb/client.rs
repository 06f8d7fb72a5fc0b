//! A blocking client for QEMU's gdbstub.
//!
//! QEMU's stub has no no-ack mode and no non-stop mode: every packet is acked,
//! and while the guest runs the only thing we may send is the `\x03` interrupt.
//! Threads are vCPUs (`p1.1` is vCPU 0).

use super::packet::{self, PacketError, Scan};
use super::target::{scan_items, RegLayout, XmlItem};
use ornament_engine::Regs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a gdbstub exchange failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum GdbError {
    /// cannot connect to the gdbstub socket {path}
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// gdbstub connection failed
    Io(#[source] std::io::Error),
    /// the gdbstub closed the connection (QEMU exited)
    Closed,
    /// no answer from the gdbstub within {0:?}
    Timeout(Duration),
    /// bad packet from the gdbstub
    Packet(#[from] PacketError),
    /// the gdbstub answered {reply:?} to {request:?}
    Unexpected {
        /// What we sent.
        request: String,
        /// What came back.
        reply: String,
    },
    /// the guest is running; stop it first
    Running,
}

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReply {
    /// Stopped with a signal (5 = breakpoint/step, 2 = interrupt), on a vCPU (0-based).
    Signal {
        /// GDB signal number.
        signal: u8,
        /// vCPU index, when the stub named a thread.
        vcpu: Option<u32>,
    },
    /// The process (QEMU's guest) exited with a status.
    Exited(u8),
    /// The process was terminated by a signal.
    Terminated(u8),
}

/// How long a request may wait for its reply while the guest is stopped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected gdbstub.
#[derive(Debug)]
pub struct GdbClient {
    stream: UnixStream,
    buf: Vec<u8>,
    layout: RegLayout,
    running: bool,
    selected: Option<u32>,
}

fn parse_thread(t: &str) -> Option<u32> {
    // "p1.2" or "2" (hex)
    let tid = t.rsplit('.').next()?;
    u32::from_str_radix(tid.trim_start_matches('p'), 16)
        .ok()?
        .checked_sub(1)
}

/// Parse a stop reply packet.
pub fn parse_stop(p: &[u8]) -> Option<StopReply> {
    let s = std::str::from_utf8(p).ok()?;
    let sig = |t: &str| u8::from_str_radix(t.get(..2)?, 16).ok();
    match s.as_bytes().first()? {
        b'T' => {
            let signal = sig(&s[1..])?;
            let vcpu = s[3..]
                .split(';')
                .find_map(|kv| kv.strip_prefix("thread:"))
                .and_then(parse_thread);
            Some(StopReply::Signal { signal, vcpu })
        }
        b'S' => Some(StopReply::Signal {
            signal: sig(&s[1..])?,
            vcpu: None,
        }),
        b'W' => Some(StopReply::Exited(sig(&s[1..])?)),
        b'X' => Some(StopReply::Terminated(sig(&s[1..])?)),
        _ => None,
    }
}

impl GdbClient {
    /// Connect, retrying until `timeout` (QEMU creates the socket as it starts).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, GdbError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    tracing::trace!(error = %e, "gdbstub not up yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(GdbError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        let mut c = Self {
            stream,
            buf: Vec::new(),
            layout: RegLayout::default(),
            running: false,
            selected: None,
        };
        c.request("qSupported:multiprocess+;xmlRegisters=i386")?;
        // The initial stop reason (the guest is stopped when we attach).
        c.request("?")?;
        c.layout = c.read_layout()?;
        Ok(c)
    }

    /// The register layout of this target.
    pub fn layout(&self) -> &RegLayout {
        &self.layout
    }

    /// True after `cont` until a stop reply arrives.
    pub fn is_running(&self) -> bool {
        self.running
    }

    fn write_all(&mut self, b: &[u8]) -> Result<(), GdbError> {
        self.stream.write_all(b).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                GdbError::Closed
            }
            _ => GdbError::Io(e),
        })
    }

    /// Read one packet (acking it), waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Vec<u8>, GdbError> {
        let deadline = Instant::now() + timeout;
        loop {
            match packet::scan(&self.buf)? {
                Scan::Packet(body, used) => {
                    self.buf.drain(..used);
                    self.write_all(b"+")?;
                    return Ok(body);
                }
                Scan::Skip(_) => {
                    self.buf.remove(0);
                    continue;
                }
                Scan::Incomplete => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GdbError::Timeout(timeout));
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(GdbError::Io)?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(GdbError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // A signal (Ctrl-C, SIGTERM) interrupts a read with a timeout even under
                // SA_RESTART: go round again, the caller checks its stop flag.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(GdbError::Closed)
                }
                Err(e) => return Err(GdbError::Io(e)),
            }
        }
    }

    fn send(&mut self, data: &str) -> Result<(), GdbError> {
        let f = packet::frame(data.as_bytes());
        self.write_all(&f)
    }

    /// Send a request and return its reply (the guest must be stopped).
    pub fn request(&mut self, data: &str) -> Result<Vec<u8>, GdbError> {
        if self.running {
            return Err(GdbError::Running);
        }
        self.send(data)?;
        self.recv(REPLY_TIMEOUT)
    }

    fn expect_ok(&mut self, data: &str) -> Result<(), GdbError> {
        let r = self.request(data)?;
        if r != b"OK" {
            return Err(GdbError::Unexpected {
                request: data.to_owned(),
                reply: String::from_utf8_lossy(&r).into_owned(),
            });
        }
        Ok(())
    }

    fn read_xfer(&mut self, annex: &str) -> Result<String, GdbError> {
        let mut out = Vec::new();
        loop {
            let req = format!("qXfer:features:read:{annex}:{:x},800", out.len());
            let r = self.request(&req)?;
            match r.split_first() {
                Some((b'm', rest)) => out.extend_from_slice(rest),
                Some((b'l', rest)) => {
                    out.extend_from_slice(rest);
                    break;
                }
                _ => {
                    return Err(GdbError::Unexpected {
                        request: req,
                        reply: String::from_utf8_lossy(&r).into_owned(),
                    })
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn read_layout(&mut self) -> Result<RegLayout, GdbError> {
        let mut regs = Vec::new();
        let mut pending = vec!["target.xml".to_owned()];
        let mut seen = 0;
        while let Some(annex) = pending.pop() {
            seen += 1;
            if seen > 32 {
                break;
            }
            let xml = self.read_xfer(&annex)?;
            let mut includes = Vec::new();
            for item in scan_items(&xml) {
                match item {
                    XmlItem::Reg {
                        name,
                        bitsize,
                        regnum,
                    } => regs.push((name, bitsize, regnum)),
                    XmlItem::Include(h) => includes.push(h),
                }
            }
            // Depth-first in document order.
            pending.extend(includes.into_iter().rev());
        }
        Ok(RegLayout::from_items(regs))
    }

    /// vCPU indices (0-based) the stub reports.
    pub fn vcpus(&mut self) -> Result<Vec<u32>, GdbError> {
        let mut out = Vec::new();
        let mut r = self.request("qfThreadInfo")?;
        while let Some((b'm', rest)) = r.split_first() {
            let s = String::from_utf8_lossy(rest).into_owned();
            out.extend(s.split(',').filter_map(parse_thread));
            r = self.request("qsThreadInfo")?;
        }
        Ok(out)
    }

    fn select(&mut self, vcpu: u32) -> Result<(), GdbError> {
        if self.selected != Some(vcpu) {
            self.expect_ok(&format!("Hgp1.{:x}", vcpu + 1))?;
            self.selected = Some(vcpu);
        }
        Ok(())
    }

    /// Registers of one vCPU (guest stopped).
    pub fn registers(&mut self, vcpu: u32) -> Result<Regs, GdbError> {
        self.select(vcpu)?;
        let r = self.request("g")?;
        let raw = packet::from_hex(&r).ok_or_else(|| GdbError::Unexpected {
            request: "g".into(),
            reply: String::from_utf8_lossy(&r).into_owned(),
        })?;
        Ok(self.layout.decode(&raw))
    }

    /// Write one register of one vCPU by name (guest stopped).
    pub fn write_register(&mut self, vcpu: u32, name: &str, value: u64) -> Result<(), GdbError> {
        let (regnum, bytes) = {
            let r = self.layout.get(name).ok_or_else(|| GdbError::Unexpected {
                request: format!("P {name}"),
                reply: "register not in the target description".into(),
            })?;
            (r.regnum, usize::try_from(r.bitsize / 8).unwrap_or(8).min(8))
        };
        self.select(vcpu)?;
        let hex = packet::to_hex(&value.to_le_bytes()[..bytes]);
        self.expect_ok(&format!("P{regnum:x}={hex}"))
    }

    /// Read guest memory (virtual addresses of the selected vCPU, unless
    /// physical mode is on).
    pub fn read_memory(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, GdbError> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(0x400);
            let req = format!("m{:x},{n:x}", addr + out.len() as u64);
            let r = self.request(&req)?;
            let bytes = packet::from_hex(&r)
                .filter(|b| !b.is_empty())
                .ok_or_else(|| GdbError::Unexpected {
                    request: req.clone(),
                    reply: String::from_utf8_lossy(&r).into_owned(),
                })?;
            out.extend_from_slice(&bytes);
        }
        out.truncate(len);
        Ok(out)
    }

    /// Switch `m`/`M` between virtual (false) and guest-physical (true) addresses.
    pub fn set_physical_mode(&mut self, physical: bool) -> Result<(), GdbError> {
        self.expect_ok(&format!("Qqemu.PhyMemMode:{}", u8::from(physical)))
    }

    /// Insert (`true`) or remove a breakpoint at a guest-virtual address.
    pub fn breakpoint(&mut self, addr: u64, insert: bool) -> Result<(), GdbError> {
        let op = if insert { 'Z' } else { 'z' };
        self.expect_ok(&format!("{op}0,{addr:x},1"))
    }

    /// Run a monitor command (`info mtree -f`, ...) and return its output.
    pub fn monitor(&mut self, cmd: &str) -> Result<String, GdbError> {
        if self.running {
            return Err(GdbError::Running);
        }
        self.send(&format!("qRcmd,{}", packet::to_hex(cmd.as_bytes())))?;
        let mut out = Vec::new();
        loop {
            let p = self.recv(REPLY_TIMEOUT)?;
            match p.split_first() {
                Some((b'O', hex)) if p != b"OK" => {
                    out.extend(packet::from_hex(hex).unwrap_or_default());
                }
                _ if p == b"OK" => break,
                _ => {
                    return Err(GdbError::Unexpected {
                        request: format!("qRcmd {cmd}"),
                        reply: String::from_utf8_lossy(&p).into_owned(),
                    })
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Let every vCPU run; `at` resumes the current vCPU at that address instead.
    pub fn cont(&mut self, at: Option<u64>) -> Result<(), GdbError> {
        if self.running {
            return Err(GdbError::Running);
        }
        match at {
            Some(a) => self.send(&format!("c{a:x}"))?,
            None => self.send("c")?,
        }
        self.running = true;
        Ok(())
    }

    /// Wait for the running guest to stop; `Ok(None)` on timeout.
    pub fn wait_stop(&mut self, timeout: Duration) -> Result<Option<StopReply>, GdbError> {
        loop {
            let p = match self.recv(timeout) {
                Ok(p) => p,
                Err(GdbError::Timeout(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(stop) = parse_stop(&p) {
                self.running = false;
                if let StopReply::Signal { vcpu: Some(v), .. } = stop {
                    // The stub makes the stopping thread current.
                    self.selected = Some(v);
                }
                return Ok(Some(stop));
            }
            // Console output packets ('O') while running are ignored.
        }
    }

    /// Ask a running guest to stop (the `\x03` interrupt) without waiting; the
    /// stop reply comes through `wait_stop`.
    pub fn request_stop(&mut self) -> Result<(), GdbError> {
        if self.running {
            self.write_all(&[0x03])?;
        }
        Ok(())
    }

    /// Stop a running guest and wait for the stop reply.
    pub fn interrupt(&mut self) -> Result<StopReply, GdbError> {
        if !self.running {
            return Ok(StopReply::Signal {
                signal: 2,
                vcpu: None,
            });
        }
        self.write_all(&[0x03])?;
        self.wait_stop(REPLY_TIMEOUT)?
            .ok_or(GdbError::Timeout(REPLY_TIMEOUT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_replies() {
        assert_eq!(
            parse_stop(b"T05thread:p01.02;"),
            Some(StopReply::Signal {
                signal: 5,
                vcpu: Some(1)
            })
        );
        assert_eq!(
            parse_stop(b"T02thread:p1.1;"),
            Some(StopReply::Signal {
                signal: 2,
                vcpu: Some(0)
            })
        );
        assert_eq!(
            parse_stop(b"S05"),
            Some(StopReply::Signal {
                signal: 5,
                vcpu: None
            })
        );
        assert_eq!(parse_stop(b"W00"), Some(StopReply::Exited(0)));
        assert_eq!(parse_stop(b"X09"), Some(StopReply::Terminated(9)));
        assert_eq!(parse_stop(b"OK"), None);
        assert_eq!(parse_stop(b"T"), None);
    }

    #[test]
    fn fake_stub_exchange() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let stub = std::thread::spawn(move || {
            // Reads one request, acks, answers with a canned reply.
            let mut buf = [0u8; 256];
            let n = b.read(&mut buf).expect("read");
            assert_eq!(&buf[..n], b"$g#67");
            b.write_all(b"+").expect("ack");
            b.write_all(&packet::frame(b"0100000000000000"))
                .expect("reply");
            let n = b.read(&mut buf).expect("ack back");
            assert_eq!(&buf[..n], b"+");
        });
        let mut c = GdbClient {
            stream: a,
            buf: Vec::new(),
            layout: RegLayout::from_items(vec![("rax".to_owned(), 64, None)]),
            running: false,
            selected: Some(0),
        };
        assert_eq!(c.registers(0).expect("regs").rax, 1);
        stub.join().expect("stub");
        c.running = true;
        assert!(matches!(c.request("g"), Err(GdbError::Running)));
    }
}
