//! Elastic Common Schema documents checked against ECS's own published field definitions
//! (`ecs_flat`: every field's name, type and whether it is an array), not a list typed here.
//!
//! The definitions come from the npm registry's `@elastic/ecs` package, which ships ECS's
//! generated `ecs_flat` as `generated/ecs_flat.js` (`EcsFlat`): fetched once with `npm pack`,
//! read with `node`, and kept in `<cache>/ecs/<version>/ecs_flat.json`.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The ECS version ornament's documents follow (`ecs.version`).
pub const ECS_VERSION: &str = "9.4.0";

/// `<cache>/ecs/<version>/ecs_flat.json`.
fn cached(version: &str) -> PathBuf {
    ornament_images::cache::cache_root(None)
        .join("ecs")
        .join(version)
        .join("ecs_flat.json")
}

/// Run `cmd`, its stdout, or why not.
fn output(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(o.stdout)
}

/// ECS `version`'s flat field definitions, fetched from the npm registry's
/// `@elastic/ecs@<version>` into `dir` (npm checks the tarball's integrity).
fn fetch(version: &str, dir: &Path) -> Result<Vec<u8>, String> {
    let tgz = output(
        Command::new("npm")
            .args(["pack", "--silent", &format!("@elastic/ecs@{version}")])
            .arg("--pack-destination")
            .arg(dir),
    )?;
    let tgz = dir.join(String::from_utf8_lossy(&tgz).trim());
    output(Command::new("tar").arg("xzf").arg(&tgz).arg("-C").arg(dir))?;
    let js = dir.join("package/generated/ecs_flat.js");
    output(
        Command::new("node")
            .args([
                "-e",
                "process.stdout.write(JSON.stringify(require(process.argv[1]).EcsFlat))",
            ])
            .arg(&js),
    )
}

/// ECS [`ECS_VERSION`]'s field definitions, by flat name: from the cache, else fetched
/// (see the module). The error says why they could not be had.
pub fn ecs_flat() -> Result<Map<String, Value>, String> {
    let path = cached(ECS_VERSION);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(_) => {
            let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            let b = fetch(ECS_VERSION, tmp.path())?;
            let dir = path.parent().ok_or("no cache directory")?;
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let part = dir.join("ecs_flat.json.partial");
            std::fs::write(&part, &b).map_err(|e| format!("{}: {e}", part.display()))?;
            std::fs::rename(&part, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            b
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) if m.contains_key("@timestamp") => Ok(m),
        _ => Err(format!("{} is not ECS's ecs_flat", path.display())),
    }
}

/// True when `v` is an RFC 3339 date-time in UTC (`2026-12-03T07:30:01.5Z`).
fn is_date(v: &Value) -> bool {
    let Some(s) = v.as_str() else {
        return false;
    };
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && s.ends_with('Z')
}

/// Panics unless `v`, the value of ECS field `name`, has the JSON type of its ECS `def`
/// (an array exactly where ECS normalizes the field to one), and is one of its allowed
/// values where ECS lists them.
fn check_value(name: &str, def: &Value, v: &Value) {
    let array = def["normalize"]
        .as_array()
        .is_some_and(|n| n.iter().any(|x| x == "array"));
    let items: Vec<&Value> = match (array, v) {
        (true, Value::Array(a)) => a.iter().collect(),
        (true, _) => panic!("{name} must be an array: {v}"),
        (false, Value::Array(_)) => panic!("{name} must not be an array: {v}"),
        (false, _) => vec![v],
    };
    let ty = def["type"].as_str().unwrap_or_default();
    for x in items {
        let ok = match ty {
            "keyword" | "constant_keyword" | "wildcard" | "match_only_text" | "ip" => x.is_string(),
            "long" => x.is_i64() || x.is_u64(),
            "float" | "scaled_float" => x.is_number(),
            "boolean" => x.is_boolean(),
            "date" => is_date(x),
            "object" | "flattened" | "nested" => x.is_object(),
            other => panic!("{name}: ECS type {other} not handled by this check"),
        };
        assert!(ok, "{name} is ECS {ty}, got {x}");
        if let Some(allowed) = def["allowed_values"].as_array() {
            assert!(
                allowed.iter().any(|a| a["name"] == *x),
                "{name}: {x} is not one of ECS's values"
            );
        }
    }
}

/// Walks `obj` (at dotted `prefix`), checking each field against `flat`.
fn walk(obj: &Map<String, Value>, prefix: &str, flat: &Map<String, Value>, seen: &mut Vec<String>) {
    for (k, v) in obj {
        let name = format!("{prefix}{k}");
        match (flat.get(&name), v) {
            (Some(def), _) => {
                check_value(&name, def, v);
                seen.push(name);
            }
            (None, Value::Object(inner)) => walk(inner, &format!("{name}."), flat, seen),
            (None, _) => panic!("{name} is not an ECS {ECS_VERSION} field"),
        }
    }
}

/// Panics unless every field of ECS document `doc` is a field of `flat` (ECS's definitions)
/// with its type, and every field ECS requires is there. The flat names it has.
pub fn check_ecs(doc: &Value, flat: &Map<String, Value>) -> Vec<String> {
    let obj = doc
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {doc}"));
    let mut seen = Vec::new();
    walk(obj, "", flat, &mut seen);
    for (name, def) in flat {
        if def["required"] == true {
            assert!(seen.contains(name), "{name} is required by ECS: {doc}");
        }
    }
    seen
}
