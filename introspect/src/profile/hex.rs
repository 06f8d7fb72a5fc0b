//! Serde helpers: addresses as `"0x..."` strings, so JSON stays readable and exact.

use ornament_engine::Gva;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

fn parse(s: &str) -> Option<Gva> {
    let digits = s.strip_prefix("0x")?;
    u64::from_str_radix(digits, 16).ok().map(Gva)
}

/// A `BTreeMap<String, Gva>` as a JSON object of hex strings.
pub mod map {
    use super::*;
    use std::collections::BTreeMap;

    /// Serialize.
    pub fn serialize<S: Serializer>(m: &BTreeMap<String, Gva>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k, format!("{:#x}", v.raw()))))
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Gva>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| match parse(&v) {
                Some(a) => Ok((k, a)),
                None => Err(D::Error::custom("address is not a 0x-prefixed hex string")),
            })
            .collect()
    }
}
