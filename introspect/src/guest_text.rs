//! Bytes from the guest (names, arguments, paths) as Rust strings, losslessly.
//!
//! Linux names are bytes, not UTF-8. Valid UTF-8 is kept as it is; every byte that is
//! not part of valid UTF-8 becomes one character of a reserved range,
//! `U+10FF00 + byte` (the last 256 code points of Unicode's private use plane 16), and
//! so do the bytes of any character of that range the guest wrote itself. The mapping is
//! one to one: [`encode`] gives the exact bytes back, so a JSON consumer can recover them,
//! and the text form shows those characters as `\xNN` ([`crate::event::write_escaped`]),
//! never as a lossy U+FFFD.

/// The first character of the reserved range: `U+10FF00 + byte` stands for a raw byte.
pub const RAW_BYTE_BASE: u32 = 0x10_FF00;

/// The raw byte a character stands for, if it is one of the reserved range.
pub fn raw_byte(c: char) -> Option<u8> {
    u32::from(c)
        .checked_sub(RAW_BYTE_BASE)
        .and_then(|b| u8::try_from(b).ok())
}

fn push_raw(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        // RAW_BYTE_BASE + 0xff is U+10FFFF, the last valid code point.
        out.extend(char::from_u32(RAW_BYTE_BASE + u32::from(b)));
    }
}

/// Decode guest bytes: see the module documentation.
pub fn decode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if raw_byte(c).is_some() {
                let mut buf = [0u8; 4];
                push_raw(&mut out, c.encode_utf8(&mut buf).as_bytes());
            } else {
                out.push(c);
            }
        }
        push_raw(&mut out, chunk.invalid());
    }
    out
}

/// The exact bytes a [`decode`]d string came from.
pub fn encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match raw_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_text_is_unchanged_and_odd_bytes_are_marked() {
        assert_eq!(decode("/usr/bin/ls é".as_bytes()), "/usr/bin/ls é");
        let d = decode(b"a\xffb\xc3");
        assert_eq!(d.chars().count(), 4);
        assert_eq!(
            d.chars().filter_map(raw_byte).collect::<Vec<_>>(),
            [0xff, 0xc3]
        );
        assert_eq!(encode(&d), b"a\xffb\xc3");
        // A reserved character the guest wrote itself is kept as its bytes.
        let own = "x\u{10ff41}";
        assert_eq!(encode(&decode(own.as_bytes())), own.as_bytes());
        assert_eq!(decode(own.as_bytes()).chars().count(), 5);
    }

    proptest! {
        #[test]
        fn every_byte_string_comes_back_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(encode(&decode(&bytes)), bytes);
        }
    }
}
