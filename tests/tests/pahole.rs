//! The committed profiles (`profiles/*.json`, written by our own BTF reader) checked
//! against a tool no one here wrote: `pahole` (Debian's `dwarves`) over the DWARF of
//! each default kernel's `-dbg` vmlinux. Every struct the profile holds: its size, and
//! every field's offset and size (paths such as `thread_info.flags` through pahole's
//! `--expand_types`, which prints nested members at their offset in the outer struct).
//!
//! The `-dbg` vmlinux (about 600 MB, from a ~300 MB .deb) is fetched once into
//! `<cache root>/debug/<package>/` and reused.

use ornament_images::catalog::{self, Reference};
use ornament_images::{cache_root, debian};
use ornament_tests::require_host;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One member as pahole prints it: offset in the outermost struct and size, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member {
    offset: u64,
    size: u64,
}

/// One struct (or typedef'd anonymous struct) from pahole: its size and every member by
/// dotted path (anonymous unions and structs add no path segment, as in C).
#[derive(Debug, Default, PartialEq, Eq)]
struct Layout {
    size: Option<u64>,
    members: BTreeMap<String, Member>,
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches(':');
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `s` without any `__attribute__((...))`.
fn strip_attributes(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("__attribute__") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "__attribute__".len()..];
        let mut depth = 0usize;
        let mut end = after.len();
        for (j, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `s` without `/* ... */` comments.
fn strip_comments(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The member name declared by `decl` (no comments, no trailing `;`): the identifier
/// after `(*` for function pointers, else the last identifier before any bit-field
/// width and array bounds.
fn declared_name(decl: &str) -> Option<String> {
    let decl = strip_attributes(decl);
    if let Some(i) = decl.find("(*") {
        let name: String = decl[i + 2..].chars().take_while(|c| is_ident(*c)).collect();
        return (!name.is_empty()).then_some(name);
    }
    let mut d = decl.trim();
    if let Some(i) = d.rfind(':') {
        if d[i + 1..].trim().chars().all(|c| c.is_ascii_digit()) {
            d = d[..i].trim_end();
        }
    }
    while d.ends_with(']') {
        d = d[..d.rfind('[')?].trim_end();
    }
    let name: String = d
        .chars()
        .rev()
        .take_while(|c| is_ident(*c))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (!name.is_empty() && !name.chars().all(|c| c.is_ascii_digit())).then_some(name)
}

/// The `/* offset size */` comment closing a member line (`offset` may be `off:bit`
/// for bit-fields); `None` for lines without one.
fn offset_comment(line: &str) -> Option<(String, Member)> {
    let t = line.trim_end();
    let body = t.strip_suffix("*/")?;
    let open = body.rfind("/*")?;
    let nums: Vec<&str> = body[open + 2..].split_whitespace().collect();
    let (offset, size) = match nums.as_slice() {
        // Bit-fields: `0x204: 0 0x4` or `0x204:0x1 0x4`.
        [off, _bit, size] if off.ends_with(':') => (parse_num(off)?, parse_num(size)?),
        [offbit, size] if offbit.contains(':') => {
            (parse_num(offbit.split(':').next()?)?, parse_num(size)?)
        }
        [off, size] => (parse_num(off)?, parse_num(size)?),
        _ => return None,
    };
    Some((t[..open].to_owned(), Member { offset, size }))
}

/// Open (`{` at line end) nested scopes: the members seen in each, by their path
/// inside it.
type Scope = BTreeMap<String, Member>;

/// Every top-level struct of pahole's `--hex --expand_types` output, by name.
fn parse_pahole(text: &str) -> Result<BTreeMap<String, Layout>, String> {
    let mut out: BTreeMap<String, Layout> = BTreeMap::new();
    let mut name: Option<String> = None;
    let mut layout = Layout::default();
    let mut stack: Vec<Scope> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let err = |what: &str| format!("pahole output line {}: {what}: {raw:?}", n + 1);
        let line = raw.trim();
        if stack.is_empty() {
            if line.is_empty() {
                continue;
            }
            let head = line
                .strip_suffix('{')
                .ok_or_else(|| err("expected a struct"))?;
            let head = head.trim();
            name = match head.strip_prefix("struct ") {
                Some(s) => Some(s.trim().to_owned()),
                None if head == "typedef struct" => None,
                None => return Err(err("expected `struct NAME {` or `typedef struct {`")),
            };
            layout = Layout::default();
            stack.push(Scope::new());
            continue;
        }
        if let Some(size) = line
            .strip_prefix("/* size: ")
            .and_then(|r| r.split(',').next())
        {
            if stack.len() == 1 {
                layout.size = Some(parse_num(size).ok_or_else(|| err("bad size"))?);
            }
            continue;
        }
        if strip_comments(line).trim().is_empty() {
            continue;
        }
        if line.ends_with('{') {
            stack.push(Scope::new());
            continue;
        }
        if let Some(close) = line.strip_prefix('}') {
            let inner = stack.pop().ok_or_else(|| err("unbalanced `}`"))?;
            if stack.is_empty() {
                // End of the top-level struct: `};`, `} __attribute__(...);` or `} NAME;`.
                let tail = strip_attributes(close.trim().trim_end_matches(';'));
                let struct_name = match name.take() {
                    Some(s) => s,
                    None => declared_name(tail.trim())
                        .ok_or_else(|| err("typedef struct without a name"))?,
                };
                layout.members = inner;
                if let Some(prev) = out.get(&struct_name) {
                    if *prev != layout {
                        return Err(err(&format!(
                            "pahole printed two different layouts of {struct_name}"
                        )));
                    }
                }
                out.insert(struct_name, std::mem::take(&mut layout));
                continue;
            }
            // A nested struct or union closing: `}name; /* off size */` or `};  /* .. */`.
            let (decl, m) = offset_comment(close).ok_or_else(|| err("no offset"))?;
            let decl = strip_comments(&decl);
            let decl = decl.trim().trim_end_matches(';').trim();
            let parent = stack.last_mut().ok_or_else(|| err("unbalanced `}`"))?;
            match declared_name(decl) {
                Some(member) => {
                    for (path, v) in inner {
                        parent.insert(format!("{member}.{path}"), v);
                    }
                    parent.insert(member, m);
                }
                // Anonymous: its members belong to the enclosing scope.
                None => parent.extend(inner),
            }
            continue;
        }
        let Some((decl, m)) = offset_comment(line) else {
            // Unnamed bit-field padding (`unsigned int :0;`) has no offset and no name.
            let bare = strip_comments(line);
            let bare = bare.trim().trim_end_matches(';');
            if bare.rsplit_once(':').is_some_and(|(ty, width)| {
                !width.trim().is_empty()
                    && width.trim().chars().all(|c| c.is_ascii_digit())
                    && ty.ends_with(char::is_whitespace)
            }) {
                continue;
            }
            return Err(err("member without an offset"));
        };
        let decl = strip_comments(&decl);
        let decl = decl.trim().trim_end_matches(';');
        let member = declared_name(decl).ok_or_else(|| err("no member name"))?;
        stack
            .last_mut()
            .ok_or_else(|| err("member outside a struct"))?
            .insert(member, m);
    }
    if !stack.is_empty() {
        return Err("pahole output ends inside a struct".into());
    }
    Ok(out)
}

/// The full vmlinux (with DWARF) of `spec`'s `-dbg` package, fetched once into
/// `<cache root>/debug/<package>/` (downloaded and unpacked into a scratch directory
/// there, then renamed into place, so a file at the final path is complete).
fn debug_vmlinux(spec: &Reference) -> Result<PathBuf, String> {
    let dir = cache_root(None).join("debug").join(spec.dbg_package);
    let vmlinux = dir.join(format!("vmlinux-{}", spec.release));
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let scratch = dir.join(format!("fetch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let t = Instant::now();
    let debs = debian::download(&[spec.dbg_package], &scratch).map_err(|e| e.to_string())?;
    let partial = scratch.join("vmlinux");
    debian::extract(
        &debs[0],
        &[(
            format!("./usr/lib/debug/boot/vmlinux-{}", spec.release),
            partial.clone(),
        )],
    )
    .map_err(|e| e.to_string())?;
    std::fs::rename(&partial, &vmlinux).map_err(|e| format!("{}: {e}", vmlinux.display()))?;
    std::fs::remove_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    eprintln!(
        "fetched {} in {:.1} s",
        vmlinux.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(vmlinux)
}

/// Is pahole runnable? The error says why not.
fn has_pahole() -> Result<(), String> {
    let out = Command::new("pahole")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run pahole: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`pahole --version` failed: {}", out.status))
    }
}

/// The committed profile of `release`, as JSON.
fn committed_profile(release: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiles")
        .join(format!("{release}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Check every struct, size and field of the committed profile of image `name` against
/// pahole's reading of its kernel's DWARF.
fn profile_matches_pahole(name: &str) {
    require_host!("pahole (apt-get install dwarves)", has_pahole());
    require_host!(
        "apt-get and dpkg-deb (to fetch the -dbg package)",
        ornament_tests::can_build_images()
    );
    let spec = catalog::reference(name);
    let vmlinux = require_host!(
        &format!("the -dbg vmlinux of {}", spec.dbg_package),
        debug_vmlinux(&spec)
    );
    let profile = committed_profile(spec.release);
    let structs = profile["structs"]
        .as_object()
        .unwrap_or_else(|| panic!("profile {} has no structs", spec.release));
    let names: Vec<&str> = structs.keys().map(String::as_str).collect();
    let t = Instant::now();
    let out = Command::new("pahole")
        .args(["-F", "dwarf", "--hex", "--expand_types", "-C"])
        .arg(names.join(","))
        .arg(&vmlinux)
        .output()
        .expect("run pahole");
    assert!(
        out.status.success(),
        "pahole on {} failed: {}",
        vmlinux.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let layouts = parse_pahole(&text).unwrap_or_else(|e| panic!("{}: {e}", vmlinux.display()));
    let mut wrong = Vec::new();
    let mut compared = 0usize;
    for (sname, s) in structs {
        let Some(l) = layouts.get(sname) else {
            wrong.push(format!("struct {sname}: pahole does not know it"));
            continue;
        };
        let want = s["size"].as_u64();
        if want != l.size {
            wrong.push(format!(
                "struct {sname}: size {want:?} in the profile, {:?} in pahole",
                l.size
            ));
        }
        let fields = s["fields"]
            .as_object()
            .unwrap_or_else(|| panic!("profile struct {sname} has no fields"));
        for (fname, f) in fields {
            compared += 1;
            let Some(m) = l.members.get(fname) else {
                wrong.push(format!("{sname}.{fname}: pahole has no such member"));
                continue;
            };
            let offset = f["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("{sname}.{fname} has no offset in the profile"));
            if offset != m.offset {
                wrong.push(format!(
                    "{sname}.{fname}: offset {offset:#x} in the profile, {:#x} in pahole",
                    m.offset
                ));
            }
            if let Some(size) = f["size"].as_u64() {
                if size != m.size {
                    wrong.push(format!(
                        "{sname}.{fname}: size {size} in the profile, {} in pahole",
                        m.size
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "profile {} disagrees with pahole on {}:\n{}",
        spec.release,
        vmlinux.display(),
        wrong.join("\n")
    );
    // Every struct of the profile has fields: an empty comparison would prove nothing.
    assert!(compared >= structs.len(), "{compared} fields compared");
    eprintln!(
        "{}: {} structs, {compared} fields equal to pahole's ({:.2} s for pahole)",
        spec.release,
        structs.len(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn profile_6_1_offsets_equal_paholes() {
    profile_matches_pahole("debian-6.1-cloud");
}

#[test]
fn profile_6_12_offsets_equal_paholes() {
    profile_matches_pahole("debian-6.12-cloud");
}

/// The parser on pahole's own text shapes: nested named and anonymous members at
/// absolute offsets, bit-fields, arrays, function pointers, attributes, typedef'd
/// anonymous structs.
#[test]
fn parser_reads_paholes_shapes() {
    let text = "\
struct task_struct {
\tstruct thread_info {
\t\tlong unsigned int  flags;                  /*     0   0x8 */
\t\t/* typedef u32 -> __u32 */ unsigned int status; /*   0x8   0x4 */
\t}thread_info; /*     0  0x10 */
\tunion {
\t\tunsigned int u_flags;                      /*  0x10   0x4 */
\t\tstruct {
\t\t\tint counter;                             /*  0x10   0x4 */
\t\t} a_flags; /*  0x10   0x4 */
\t};                                              /*  0x10   0x4 */
\tunsigned int  sched_reset_on_fork:1;          /*  0x14: 0 0x4 */
\tunsigned int  dl_yielded:1;                   /*  0x14:0x1 0x4 */
\tchar          comm[16];                       /*  0x18  0x10 */
\tlong int      (*fn)(struct restart_block *);  /*  0x28   0x8 */
\tstruct callback_head rcu __attribute__((__aligned__(8))); /*  0x30  0x10 */
\tstruct upid   numbers[];                      /*  0x40     0 */
\tstruct {
\t\tint x;                                     /*  0x40   0x4 */
\t}regs __attribute__((__aligned__(64))); /*  0x40  0x4 */

\t/* size: 128, cachelines: 2, members: 9 */
} __attribute__((__aligned__(64)));
typedef struct {
\tuid_t                      val;                  /*     0   0x4 */

\t/* size: 4, cachelines: 1, members: 1 */
} kuid_t;
";
    let l = parse_pahole(text).expect("parses");
    let t = &l["task_struct"];
    assert_eq!(t.size, Some(128));
    let m = |offset, size| Member { offset, size };
    let want = [
        ("thread_info", m(0, 0x10)),
        ("thread_info.flags", m(0, 8)),
        ("thread_info.status", m(8, 4)),
        ("u_flags", m(0x10, 4)),
        ("a_flags", m(0x10, 4)),
        ("a_flags.counter", m(0x10, 4)),
        ("sched_reset_on_fork", m(0x14, 4)),
        ("dl_yielded", m(0x14, 4)),
        ("comm", m(0x18, 0x10)),
        ("fn", m(0x28, 8)),
        ("rcu", m(0x30, 0x10)),
        ("numbers", m(0x40, 0)),
        ("regs", m(0x40, 4)),
        ("regs.x", m(0x40, 4)),
    ];
    let got: Vec<(&str, Member)> = t.members.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mut want = want.to_vec();
    want.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(got, want);
    assert_eq!(l["kuid_t"].size, Some(4));
    assert_eq!(l["kuid_t"].members["val"], m(0, 4));
    assert_eq!(l.len(), 2);
    // Damaged output is an error naming the line, never a panic.
    let e = parse_pahole("struct x {\n\tint a;\n};\n").expect_err("no offset");
    assert!(e.contains("line 2"), "{e}");
    let e = parse_pahole("struct x {\n\tint a; /* 0 0x4 */\n").expect_err("unterminated");
    assert!(e.contains("ends inside"), "{e}");
}
