//! Kconfig fragments and `.config` files: parsing, merging a fragment into a base config, and
//! checking that every line of the fragment survived `make olddefconfig`.

use std::{collections::BTreeMap, fmt};

use anyhow::bail;

/// One symbol's value as Kconfig writes it (`y`, a number, a quoted string), or "not set".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `# CONFIG_X is not set`, `CONFIG_X=n`, or absent from a `.config`.
    No,
    /// Any other value, verbatim (`y`, `16`, `0x1000000`, `"text"`).
    Set(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::No => f.write_str("not set"),
            Value::Set(v) => f.write_str(v),
        }
    }
}

/// Symbols and values, in the order a fragment gives them.
pub type Entries = Vec<(String, Value)>;

/// Parses one line; `None` for blank lines and comments.
fn parse_line(line: &str) -> anyhow::Result<Option<(String, Value)>> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ")
        && let Some(sym) = rest.strip_suffix(" is not set")
        && is_symbol(sym)
    {
        return Ok(Some((sym.to_owned(), Value::No)));
    }
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let Some((sym, value)) = line.split_once('=') else {
        bail!("Expected `CONFIG_NAME=value`, found {line:?}");
    };
    if !is_symbol(sym) {
        bail!("{sym:?} is not a CONFIG_ symbol name");
    }
    let value = match value {
        "n" => Value::No,
        "m" => bail!("{sym}=m: the guest kernel has no modules, use y"),
        "" => bail!("{sym} has no value"),
        v => Value::Set(v.to_owned()),
    };
    Ok(Some((sym.to_owned(), value)))
}

fn is_symbol(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|name| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// Parses a fragment: every symbol at most once, no `=m`.
pub fn parse_fragment(text: &str) -> anyhow::Result<Entries> {
    let mut entries: Entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = parse_line(line).map_err(|e| e.context(format!("Line {}", n + 1)))?;
        if let Some((sym, value)) = parsed {
            if entries.iter().any(|(s, _)| *s == sym) {
                bail!("Line {}: {sym} is given twice", n + 1);
            }
            entries.push((sym, value));
        }
    }
    if entries.is_empty() {
        bail!("The fragment sets no symbol");
    }
    Ok(entries)
}

/// Parses a `.config` written by Kconfig (lenient: unknown lines are skipped).
pub fn parse_dotconfig(text: &str) -> BTreeMap<String, Value> {
    text.lines()
        .filter_map(|l| parse_line(l).ok().flatten())
        .collect()
}

/// Renders an entry the way Kconfig writes it.
fn render(sym: &str, value: &Value) -> String {
    match value {
        Value::No => format!("# {sym} is not set"),
        Value::Set(v) => format!("{sym}={v}"),
    }
}

/// `base` with every symbol of `fragment` replaced by the fragment's value (appended at the end,
/// so `olddefconfig` sees each symbol once).
pub fn merge(base: &str, fragment: &Entries) -> String {
    let mut out = String::with_capacity(base.len() + fragment.len() * 32);
    for line in base.lines() {
        let overridden = parse_line(line)
            .ok()
            .flatten()
            .is_some_and(|(sym, _)| fragment.iter().any(|(s, _)| *s == sym));
        if !overridden {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# Hearth fragment\n");
    for (sym, value) in fragment {
        out.push_str(&render(sym, value));
        out.push('\n');
    }
    out
}

/// The fragment's lines whose value differs in the final config, as `(symbol, wanted, got)`.
pub fn missing(fragment: &Entries, final_config: &str) -> Vec<(String, Value, Value)> {
    let have = parse_dotconfig(final_config);
    fragment
        .iter()
        .filter_map(|(sym, want)| {
            let got = have.get(sym).cloned().unwrap_or(Value::No);
            (got != *want).then(|| (sym.clone(), want.clone(), got))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_not_set() {
        let f = parse_fragment(
            "# comment\n\nCONFIG_A=y\nCONFIG_B=n\n# CONFIG_C is not set\nCONFIG_D=16\nCONFIG_E=\"x y\"\n",
        )
        .unwrap();
        assert_eq!(
            f,
            vec![
                ("CONFIG_A".into(), Value::Set("y".into())),
                ("CONFIG_B".into(), Value::No),
                ("CONFIG_C".into(), Value::No),
                ("CONFIG_D".into(), Value::Set("16".into())),
                ("CONFIG_E".into(), Value::Set("\"x y\"".into())),
            ]
        );
    }

    #[test]
    fn rejects_bad_fragments() {
        for (text, why) in [
            ("CONFIG_A=m\n", "no modules"),
            ("CONFIG_A=y\nCONFIG_A=n\n", "twice"),
            ("FOO=y\n", "not a CONFIG_ symbol"),
            ("CONFIG_a=y\n", "not a CONFIG_ symbol"),
            ("CONFIG_A\n", "Expected"),
            ("CONFIG_A=\n", "no value"),
            ("# only a comment\n", "no symbol"),
        ] {
            let err = format!("{:#}", parse_fragment(text).unwrap_err());
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn merge_replaces_and_appends() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=3\n# a comment\n";
        let frag = parse_fragment("CONFIG_B=y\nCONFIG_C=n\nCONFIG_D=y\n").unwrap();
        let merged = merge(base, &frag);
        let parsed = parse_dotconfig(&merged);
        assert_eq!(parsed["CONFIG_A"], Value::Set("y".into()));
        assert_eq!(parsed["CONFIG_B"], Value::Set("y".into()));
        assert_eq!(parsed["CONFIG_C"], Value::No);
        assert_eq!(parsed["CONFIG_D"], Value::Set("y".into()));
        assert_eq!(merged.matches("CONFIG_B").count(), 1);
        assert!(merged.contains("# a comment\n"));
    }

    #[test]
    fn missing_names_what_did_not_survive() {
        let frag = parse_fragment("CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\nCONFIG_D=8\n").unwrap();
        let final_config = "CONFIG_A=y\nCONFIG_D=4\n# CONFIG_C is not set\n";
        let m = missing(&frag, final_config);
        assert_eq!(
            m,
            vec![
                ("CONFIG_C".into(), Value::Set("y".into()), Value::No),
                (
                    "CONFIG_D".into(),
                    Value::Set("8".into()),
                    Value::Set("4".into())
                ),
            ]
        );
    }

    #[test]
    fn the_project_fragment_parses() {
        let text = std::fs::read_to_string(crate::util::root().join(super::super::FRAGMENT))
            .expect("images/kernel fragment");
        let f = parse_fragment(&text).unwrap();
        assert!(
            f.iter()
                .any(|(s, v)| s == "CONFIG_MODULES" && *v == Value::No)
        );
    }
}
