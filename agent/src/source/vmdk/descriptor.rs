//! The VMDK text descriptor: which file holds which range of the disk.
//!
//! A descriptor is a small text file (or a text block embedded in a sparse
//! extent, see `sparse.rs`). The grammar accepted here, one item per line
//! (`\n` or `\r\n`; the text ends at the first NUL, which pads embedded and
//! ESXi descriptors):
//!
//! ```text
//! line    := blank | comment | setting | extent
//! blank   := whitespace only
//! comment := "#" anything                       (incl. "# Disk DescriptorFile", "#DDB")
//! setting := key ws* "=" ws* value              (key: ASCII letters, digits, '.', '_')
//! value   := '"' text '"' | text                (quotes are removed)
//! extent  := access ws+ sectors ws+ type [ws+ '"' file '"' [ws+ offset]]
//! access  := "RW" | "RDONLY" | "NOACCESS"
//! type    := "FLAT" | "VMFS" | "SPARSE" | "ZERO" | "VMFSSPARSE" | "SESPARSE"
//!          | "VMFSRDM" | "VMFSRAW"
//! sectors, offset := decimal u64, in 512-byte sectors
//! ```
//!
//! Settings read: `createType` (required), `parentCID` and
//! `parentFileNameHint` (a delta disk has them, and is refused by the
//! caller). Every other setting (`version`, `CID`, `encoding`, `ddb.*`,
//! `changeTrackPath`, ...) is accepted and ignored. Any other line is a
//! defect, reported with its line number. Extent lines appear in disk order:
//! each extent covers the next `sectors` sectors of the disk. FLAT and VMFS
//! extents need a file (offset defaults to 0); SPARSE needs a file and takes
//! no offset; ZERO has no file.
//!
//! The parser is a pure function of the text, so the fuzz target reaches it
//! directly; sizes are bounded by the caller (descriptor length) and here
//! (extent count).

/// At most this many extents: a 62 TiB twoGbMaxExtent disk has 31 744.
pub(super) const MAX_EXTENTS: usize = 65_536;

/// How a descriptor's extent is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExtentType {
    /// Raw bytes in a file, from a sector offset (hosted flat extents).
    Flat,
    /// Raw bytes in an ESXi `-flat.vmdk` file (same layout as `Flat`).
    Vmfs,
    /// A hosted sparse extent (`KDMV` header, grain tables).
    Sparse,
    /// Reads as zeros, no file.
    Zero,
    /// ESX snapshot delta (`COWD`): refused.
    VmfsSparse,
    /// ESXi space-efficient snapshot delta: refused.
    SeSparse,
    /// Raw device mapping: refused.
    VmfsRdm,
    /// Raw device: refused.
    VmfsRaw,
}

impl ExtentType {
    /// The keyword as written in a descriptor.
    pub(super) fn keyword(self) -> &'static str {
        match self {
            ExtentType::Flat => "FLAT",
            ExtentType::Vmfs => "VMFS",
            ExtentType::Sparse => "SPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }

    fn parse(word: &str) -> Option<ExtentType> {
        Some(match word {
            "FLAT" => ExtentType::Flat,
            "VMFS" => ExtentType::Vmfs,
            "SPARSE" => ExtentType::Sparse,
            "ZERO" => ExtentType::Zero,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            _ => return None,
        })
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExtentLine {
    /// 1-based line number, for error messages.
    pub line: usize,
    /// Whether the access word was `NOACCESS`.
    pub no_access: bool,
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// Storage type.
    pub kind: ExtentType,
    /// File name as written (relative to the descriptor's directory).
    pub file: Option<String>,
    /// Offset of the extent in its file, in sectors.
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Descriptor {
    /// `createType`, as written.
    pub create_type: String,
    /// `parentCID`, if present.
    pub parent_cid: Option<String>,
    /// `parentFileNameHint`, if present.
    pub parent_hint: Option<String>,
    /// Extents in disk order.
    pub extents: Vec<ExtentLine>,
}

/// A defect in a descriptor: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Defect {
    /// 1-based line (0: the descriptor as a whole).
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

fn defect(line: usize, what: impl Into<String>) -> Defect {
    Defect {
        line,
        what: what.into(),
    }
}

/// Parses descriptor bytes (up to the first NUL).
pub(super) fn parse(bytes: &[u8]) -> Result<Descriptor, Defect> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        defect(line, "not UTF-8 text")
    })?;
    let mut create_type = None;
    let mut parent_cid = None;
    let mut parent_hint = None;
    let mut extents = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            if extents.len() >= MAX_EXTENTS {
                return Err(defect(n, format!("more than {MAX_EXTENTS} extents")));
            }
            extents.push(parse_extent(n, line)?);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(defect(
                n,
                format!("neither a setting nor an extent: {:?}", clip(line)),
            ));
        };
        let key = key.trim_end();
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        if !key_ok {
            return Err(defect(n, format!("bad setting name {:?}", clip(key))));
        }
        let value = unquote(n, value.trim_start())?;
        let slot = match key {
            "createType" => &mut create_type,
            "parentCID" => &mut parent_cid,
            "parentFileNameHint" => &mut parent_hint,
            _ => continue,
        };
        if slot.is_some() {
            return Err(defect(n, format!("{key} given twice")));
        }
        *slot = Some(value.to_owned());
    }
    let create_type = create_type.ok_or_else(|| defect(0, "no createType"))?;
    if extents.is_empty() {
        return Err(defect(0, "no extent lines"));
    }
    Ok(Descriptor {
        create_type,
        parent_cid,
        parent_hint,
        extents,
    })
}

/// A value without its quotes (`"a b"` → `a b`); unquoted values as is.
fn unquote(n: usize, value: &str) -> Result<&str, Defect> {
    match value.strip_prefix('"') {
        None => Ok(value),
        Some(rest) => match rest.strip_suffix('"') {
            Some(inner) if !inner.contains('"') => Ok(inner),
            _ => Err(defect(n, "unbalanced quotes")),
        },
    }
}

fn parse_extent(n: usize, line: &str) -> Result<ExtentLine, Defect> {
    let mut rest = line;
    let mut word = || {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        w
    };
    let access = word();
    let sectors_text = word();
    let kind_text = word();
    let sectors = parse_u64(sectors_text)
        .ok_or_else(|| defect(n, format!("bad extent size {:?}", clip(sectors_text))))?;
    if sectors == 0 {
        return Err(defect(n, "extent of 0 sectors"));
    }
    let kind = ExtentType::parse(kind_text)
        .ok_or_else(|| defect(n, format!("unknown extent type {:?}", clip(kind_text))))?;
    let tail = rest.trim_start();
    let (file, tail) = if tail.is_empty() {
        (None, "")
    } else {
        let inner = tail
            .strip_prefix('"')
            .ok_or_else(|| defect(n, "extent file name must be quoted"))?;
        let close = inner
            .find('"')
            .ok_or_else(|| defect(n, "unterminated extent file name"))?;
        let name = &inner[..close];
        if name.is_empty() {
            return Err(defect(n, "empty extent file name"));
        }
        (Some(name.to_owned()), inner[close + 1..].trim())
    };
    let offset = if tail.is_empty() {
        None
    } else {
        let off = parse_u64(tail)
            .ok_or_else(|| defect(n, format!("bad extent offset {:?}", clip(tail))))?;
        Some(off)
    };
    match kind {
        ExtentType::Zero if file.is_some() => {
            return Err(defect(n, "a ZERO extent has no file"));
        }
        ExtentType::Zero => {}
        _ if file.is_none() => {
            return Err(defect(
                n,
                format!("{} extent without a file", kind.keyword()),
            ));
        }
        ExtentType::Sparse if offset.is_some_and(|o| o != 0) => {
            return Err(defect(n, "a SPARSE extent takes no file offset"));
        }
        _ => {}
    }
    Ok(ExtentLine {
        line: n,
        no_access: access == "NOACCESS",
        sectors,
        kind,
        file,
        offset: offset.unwrap_or(0),
    })
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// At most 60 characters of untrusted text, for error messages.
fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESXI: &str = "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 41943040 VMFS \"web 01-flat.vmdk\"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.uuid = \"60 00 C2 9a\"\r\n";

    #[test]
    fn esxi_descriptor_with_crlf_and_spaces_in_names() {
        let d = parse(ESXI.as_bytes()).unwrap();
        assert_eq!(d.create_type, "vmfs");
        assert_eq!(d.parent_cid.as_deref(), Some("ffffffff"));
        assert_eq!(d.parent_hint, None);
        assert_eq!(
            d.extents,
            vec![ExtentLine {
                line: 9,
                no_access: false,
                sectors: 41943040,
                kind: ExtentType::Vmfs,
                file: Some("web 01-flat.vmdk".into()),
                offset: 0,
            }]
        );
    }

    #[test]
    fn text_ends_at_nul_and_extents_keep_order() {
        let mut t = b"createType=\"twoGbMaxExtentFlat\"\nRW 8 FLAT \"a\" 0\nRDONLY 16 FLAT \"b\" 4\nRW 2 ZERO\n".to_vec();
        t.extend_from_slice(&[0; 100]);
        t.extend_from_slice(b"garbage after the NUL");
        let d = parse(&t).unwrap();
        let got: Vec<_> = d
            .extents
            .iter()
            .map(|e| (e.sectors, e.kind, e.file.clone(), e.offset))
            .collect();
        assert_eq!(
            got,
            vec![
                (8, ExtentType::Flat, Some("a".into()), 0),
                (16, ExtentType::Flat, Some("b".into()), 4),
                (2, ExtentType::Zero, None, 0),
            ]
        );
    }

    #[test]
    fn defects_name_their_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("createType=\"x\"\nhello world\n", 2, "neither a setting"),
            (
                "createType=\"x\"\nRW 12x SPARSE \"a\"\n",
                2,
                "bad extent size",
            ),
            ("createType=\"x\"\nRW 0 SPARSE \"a\"\n", 2, "0 sectors"),
            (
                "createType=\"x\"\nRW 1 FOO \"a\"\n",
                2,
                "unknown extent type",
            ),
            ("createType=\"x\"\nRW 1 FLAT a\n", 2, "quoted"),
            ("createType=\"x\"\nRW 1 FLAT \"a\n", 2, "unterminated"),
            (
                "createType=\"x\"\nRW 1 FLAT \"a\" zz\n",
                2,
                "bad extent offset",
            ),
            ("createType=\"x\"\nRW 1 FLAT\n", 2, "without a file"),
            (
                "createType=\"x\"\nRW 1 ZERO \"a\"\n",
                2,
                "ZERO extent has no file",
            ),
            (
                "createType=\"x\"\nRW 1 SPARSE \"a\" 7\n",
                2,
                "no file offset",
            ),
            ("createType=\"x\nRW 1 ZERO\n", 1, "unbalanced"),
            ("createType=a\ncreateType=b\nRW 1 ZERO\n", 2, "twice"),
            ("RW 1 ZERO\n", 0, "no createType"),
            ("createType=\"x\"\n", 0, "no extent"),
            ("a b=c\nRW 1 ZERO\n", 1, "bad setting name"),
            ("createType=x\n\u{ff}\n", 2, "UTF-8"),
        ];
        for &(text, line, what) in cases {
            let bytes: Vec<u8> = if what == "UTF-8" {
                b"createType=x\n\xff\n".to_vec()
            } else {
                text.as_bytes().to_vec()
            };
            let d = parse(&bytes).unwrap_err();
            assert_eq!(d.line, line, "{text:?}: {d:?}");
            assert!(d.what.contains(what), "{text:?}: {d:?}");
        }
    }

    #[test]
    fn extent_count_is_bounded() {
        let mut t = String::from("createType=\"twoGbMaxExtentFlat\"\n");
        for _ in 0..=MAX_EXTENTS {
            t.push_str("RW 1 ZERO\n");
        }
        let d = parse(t.as_bytes()).unwrap_err();
        assert!(d.what.contains("more than"), "{d:?}");
    }
}
