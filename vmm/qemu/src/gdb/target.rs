//! The register layout of the `g` packet, read from the stub's target description.

use ornament_engine::Regs;

/// One register of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegDesc {
    /// Name as the target description gives it (`rax`, `fs_base`, `cr3`...).
    pub name: String,
    /// Register number (for `p`/`P` packets).
    pub regnum: u32,
    /// Width in bits.
    pub bitsize: u32,
    /// Byte offset in the `g` packet.
    pub offset: usize,
}

/// The `g` packet layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegLayout {
    regs: Vec<RegDesc>,
}

/// Remove `<!-- ... -->` comments (QEMU's XML has commented-out registers).
pub fn strip_comments(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        match rest[start..].find("-->") {
            Some(end) => rest = &rest[start + end + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// The value of attribute `name` in one tag's text.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=\"");
    let mut from = 0;
    while let Some(i) = tag[from..].find(&pat) {
        let at = from + i;
        // Must be a whole attribute name.
        if at == 0 || tag.as_bytes()[at - 1].is_ascii_whitespace() {
            let v = &tag[at + pat.len()..];
            return v.find('"').map(|e| &v[..e]);
        }
        from = at + pat.len();
    }
    None
}

/// Items of a description in document order: register tags and include hrefs.
#[derive(Debug, PartialEq, Eq)]
pub enum XmlItem {
    /// `<reg name=.. bitsize=.. [regnum=..]/>`
    Reg {
        /// name
        name: String,
        /// bitsize
        bitsize: u32,
        /// explicit regnum
        regnum: Option<u32>,
    },
    /// `<xi:include href=".."/>`
    Include(String),
}

/// Scan one (comment-stripped) XML document.
pub fn scan_items(xml: &str) -> Vec<XmlItem> {
    let xml = strip_comments(xml);
    let mut items = Vec::new();
    let mut rest = xml.as_str();
    while let Some(i) = rest.find('<') {
        let Some(end) = rest[i..].find('>') else {
            break;
        };
        let tag = &rest[i + 1..i + end];
        if let Some(t) = tag.strip_prefix("reg ") {
            if let (Some(name), Some(bits)) = (attr(t, "name"), attr(t, "bitsize")) {
                if let Ok(bitsize) = bits.parse() {
                    items.push(XmlItem::Reg {
                        name: name.to_owned(),
                        bitsize,
                        regnum: attr(t, "regnum").and_then(|r| r.parse().ok()),
                    });
                }
            }
        } else if tag.starts_with("xi:include ") {
            if let Some(h) = attr(tag, "href") {
                items.push(XmlItem::Include(h.to_owned()));
            }
        }
        rest = &rest[i + end + 1..];
    }
    items
}

impl RegLayout {
    /// Build from registers in document order (includes already expanded).
    pub fn from_items(items: impl IntoIterator<Item = (String, u32, Option<u32>)>) -> Self {
        let mut regs: Vec<RegDesc> = Vec::new();
        let mut next = 0u32;
        for (name, bitsize, regnum) in items {
            let regnum = regnum.unwrap_or(next);
            next = regnum + 1;
            regs.push(RegDesc {
                name,
                regnum,
                bitsize,
                offset: 0,
            });
        }
        // `g` holds registers in regnum order.
        regs.sort_by_key(|r| r.regnum);
        let mut off = 0usize;
        for r in &mut regs {
            r.offset = off;
            off += usize::try_from(r.bitsize / 8).unwrap_or(0);
        }
        Self { regs }
    }

    /// Look a register up by name.
    pub fn get(&self, name: &str) -> Option<&RegDesc> {
        self.regs.iter().find(|r| r.name == name)
    }

    /// Every register.
    pub fn regs(&self) -> &[RegDesc] {
        &self.regs
    }

    /// Decode a `g` reply (raw bytes, already un-hexed) into `Regs`.
    /// Registers missing from the layout or the reply stay 0.
    pub fn decode(&self, g: &[u8]) -> Regs {
        let val = |name: &str| -> u64 {
            let Some(r) = self.get(name) else { return 0 };
            let n = usize::try_from(r.bitsize / 8).unwrap_or(0).min(8);
            let Some(b) = g.get(r.offset..r.offset + n) else {
                return 0;
            };
            let mut le = [0u8; 8];
            le[..n].copy_from_slice(b);
            u64::from_le_bytes(le)
        };
        Regs {
            rax: val("rax"),
            rbx: val("rbx"),
            rcx: val("rcx"),
            rdx: val("rdx"),
            rsi: val("rsi"),
            rdi: val("rdi"),
            rbp: val("rbp"),
            rsp: val("rsp"),
            r8: val("r8"),
            r9: val("r9"),
            r10: val("r10"),
            r11: val("r11"),
            r12: val("r12"),
            r13: val("r13"),
            r14: val("r14"),
            r15: val("r15"),
            rip: val("rip"),
            rflags: val("eflags"),
            cs: val("cs"),
            cr0: val("cr0"),
            cr3: val("cr3"),
            cr4: val("cr4"),
            efer: val("efer"),
            gs_base: val("gs_base"),
            kernel_gs_base: val("k_gs_base"),
            fs_base: val("fs_base"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_items() {
        let xml = r#"<target><!-- <reg name="ghost" bitsize="64"/> -->
            <xi:include href="i386-64bit.xml"/>
            <reg name="rax" bitsize="64" type="int64"/>
            <reg name="eflags" bitsize="32"/>
            <reg name="cs" bitsize="32" regnum="5"/></target>"#;
        let items = scan_items(xml);
        assert_eq!(
            items,
            vec![
                XmlItem::Include("i386-64bit.xml".into()),
                XmlItem::Reg {
                    name: "rax".into(),
                    bitsize: 64,
                    regnum: None
                },
                XmlItem::Reg {
                    name: "eflags".into(),
                    bitsize: 32,
                    regnum: None
                },
                XmlItem::Reg {
                    name: "cs".into(),
                    bitsize: 32,
                    regnum: Some(5)
                },
            ]
        );
    }

    #[test]
    fn layout_offsets_and_decode() {
        let l = RegLayout::from_items(vec![
            ("rax".to_owned(), 64, None),
            ("rip".to_owned(), 64, None),
            ("eflags".to_owned(), 32, None),
            ("cr3".to_owned(), 64, None),
        ]);
        assert_eq!(l.get("eflags").map(|r| (r.regnum, r.offset)), Some((2, 16)));
        assert_eq!(l.get("cr3").map(|r| r.offset), Some(20));
        let mut g = vec![0u8; 28];
        g[0..8].copy_from_slice(&1u64.to_le_bytes());
        g[8..16].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        g[16..20].copy_from_slice(&0x246u32.to_le_bytes());
        g[20..28].copy_from_slice(&0x1234_5000u64.to_le_bytes());
        let r = l.decode(&g);
        assert_eq!(
            (r.rax, r.rip, r.rflags, r.cr3),
            (1, 0xffff_ffff_8100_0000, 0x246, 0x1234_5000)
        );
        // A short reply leaves the missing registers at 0.
        assert_eq!(l.decode(&g[..10]).rip, 0);
    }
}
