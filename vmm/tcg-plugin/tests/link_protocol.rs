//! The host side of the plugin socket (`ornament-qemu`'s `plugin_link/`), compiled here by
//! path so its socketpair tests run with this crate's tests (it links no GPL code: only
//! `ornament-engine`).
#![allow(missing_docs)]

#[path = "../../qemu/src/plugin_link/mod.rs"]
pub mod plugin_link;

use ornament_engine::wire::{self, put_hit_head, put_hit_value, Hello, Msg, Reg, RegMask};
use plugin_link::PluginLink;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Host-side throughput of the link: a million (release) 5-register hit records written in 16 KiB
/// batches (as the plugin does) through a socketpair, decoded into `PluginHit`s.
#[test]
fn link_throughput_million_hits() {
    let (a, mut b) = UnixStream::pair().expect("socketpair");
    let mut link = PluginLink::from_stream(a);
    b.write_all(
        &Msg::Hello(Hello {
            version: wire::WIRE_VERSION,
            pid: 1,
            mono_ns: 0,
        })
        .to_bytes(),
    )
    .expect("hello");
    link.accept(Duration::from_secs(5)).expect("accept");
    // A million in release builds; a tenth in debug builds, which decode ten times slower.
    let n: u64 = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let regs = RegMask::of(&[Reg::Rip, Reg::Rdi, Reg::Rsi, Reg::GsBase, Reg::Cr3]);
    let writer = std::thread::spawn(move || {
        let mut go = [0u8; 8];
        std::io::Read::read_exact(&mut b, &mut go).expect("go");
        let mut buf = Vec::with_capacity(1 << 15);
        for seq in 1..=n {
            put_hit_head(&mut buf, 0, 1, 0, seq, seq, regs, 0, 0, None);
            for v in 0..5 {
                put_hit_value(&mut buf, v);
            }
            if buf.len() >= 16 * 1024 {
                b.write_all(&buf).expect("write");
                buf.clear();
            }
        }
        b.write_all(&buf).expect("write");
    });
    let t0 = Instant::now();
    let mut got = 0u64;
    while got < n {
        match link.next_hit(Duration::from_secs(10)).expect("link") {
            Some(h) => {
                got += 1;
                assert_eq!(h.vcpu_seq, got);
            }
            None => panic!("stalled at {got}"),
        }
    }
    let dt = t0.elapsed();
    writer.join().expect("writer");
    eprintln!(
        "link: {n} hits (88-byte records) in {dt:?}: {:.0} ns/hit, {:.1} M hits/s",
        dt.as_nanos() as f64 / n as f64,
        n as f64 / dt.as_secs_f64() / 1e6
    );
}
