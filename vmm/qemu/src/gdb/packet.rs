//! The GDB remote serial protocol's framing: `$data#checksum`, escapes and
//! run-length encoding, and hex helpers.

/// Frame `data` as a packet.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 4);
    out.push(b'$');
    for &b in data {
        if matches!(b, b'#' | b'$' | b'}' | b'*') {
            out.push(b'}');
            out.push(b ^ 0x20);
        } else {
            out.push(b);
        }
    }
    let sum = out[1..].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    out.push(b'#');
    out.extend_from_slice(format!("{sum:02x}").as_bytes());
    out
}

/// Why a packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum PacketError {
    /// packet checksum {got:#04x} does not match the data ({want:#04x})
    Checksum {
        /// Sent checksum.
        got: u8,
        /// Computed checksum.
        want: u8,
    },
    /// malformed packet
    Malformed,
}

/// Outcome of scanning a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Need more bytes.
    Incomplete,
    /// A packet body (unescaped, run-length expanded) and the bytes consumed.
    Packet(Vec<u8>, usize),
    /// A single byte to skip (an ack `+`/`-` or noise) .
    Skip(u8),
}

/// Look for one packet at the front of `buf`.
pub fn scan(buf: &[u8]) -> Result<Scan, PacketError> {
    let Some(&first) = buf.first() else {
        return Ok(Scan::Incomplete);
    };
    if first != b'$' {
        return Ok(Scan::Skip(first));
    }
    let Some(hash) = buf.iter().position(|&b| b == b'#') else {
        return Ok(Scan::Incomplete);
    };
    if buf.len() < hash + 3 {
        return Ok(Scan::Incomplete);
    }
    let raw = &buf[1..hash];
    let want = raw.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    let got = std::str::from_utf8(&buf[hash + 1..hash + 3])
        .ok()
        .and_then(|s| u8::from_str_radix(s, 16).ok())
        .ok_or(PacketError::Malformed)?;
    if got != want {
        return Err(PacketError::Checksum { got, want });
    }
    Ok(Scan::Packet(decode_body(raw)?, hash + 3))
}

fn decode_body(raw: &[u8]) -> Result<Vec<u8>, PacketError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'}' => {
                let b = *raw.get(i + 1).ok_or(PacketError::Malformed)?;
                out.push(b ^ 0x20);
                i += 2;
            }
            b'*' => {
                let prev = *out.last().ok_or(PacketError::Malformed)?;
                let n = raw
                    .get(i + 1)
                    .ok_or(PacketError::Malformed)?
                    .wrapping_sub(29);
                out.extend(std::iter::repeat_n(prev, usize::from(n)));
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Lower-case hex of bytes.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from hex; `None` on odd length or a non-hex digit.
pub fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|t| u8::from_str_radix(t, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_scan_round_trip() {
        let data = b"qXfer#$}*x";
        let f = frame(data);
        match scan(&f).expect("valid") {
            Scan::Packet(body, used) => {
                assert_eq!(body, data);
                assert_eq!(used, f.len());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(frame(b"g"), b"$g#67");
    }

    #[test]
    fn run_length_and_errors() {
        // "0* " = '0' repeated 3 more times (' ' is 32, 32-29 = 3).
        let mut pkt = b"$0* ".to_vec();
        let sum = pkt[1..].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        pkt.extend_from_slice(format!("#{sum:02x}").as_bytes());
        assert_eq!(
            scan(&pkt).expect("ok"),
            Scan::Packet(b"0000".to_vec(), pkt.len())
        );
        assert_eq!(
            scan(b"$g#00"),
            Err(PacketError::Checksum { got: 0, want: 0x67 })
        );
        assert_eq!(scan(b"$g#6"), Ok(Scan::Incomplete));
        assert_eq!(scan(b"+$g"), Ok(Scan::Skip(b'+')));
        assert_eq!(scan(b"$*a#8b"), Err(PacketError::Malformed));
    }

    #[test]
    fn hex() {
        assert_eq!(to_hex(&[0, 0xab]), "00ab");
        assert_eq!(from_hex(b"00ab"), Some(vec![0, 0xab]));
        assert_eq!(from_hex(b"0"), None);
        assert_eq!(from_hex(b"zz"), None);
    }
}
