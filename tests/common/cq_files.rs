//! InfluxQL files (`nginx-conf/influxdb/*.influxql`) as the tests read them: their statements,
//! their continuous queries, and a CQ's statement limited to a time range (the README's
//! backfill). Shared by tests/influxdb_rollups.rs and tests/reports.rs, which include it with
//! `#[path = "common/cq_files.rs"] mod cq_files;`.
#![allow(dead_code)]

/// The statements of an InfluxQL file: `--` comments removed, split at `;` outside quotes.
pub fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                current.push(c);
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        current.push(next);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '-' && chars.peek() == Some(&'-') => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            None if c == ';' => {
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                current.push(c);
            }
        }
    }
    assert!(quote.is_none(), "unterminated quote in {text:?}");
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// One `CREATE CONTINUOUS QUERY` of a file.
#[derive(Debug, Clone)]
pub struct ContinuousQuery {
    pub name: String,
    /// The statement between `BEGIN` and `END`.
    pub select: String,
}

pub fn continuous_queries(statements: &[String]) -> Vec<ContinuousQuery> {
    const PREFIX: &str = "CREATE CONTINUOUS QUERY \"";
    statements
        .iter()
        .filter(|s| s.starts_with("CREATE CONTINUOUS QUERY"))
        .map(|s| {
            let rest = s
                .strip_prefix(PREFIX)
                .unwrap_or_else(|| panic!("CQ name not quoted: {s}"));
            let name = rest[..rest.find('"').expect("end of the CQ name")].to_string();
            let begin = s.find("BEGIN").expect("BEGIN") + "BEGIN".len();
            let end = s.rfind("END").expect("END");
            assert!(s[end..].trim() == "END", "CQ {name} does not end with END");
            let select = s[begin..end].trim().to_string();
            assert!(select.starts_with("SELECT "), "CQ {name}: {select}");
            ContinuousQuery { name, select }
        })
        .collect()
}

/// Byte offset of the keyword `word` in `text` outside parentheses and quotes, if any.
pub fn find_top_level(text: &str, word: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ if depth == 0 && text[i..].starts_with(word) => return Some(i),
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// The CQ's statement limited to `[from, to)`: what the README says to run once to roll up
/// data written before the CQ existed.
pub fn backfill(select: &str, from_ns: u64, to_ns: u64) -> String {
    let time = format!("time >= {from_ns} AND time < {to_ns}");
    let group_by = find_top_level(select, "GROUP BY time(").expect("GROUP BY time(...)");
    let (head, tail) = select.split_at(group_by);
    match find_top_level(head, "WHERE ") {
        Some(w) => {
            let condition = head[w + "WHERE ".len()..].trim();
            format!("{}WHERE ({condition}) AND {time} {tail}", &head[..w])
        }
        None => format!("{} WHERE {time} {tail}", head.trim_end()),
    }
}
