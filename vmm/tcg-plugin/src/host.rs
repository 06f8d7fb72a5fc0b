//! The host side of the socket: reading records (with the RAM file's descriptor) and applying
//! them, and the thread that writes pending hits out every `flush_us`.

use crate::state::STATE;
use ornament_engine::wire::{self, Msg, PluginErrorCode};
use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// file) is kept until its record is decoded.
pub(crate) struct FdReader {
    pub(crate) sock: UnixStream,
    pub(crate) fd: Option<File>,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.sock.recv_with_fd(buf) {
                Ok((n, fd)) => {
                    if fd.is_some() {
                        self.fd = fd;
                    }
                    return Ok(n);
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
            }
        }
    }
}

/// Read exactly one record from a blocking stream.
pub(crate) fn read_record(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> std::io::Result<Result<Msg, wire::WireError>> {
    buf.resize(wire::HEADER_LEN, 0);
    r.read_exact(buf)?;
    let h = match wire::decode_header(buf) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    buf.resize(h.len, 0);
    r.read_exact(&mut buf[wire::HEADER_LEN..])?;
    Ok(wire::decode(buf).map(|(m, _)| m))
}

pub(crate) fn reader_loop(mut sock: FdReader) {
    let mut buf = Vec::with_capacity(wire::MAX_RECORD_LEN);
    loop {
        let Some(s) = STATE.get() else { return };
        match read_record(&mut sock, &mut buf) {
            Err(_) => {
                s.host_gone.store(true, Ordering::Relaxed);
                s.release_all();
                return;
            }
            Ok(Err(_)) => {
                let raw = buf.first().copied().unwrap_or(0);
                s.report(
                    PluginErrorCode::BadRecord,
                    u32::MAX,
                    u32::MAX,
                    u64::from(raw),
                );
                s.host_gone.store(true, Ordering::Relaxed);
                s.release_all();
                return;
            }
            Ok(Ok(Msg::Arm(a))) => s.apply_arm(&a),
            Ok(Ok(Msg::Disarm(d))) => s.apply_disarm(d.probe),
            Ok(Ok(Msg::CloseWindow(d))) => s.close_window(d.probe),
            Ok(Ok(Msg::Answer(a))) => s.apply_answer(&a),
            Ok(Ok(Msg::Ram(r))) => s.apply_ram(&r, sock.fd.take()),
            Ok(Ok(_)) => {}
        }
    }
}

pub(crate) fn flusher_loop() {
    loop {
        let Some(s) = STATE.get() else { return };
        if s.host_gone.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep(s.args.flush_period);
        s.flush();
    }
}
