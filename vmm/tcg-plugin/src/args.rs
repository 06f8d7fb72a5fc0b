//! The plugin's command-line options (`sock=PATH,hold_timeout_ms=N,...`), parsed and checked.

use std::time::Duration;

/// Options given after the plugin path on QEMU's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginArgs {
    /// Unix socket of the host (`sock=`).
    pub sock: String,
    /// How long a held vCPU waits for an answer (`hold_timeout_ms=`, default 10 000).
    pub hold_timeout: Duration,
    /// Period of the flusher thread (`flush_us=`, default 1000).
    pub flush_period: Duration,
    /// A vCPU's buffer is written out when it holds this many bytes (`batch_bytes=`, default
    /// 16 KiB).
    pub batch_bytes: usize,
    /// How long install waits for the host's probe set (`connect_timeout_ms=`, default 30 000).
    pub connect_timeout: Duration,
    /// Print resolved registers and errors on QEMU's log (`verbose=on`).
    pub verbose: bool,
}

/// Why the plugin arguments are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum ArgsError {
    /// plugin argument `{0}` is not key=value
    NotKeyValue(String),
    /// unknown plugin argument `{0}`
    Unknown(String),
    /// plugin argument `{0}` has a bad value
    BadValue(String),
    /// plugin argument sock=PATH is required
    NoSocket,
}

impl PluginArgs {
    /// Parse `key=value` arguments.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self, ArgsError> {
        let mut sock = None;
        let mut out = PluginArgs {
            sock: String::new(),
            hold_timeout: Duration::from_secs(10),
            flush_period: Duration::from_micros(1000),
            batch_bytes: 16 * 1024,
            connect_timeout: Duration::from_secs(30),
            verbose: false,
        };
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| ArgsError::NotKeyValue(a.to_owned()))?;
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| ArgsError::BadValue(k.to_owned()))
            };
            match k {
                "sock" => sock = Some(v.to_owned()),
                "hold_timeout_ms" => out.hold_timeout = Duration::from_millis(num()?),
                "flush_us" => out.flush_period = Duration::from_micros(num()?.max(10)),
                "batch_bytes" => {
                    out.batch_bytes =
                        usize::try_from(num()?).map_err(|_| ArgsError::BadValue(k.to_owned()))?
                }
                "connect_timeout_ms" => out.connect_timeout = Duration::from_millis(num()?),
                "verbose" => {
                    out.verbose = match v {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(ArgsError::BadValue(k.to_owned())),
                    }
                }
                _ => return Err(ArgsError::Unknown(k.to_owned())),
            }
        }
        out.sock = sock.ok_or(ArgsError::NoSocket)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse() {
        let a = PluginArgs::parse(["sock=/tmp/x.sock", "hold_timeout_ms=250", "verbose=on"])
            .expect("valid");
        assert_eq!(a.sock, "/tmp/x.sock");
        assert_eq!(a.hold_timeout, Duration::from_millis(250));
        assert!(a.verbose);
        assert_eq!(a.batch_bytes, 16 * 1024);
        assert_eq!(PluginArgs::parse(["verbose=on"]), Err(ArgsError::NoSocket));
        assert_eq!(
            PluginArgs::parse(["sock=/x", "nope=1"]),
            Err(ArgsError::Unknown("nope".into()))
        );
        assert_eq!(
            PluginArgs::parse(["sock"]),
            Err(ArgsError::NotKeyValue("sock".into()))
        );
        assert_eq!(
            PluginArgs::parse(["sock=/x", "flush_us=abc"]),
            Err(ArgsError::BadValue("flush_us".into()))
        );
    }
}
