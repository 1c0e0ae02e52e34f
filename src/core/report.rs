//! Reports, the nginx-free part: the report API's parameters, the InfluxQL statements made from
//! them, and the answers made from InfluxDB's JSON.
//!
//! No statement text ever comes from the client. Every statement is one of the fixed templates
//! below; every parameter is validated first (the domain with the beacon's domain rules, the
//! page with the beacon's page rules, times parsed, names enumerated), and the two values that
//! reach a statement as string literals (domain and page) are escaped for InfluxQL as a second
//! line of defence. Measurement names come from the configuration (already validated), the
//! times are integers. Every statement is a single `SELECT` or `SHOW`.
//!
//! Two sources: the raw points (exact), and, for ranges longer than two days without `page=`,
//! the daily rollups of `nginx-conf/influxdb/rollups.influxql` when a probe finds them (whole
//! UTC days, visits summed per day, the median as the weighted median of daily medians; the
//! README's "Reports from the rollups").

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::beacon::{normalize_domain, MAX_PAGE_LEN};
use super::line_protocol::{sanitize_tag_value, SessionStorage};
use super::policy::{DomainPattern, Measurements};

/// Longest accepted raw (still percent-encoded) parameter value, in bytes.
pub const MAX_PARAM_LEN: usize = 2048;
/// Longest range `from`/`to` may span.
pub const MAX_RANGE_MS: i64 = 400 * DAY_MS;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 1000;
/// Most notes shown per event.
pub const NOTES_PER_EVENT: usize = 5;
/// Most raw notes read to find the top notes of a period (the rest are not counted).
pub const MAX_NOTES_READ: usize = 100_000;
/// Span of the `realtime` report.
pub const REALTIME_MS: i64 = 5 * 60 * 1000;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The reports the API answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Domains with data.
    Domains,
    /// Page views, visits, events and the median load time, with the previous period.
    Summary,
    /// Page views and visits per hour or day.
    Timeseries,
    /// Page views and visits per page.
    Pages,
    /// Page views and visits per referrer host.
    Referrers,
    /// Page views and visits per platform.
    Platforms,
    /// Page views and visits per timezone offset.
    Timezones,
    /// Events with count, value sum and top notes.
    Events,
    /// Visits and page views over the last five minutes.
    Realtime,
}

impl Report {
    fn parse(name: &str) -> Option<Report> {
        Some(match name {
            "domains" => Report::Domains,
            "summary" => Report::Summary,
            "timeseries" => Report::Timeseries,
            "pages" => Report::Pages,
            "referrers" => Report::Referrers,
            "platforms" => Report::Platforms,
            "timezones" => Report::Timezones,
            "events" => Report::Events,
            "realtime" => Report::Realtime,
            _ => return None,
        })
    }

    /// The tag a table report groups page views by.
    fn group_tag(self) -> Option<&'static str> {
        match self {
            Report::Pages => Some("page"),
            Report::Referrers => Some("referrer"),
            Report::Platforms => Some("platform"),
            Report::Timezones => Some("timezone"),
            _ => None,
        }
    }

    fn is_table(self) -> bool {
        self.group_tag().is_some() || self == Report::Events
    }
}

/// Answer format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `text/csv` (table reports only).
    Csv,
}

/// A half-open time range `[from, to)` in Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    /// Start, inclusive.
    pub from_ms: i64,
    /// End, exclusive.
    pub to_ms: i64,
}

impl TimeRange {
    /// The range of the same length right before this one.
    pub fn previous(&self) -> TimeRange {
        TimeRange {
            from_ms: self.from_ms - (self.to_ms - self.from_ms),
            to_ms: self.from_ms,
        }
    }

    fn condition(&self) -> String {
        format!(
            "time >= {} AND time < {}",
            self.from_ms.saturating_mul(1_000_000),
            self.to_ms.saturating_mul(1_000_000)
        )
    }
}

/// A validated report request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportQuery {
    /// Which report.
    pub report: Report,
    /// The domain reported on (`None` only for `domains`).
    pub domain: Option<String>,
    /// The period.
    pub range: TimeRange,
    /// Most rows of a table report.
    pub limit: usize,
    /// Answer format.
    pub format: Format,
    /// Only this page (as stored).
    pub page: Option<String>,
}

/// A parameter the report API refuses (answered 400 with the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError(pub String);

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(param: &str, why: &str) -> ParamError {
    ParamError(format!("`{param}` {why}"))
}

/// Parses the query string of a report request at time `now_ms`. Unknown parameters are
/// ignored (cache busters); a known one given twice, an empty or overlong value, invalid UTF-8
/// or a control character is refused, naming the parameter.
pub fn parse_report_query(args: &[u8], now_ms: i64) -> Result<ReportQuery, ParamError> {
    const KNOWN: [&str; 8] = [
        "report", "domain", "period", "from", "to", "limit", "format", "page",
    ];
    let mut values: HashMap<&'static str, String> = HashMap::new();
    for raw in args.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let raw_key = raw.split(|b| *b == b'=').next().unwrap_or_default();
        let Some(&name) = KNOWN.iter().find(|k| k.as_bytes() == raw_key) else {
            continue;
        };
        if raw.len() > MAX_PARAM_LEN {
            return Err(bad(name, "is too long"));
        }
        let value_raw = raw.get(raw_key.len() + 1..).unwrap_or_default();
        // A form value: `+` is a space, then percent-decoding; the result must be UTF-8.
        let plus_as_space: Vec<u8> = value_raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let value = String::from_utf8(percent_encoding::percent_decode(&plus_as_space).collect())
            .map_err(|_| bad(name, "is not UTF-8"))?;
        if value.chars().any(char::is_control) {
            return Err(bad(name, "has a control character"));
        }
        if values.insert(name, value).is_some() {
            return Err(bad(name, "is given twice"));
        }
    }

    let report_name = values
        .get("report")
        .ok_or_else(|| bad("report", "is missing"))?;
    let report = Report::parse(report_name).ok_or_else(|| {
        bad(
            "report",
            "must be one of domains, summary, timeseries, pages, referrers, platforms, \
             timezones, events, realtime",
        )
    })?;

    let domain = match (values.get("domain"), report) {
        (None, Report::Domains) => None,
        (None, _) => return Err(bad("domain", "is missing")),
        (Some(d), _) => Some(
            normalize_domain(d.as_str().into())
                .map(Cow::into_owned)
                .ok_or_else(|| {
                    bad(
                        "domain",
                        "must be a host name: letters, digits, '.' and '-'",
                    )
                })?,
        ),
    };

    let range = match (values.get("period"), values.get("from"), values.get("to")) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(bad("period", "cannot be combined with `from`/`to`"))
        }
        (Some(period), None, None) => period_range(period, now_ms)?,
        (None, None, None) => period_range("7d", now_ms)?,
        (None, Some(from), Some(to)) => {
            let from_ms = parse_rfc3339_utc(from)
                .ok_or_else(|| bad("from", "must be a UTC time like 2026-11-01T00:00:00Z"))?;
            let to_ms = parse_rfc3339_utc(to)
                .ok_or_else(|| bad("to", "must be a UTC time like 2026-11-01T00:00:00Z"))?;
            if from_ms >= to_ms {
                return Err(bad("from", "must be before `to`"));
            }
            if to_ms - from_ms > MAX_RANGE_MS {
                return Err(bad("to", "must be at most 400 days after `from`"));
            }
            TimeRange { from_ms, to_ms }
        }
        (None, Some(_), None) => return Err(bad("to", "is missing")),
        (None, None, Some(_)) => return Err(bad("from", "is missing")),
    };
    let range = match report {
        Report::Realtime => TimeRange {
            from_ms: now_ms - REALTIME_MS,
            to_ms: now_ms + 1,
        },
        _ => range,
    };

    let limit = match values.get("limit") {
        None => 10,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad("limit", "must be a number from 1 to 1000"))?,
    };

    let format = match values.get("format").map(String::as_str) {
        None | Some("json") => Format::Json,
        Some("csv") if report.is_table() => Format::Csv,
        Some("csv") => {
            return Err(bad(
                "format",
                "csv is only for pages, referrers, platforms, timezones and events",
            ))
        }
        Some(_) => return Err(bad("format", "must be json or csv")),
    };

    let page = match values.get("page") {
        None => None,
        Some(page) => {
            if !page.starts_with('/') || page.contains(['?', '#']) || page.len() > MAX_PAGE_LEN {
                return Err(bad(
                    "page",
                    "must be a path starting with '/', without query or fragment, at most \
                     1024 bytes",
                ));
            }
            Some(sanitize_tag_value(page))
        }
    };

    Ok(ReportQuery {
        report,
        domain,
        range,
        limit,
        format,
        page,
    })
}

fn period_range(period: &str, now_ms: i64) -> Result<TimeRange, ParamError> {
    let from_ms = match period {
        "today" => now_ms - now_ms.rem_euclid(DAY_MS),
        "24h" => now_ms - DAY_MS,
        "7d" => now_ms - 7 * DAY_MS,
        "30d" => now_ms - 30 * DAY_MS,
        "90d" => now_ms - 90 * DAY_MS,
        _ => return Err(bad("period", "must be one of today, 24h, 7d, 30d, 90d")),
    };
    Ok(TimeRange {
        from_ms,
        to_ms: now_ms + 1,
    })
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)` into Unix milliseconds (UTC only).
pub fn parse_rfc3339_utc(text: &str) -> Option<i64> {
    let (main, rest) = text.split_at_checked(19)?;
    let b = main.as_bytes();
    let shape_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't')
        && b[13] == b':'
        && b[16] == b':';
    if !shape_ok {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = main.get(range)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let (fraction, zone) = match rest.strip_prefix('.') {
        Some(after) => {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            (&after[..digits], &after[digits..])
        }
        None => ("", rest),
    };
    if !matches!(zone, "Z" | "z" | "+00:00") {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let millis = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0'));
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats Unix milliseconds as RFC 3339 UTC (`2026-11-01T00:00:00Z`, seconds precision).
pub fn format_rfc3339_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let in_day = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// `'value'` as an InfluxQL string literal. Callers validate first (no control characters, so
/// no newline); `\` and `'` are escaped as InfluxQL's own `QuoteString` does.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `"name"` as an InfluxQL identifier (measurement names are validated by the configuration:
/// `[A-Za-z0-9_.-]`, so only quoting is needed; `\` and `"` are escaped all the same).
fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Where a report's numbers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The raw points: exact.
    Raw,
    /// The daily rollups of `nginx-conf/influxdb/rollups.influxql`, for the whole UTC days the
    /// range touches (see [`rollups_apply`]).
    Rollups,
}

/// The retention policy the rollups are written to.
pub const ROLLUP_POLICY: &str = "rollups";

/// Whether `query` is answered from the daily rollups when they exist: the reports of a range
/// longer than two days (the time series then has one point per day), not narrowed to one
/// page (the rollups group by one tag at a time). `realtime` and `domains` always read the raw
/// points, and so does everything of two days or less.
pub fn rollups_apply(query: &ReportQuery) -> bool {
    query.page.is_none()
        && interval_ms(&query.range) == DAY_MS
        && matches!(
            query.report,
            Report::Summary
                | Report::Timeseries
                | Report::Pages
                | Report::Referrers
                | Report::Platforms
                | Report::Timezones
                | Report::Events
        )
}

/// The rollup measurements (in [`ROLLUP_POLICY`]) that `report` reads.
pub fn rollup_measurements(report: Report, measurements: &Measurements) -> Vec<String> {
    let pv = |by: &str| format!("{}_{by}_1d", measurements.page_view);
    let ev = format!("{}_1d", measurements.event);
    match report {
        Report::Summary => vec![pv("domain"), ev],
        Report::Timeseries => vec![pv("domain")],
        Report::Events => vec![ev, format!("{}_note", measurements.event)],
        other => other.group_tag().map(pv).into_iter().collect(),
    }
}

/// The statement whose answer tells whether the rollups `query` reads exist: one `SHOW
/// MEASUREMENTS` matching exactly their names (a few milliseconds).
pub fn rollup_probe(query: &ReportQuery, measurements: &Measurements) -> String {
    let names: Vec<String> = rollup_measurements(query.report, measurements)
        .iter()
        .map(|name| regex_escape(name))
        .collect();
    format!(
        "SHOW MEASUREMENTS WITH MEASUREMENT =~ /^({})$/",
        names.join("|")
    )
}

/// `name` as an exact regular expression: measurement names are `[A-Za-z0-9_.-]` (validated by
/// the configuration); anything but a letter, digit or `_` is escaped, and a `/` (which would end
/// the InfluxQL regex) or a non-ASCII character cannot be expressed and never matches.
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            '.' | '-' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                out.push('\\');
                out.push(c);
            }
            _ => return "[^\\s\\S]".to_string(),
        }
    }
    out
}

/// Whether the answer to [`rollup_probe`] lists every rollup measurement `query` reads.
pub fn rollups_found(
    query: &ReportQuery,
    measurements: &Measurements,
    answer: &[u8],
) -> Result<bool, QueryError> {
    let names: Vec<String> = series_of(answer)?
        .iter()
        .flat_map(|s| s.rows.iter())
        .filter_map(|row| row.get("name").and_then(Value::as_str))
        .map(str::to_string)
        .collect();
    Ok(rollup_measurements(query.report, measurements)
        .iter()
        .all(|wanted| names.contains(wanted)))
}

/// `range` widened to whole UTC days: the start back to 00:00, the end on to the next 00:00.
pub fn whole_days(range: &TimeRange) -> TimeRange {
    let from_ms = range.from_ms - range.from_ms.rem_euclid(DAY_MS);
    let past = range.to_ms.rem_euclid(DAY_MS);
    let to_ms = if past == 0 {
        range.to_ms
    } else {
        range.to_ms + (DAY_MS - past)
    };
    TimeRange { from_ms, to_ms }
}

/// The InfluxQL statements that answer `query` from `source`, in order; each is one `SELECT`
/// or `SHOW`.
pub fn statements(
    query: &ReportQuery,
    measurements: &Measurements,
    visits: SessionStorage,
    source: Source,
) -> Vec<String> {
    match source {
        Source::Rollups if rollups_apply(query) => rollup_statements(query, measurements, visits),
        _ => raw_statements(query, measurements, visits),
    }
}

/// The statements of `query` over the daily rollups, for the whole UTC days of its range.
fn rollup_statements(
    query: &ReportQuery,
    measurements: &Measurements,
    visits: SessionStorage,
) -> Vec<String> {
    let days = whole_days(&query.range);
    let policy = quote_ident(ROLLUP_POLICY);
    let rollup = |name: String| format!("{policy}.{}", quote_ident(&name));
    let filter = |range: &TimeRange| {
        let mut cond = String::new();
        if let Some(domain) = &query.domain {
            let _ = write!(cond, "\"domain\" = {} AND ", quote_literal(domain));
        }
        cond.push_str(&range.condition());
        cond
    };
    let pv = |by: &str| rollup(format!("{}_{by}_1d", measurements.page_view));
    let ev = rollup(format!("{}_1d", measurements.event));
    match query.report {
        Report::Summary => {
            // Both periods in one statement each; the answer splits the days at `from`.
            let both = TimeRange {
                from_ms: days.previous().from_ms,
                to_ms: days.to_ms,
            };
            vec![
                format!(
                    "SELECT \"pageviews\", \"visits\", \"load_time_median\", \
                     \"load_time_count\" FROM {} WHERE {}",
                    pv("domain"),
                    filter(&both)
                ),
                format!("SELECT \"events\" FROM {ev} WHERE {}", filter(&both)),
            ]
        }
        Report::Timeseries => vec![format!(
            "SELECT \"pageviews\", \"visits\" FROM {} WHERE {}",
            pv("domain"),
            filter(&days)
        )],
        Report::Pages | Report::Referrers | Report::Platforms | Report::Timezones => {
            let tag = query.report.group_tag().unwrap_or("page");
            vec![format!(
                "SELECT sum(\"pageviews\") AS \"pageviews\", sum(\"visits\") AS \"visits\" \
                 FROM {} WHERE {} GROUP BY \"{tag}\"",
                pv(tag),
                filter(&days)
            )]
        }
        Report::Events => vec![
            format!(
                "SELECT sum(\"events\") AS \"count\", sum(\"value_sum\") AS \"value_sum\" \
                 FROM {ev} WHERE {} GROUP BY \"event\"",
                filter(&days)
            ),
            // Notes are a field, which no rollup can group by: they come from the copy of
            // every event's note, tagged by site and event only (as from the raw points).
            format!(
                "SELECT \"note\" FROM {} WHERE {} AND \"note\" != '' GROUP BY \"event\" \
                 LIMIT {MAX_NOTES_READ}",
                rollup(format!("{}_note", measurements.event)),
                filter(&days)
            ),
        ],
        Report::Domains | Report::Realtime => raw_statements(query, measurements, visits),
    }
}

/// The statements of `query` over the raw points.
fn raw_statements(
    query: &ReportQuery,
    measurements: &Measurements,
    visits: SessionStorage,
) -> Vec<String> {
    let pv = quote_ident(&measurements.page_view);
    let ev = quote_ident(&measurements.event);
    let filter = |range: &TimeRange| {
        let mut cond = String::new();
        if let Some(domain) = &query.domain {
            let _ = write!(cond, "\"domain\" = {} AND ", quote_literal(domain));
        }
        if let Some(page) = &query.page {
            let _ = write!(cond, "\"page\" = {} AND ", quote_literal(page));
        }
        cond.push_str(&range.condition());
        cond
    };
    // Page views and visits of page-view points matching `cond`, grouped by `group`.
    let views = |cond: &str, group: &str, extra: &str| -> String {
        let group_by = if group.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {group}")
        };
        match visits {
            SessionStorage::Field => format!(
                "SELECT count(\"counter\") AS \"pageviews\", count(distinct(\"sess\")) AS \
                 \"visits\"{extra} FROM {pv} WHERE {cond}{group_by}"
            ),
            // A tag cannot be counted distinct directly; a subquery turns it into a field.
            SessionStorage::Tag => format!(
                "SELECT count(\"counter\") AS \"pageviews\", count(distinct(\"s\")) AS \
                 \"visits\"{extra} FROM (SELECT \"counter\", \"sess\"::tag AS \"s\"{inner} FROM \
                 {pv} WHERE {cond} GROUP BY *){group_by}",
                inner = if extra.is_empty() {
                    ""
                } else {
                    ", \"load_time\""
                }
            ),
            SessionStorage::Off => format!(
                "SELECT count(\"counter\") AS \"pageviews\"{extra} FROM {pv} WHERE {cond}{group_by}"
            ),
        }
    };
    let range = &query.range;
    match query.report {
        Report::Domains => vec![format!("SHOW TAG VALUES FROM {pv} WITH KEY = \"domain\"")],
        Report::Summary => {
            let median = ", median(\"load_time\") AS \"load_time_ms_median\"";
            let events = |r: &TimeRange| {
                format!(
                    "SELECT count(\"counter\") AS \"events\" FROM {ev} WHERE {}",
                    filter(r)
                )
            };
            vec![
                views(&filter(range), "", median),
                events(range),
                views(&filter(&range.previous()), "", median),
                events(&range.previous()),
            ]
        }
        Report::Timeseries => {
            let interval = interval_ms(range);
            let unit = if interval == HOUR_MS { "1h" } else { "1d" };
            vec![views(&filter(range), &format!("time({unit}) fill(0)"), "")]
        }
        Report::Pages | Report::Referrers | Report::Platforms | Report::Timezones => {
            let tag = query.report.group_tag().unwrap_or("page");
            vec![views(&filter(range), &format!("\"{tag}\""), "")]
        }
        Report::Events => vec![
            format!(
                "SELECT count(\"counter\") AS \"count\", sum(\"value\") AS \"value_sum\" FROM {ev} \
                 WHERE {} GROUP BY \"event\"",
                filter(range)
            ),
            format!(
                "SELECT \"note\" FROM {ev} WHERE {} AND \"note\" != '' GROUP BY \"event\" \
                 LIMIT {MAX_NOTES_READ}",
                filter(range)
            ),
        ],
        Report::Realtime => vec![views(&filter(range), "", "")],
    }
}

/// The time series interval for a range: one hour up to two days, one day beyond.
pub fn interval_ms(range: &TimeRange) -> i64 {
    if range.to_ms - range.from_ms <= 2 * DAY_MS {
        HOUR_MS
    } else {
        DAY_MS
    }
}

/// A failed query, answered 502.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError(pub String);

/// One series of a statement's result: its tags and its rows as column → value.
#[derive(Debug, Default)]
struct Series {
    tags: Map<String, Value>,
    rows: Vec<Map<String, Value>>,
}

/// The series of the single statement in one InfluxDB `/query` answer.
fn series_of(answer: &[u8]) -> Result<Vec<Series>, QueryError> {
    let json: Value = serde_json::from_slice(answer)
        .map_err(|_| QueryError("InfluxDB's answer is not JSON".to_string()))?;
    if let Some(error) = json.get("error").and_then(Value::as_str) {
        return Err(QueryError(format!("InfluxDB: {error}")));
    }
    let result = &json["results"][0];
    if let Some(error) = result.get("error").and_then(Value::as_str) {
        return Err(QueryError(format!("InfluxDB: {error}")));
    }
    if !result.is_object() {
        return Err(QueryError("InfluxDB's answer has no result".to_string()));
    }
    let mut all = Vec::new();
    for series in result["series"].as_array().into_iter().flatten() {
        let columns: Vec<&str> = series["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut out = Series {
            tags: series["tags"].as_object().cloned().unwrap_or_default(),
            rows: Vec::new(),
        };
        for values in series["values"].as_array().into_iter().flatten() {
            let row = columns
                .iter()
                .zip(values.as_array().into_iter().flatten())
                .map(|(c, v)| ((*c).to_string(), v.clone()))
                .collect();
            out.rows.push(row);
        }
        all.push(out);
    }
    Ok(all)
}

fn count(row: Option<&Map<String, Value>>, column: &str) -> u64 {
    row.and_then(|r| r.get(column))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Visits as JSON: `null` when sessions are not stored.
fn visits_value(row: Option<&Map<String, Value>>, visits: SessionStorage) -> Value {
    match visits {
        SessionStorage::Off => Value::Null,
        _ => json!(count(row, "visits")),
    }
}

/// An event row: name, count, value sum, top notes.
type EventRow = (String, u64, Value, Vec<(String, u64)>);

/// A report's answer body and its content type.
#[derive(Debug)]
pub struct Answer {
    /// `application/json` or `text/csv`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

/// Builds the answer of `query` from the InfluxDB answers to its [`statements`] from `source`,
/// in order. `domains` filters the `domains` report (the location's `analytics_domains`).
pub fn answer(
    query: &ReportQuery,
    visits: SessionStorage,
    domains: Option<&[DomainPattern]>,
    source: Source,
    answers: &[Vec<u8>],
) -> Result<Answer, QueryError> {
    if source == Source::Rollups && rollups_apply(query) {
        let mut days = query.clone();
        days.range = whole_days(&query.range);
        if query.report == Report::Summary {
            return rollup_summary(&days, visits, answers);
        }
        // The other rollup statements answer in the shape of the raw ones.
        return raw_answer(&days, visits, domains, answers);
    }
    raw_answer(query, visits, domains, answers)
}

/// The `summary` of `days` (whole UTC days) from the daily rollup rows of both periods.
fn rollup_summary(
    days: &ReportQuery,
    visits: SessionStorage,
    answers: &[Vec<u8>],
) -> Result<Answer, QueryError> {
    let [views, events] = answers else {
        return Err(QueryError(
            "the rollup summary needs two answers".to_string(),
        ));
    };
    let views = series_of(views)?;
    let events = series_of(events)?;
    let from = days.range.from_ms;
    let current = |row: &Map<String, Value>| row.get("time").and_then(Value::as_i64) >= Some(from);
    let period = |now: bool| {
        let rows: Vec<&Map<String, Value>> = views
            .iter()
            .flat_map(|s| s.rows.iter())
            .filter(|r| current(r) == now)
            .collect();
        let sum = |column: &str| -> u64 { rows.iter().map(|r| count(Some(r), column)).sum() };
        let medians: Vec<(f64, u64)> = rows
            .iter()
            .filter_map(|r| {
                let median = r.get("load_time_median").and_then(Value::as_f64)?;
                let n = count(Some(r), "load_time_count");
                (n > 0).then_some((median, n))
            })
            .collect();
        let events: u64 = events
            .iter()
            .flat_map(|s| s.rows.iter())
            .filter(|r| current(r) == now)
            .map(|r| count(Some(r), "events"))
            .sum();
        json!({
            "pageviews": sum("pageviews"),
            "visits": match visits {
                SessionStorage::Off => Value::Null,
                _ => json!(sum("visits")),
            },
            "events": events,
            "load_time_ms_median": weighted_median(medians).map_or(Value::Null, |m| json!(m)),
        })
    };
    let mut json = period(true);
    json["previous"] = period(false);
    Ok(Answer {
        content_type: "application/json",
        body: json.to_string().into_bytes(),
    })
}

/// The median of several days' load times from each day's median and number of load times: the
/// count-weighted median of the daily medians (the median of one day is exact; over several
/// days it approximates the median of all load times, see the README). When the weights split
/// exactly in half, the mean of the two middle medians, as for an even number of values.
pub fn weighted_median(mut days: Vec<(f64, u64)>) -> Option<f64> {
    days.retain(|(m, n)| *n > 0 && m.is_finite());
    days.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = days.iter().map(|d| d.1).sum();
    let mut below = 0u64;
    for (i, (median, n)) in days.iter().enumerate() {
        below += n;
        if below * 2 > total {
            return Some(*median);
        }
        if below * 2 == total {
            return Some(
                days.get(i + 1)
                    .map_or(*median, |next| (median + next.0) / 2.0),
            );
        }
    }
    None
}

/// Builds the answer of `query` from the answers to its raw statements (or rollup statements
/// shaped like them).
fn raw_answer(
    query: &ReportQuery,
    visits: SessionStorage,
    domains: Option<&[DomainPattern]>,
    answers: &[Vec<u8>],
) -> Result<Answer, QueryError> {
    let mut results = Vec::with_capacity(answers.len());
    for body in answers {
        results.push(series_of(body)?);
    }
    let first_row =
        |i: usize| -> Option<&Map<String, Value>> { results.get(i)?.first()?.rows.first() };
    let json = match query.report {
        Report::Domains => {
            let mut names: Vec<String> = results
                .first()
                .into_iter()
                .flatten()
                .flat_map(|s| s.rows.iter())
                .filter_map(|row| row.get("value").and_then(Value::as_str))
                .filter(|d| domains.is_none_or(|p| p.iter().any(|p| p.matches(d))))
                .map(str::to_string)
                .collect();
            names.sort();
            names.dedup();
            json!({ "domains": names })
        }
        Report::Summary => {
            let period = |views: usize, events: usize| {
                let median = first_row(views)
                    .and_then(|r| r.get("load_time_ms_median"))
                    .and_then(Value::as_f64)
                    .map_or(Value::Null, |x| json!(x));
                json!({
                    "pageviews": count(first_row(views), "pageviews"),
                    "visits": visits_value(first_row(views), visits),
                    "events": count(first_row(events), "events"),
                    "load_time_ms_median": median,
                })
            };
            let mut current = period(0, 1);
            current["previous"] = period(2, 3);
            current
        }
        Report::Timeseries => {
            let step = interval_ms(&query.range);
            let mut by_time: HashMap<i64, &Map<String, Value>> = HashMap::new();
            for row in results.first().into_iter().flatten().flat_map(|s| &s.rows) {
                if let Some(t) = row.get("time").and_then(Value::as_i64) {
                    by_time.insert(t, row);
                }
            }
            // Every interval of the range, zeros included, aligned as InfluxDB aligns them.
            let mut points = Vec::new();
            let mut t = query.range.from_ms - query.range.from_ms.rem_euclid(step);
            while t < query.range.to_ms {
                let row = by_time.get(&t).copied();
                points.push(json!({
                    "time": format_rfc3339_utc(t),
                    "pageviews": count(row, "pageviews"),
                    "visits": visits_value(row, visits),
                }));
                t += step;
            }
            let unit = if step == HOUR_MS { "1h" } else { "1d" };
            json!({ "interval": unit, "points": points })
        }
        Report::Pages | Report::Referrers | Report::Platforms | Report::Timezones => {
            let tag = query.report.group_tag().unwrap_or("page");
            let mut rows: Vec<(String, u64, Value)> = results
                .first()
                .into_iter()
                .flatten()
                .filter_map(|s| {
                    let key = s.tags.get(tag).and_then(Value::as_str).unwrap_or_default();
                    let row = s.rows.first();
                    let pageviews = count(row, "pageviews");
                    (!key.is_empty() && pageviews > 0)
                        .then(|| (key.to_string(), pageviews, visits_value(row, visits)))
                })
                .collect();
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            rows.truncate(query.limit);
            if query.format == Format::Csv {
                let mut csv = String::from("key,pageviews,visits\r\n");
                for (key, pageviews, visits) in &rows {
                    let visits = visits.as_u64().map(|v| v.to_string()).unwrap_or_default();
                    let _ = write!(csv, "{},{pageviews},{visits}\r\n", csv_field(key));
                }
                return Ok(csv_answer(csv));
            }
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|(key, pageviews, visits)| {
                    json!({"key": key, "pageviews": pageviews, "visits": visits})
                })
                .collect();
            json!({ "rows": rows })
        }
        Report::Events => {
            let mut notes: HashMap<String, HashMap<String, u64>> = HashMap::new();
            for series in results.get(1).into_iter().flatten() {
                let event = series
                    .tags
                    .get("event")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let counts = notes.entry(event.to_string()).or_default();
                for row in &series.rows {
                    if let Some(note) = row.get("note").and_then(Value::as_str) {
                        *counts.entry(note.to_string()).or_default() += 1;
                    }
                }
            }
            let mut rows: Vec<EventRow> = results
                .first()
                .into_iter()
                .flatten()
                .filter_map(|s| {
                    let event = s
                        .tags
                        .get("event")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let row = s.rows.first();
                    let n = count(row, "count");
                    let sum = row
                        .and_then(|r| r.get("value_sum"))
                        .and_then(Value::as_f64)
                        .map_or(Value::Null, |x| json!(x));
                    let mut top: Vec<(String, u64)> = notes
                        .remove(event)
                        .unwrap_or_default()
                        .into_iter()
                        .collect();
                    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                    top.truncate(NOTES_PER_EVENT);
                    (!event.is_empty() && n > 0).then(|| (event.to_string(), n, sum, top))
                })
                .collect();
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            rows.truncate(query.limit);
            if query.format == Format::Csv {
                let mut csv = String::from("event,count,value_sum\r\n");
                for (event, n, sum, _) in &rows {
                    let sum = sum.as_f64().map(|s| s.to_string()).unwrap_or_default();
                    let _ = write!(csv, "{},{n},{sum}\r\n", csv_field(event));
                }
                return Ok(csv_answer(csv));
            }
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|(event, n, sum, top)| {
                    let notes: Vec<Value> = top
                        .into_iter()
                        .map(|(note, count)| json!({"note": note, "count": count}))
                        .collect();
                    json!({"event": event, "count": n, "value_sum": sum, "notes": notes})
                })
                .collect();
            json!({ "rows": rows })
        }
        Report::Realtime => json!({
            "visits": visits_value(first_row(0), visits),
            "pageviews": count(first_row(0), "pageviews"),
        }),
    };
    Ok(Answer {
        content_type: "application/json",
        body: json.to_string().into_bytes(),
    })
}

fn csv_answer(csv: String) -> Answer {
    Answer {
        content_type: "text/csv; charset=utf-8",
        body: csv.into_bytes(),
    }
}

/// One CSV field: quoted when it holds a separator, quote or line break; a leading `=`, `+`,
/// `-`, `@`, tab or CR is prefixed with `'` so a spreadsheet does not run it as a formula
/// (a plain number such as a timezone offset `-60` is left as it is).
pub fn csv_field(value: &str) -> String {
    let number = value.parse::<i64>().is_ok();
    let guarded = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) && !number {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if guarded.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

/// The JSON error body `{"error": message}`.
pub fn error_body(message: &str) -> Vec<u8> {
    json!({ "error": message }).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000_000; // 2026-11-30T...Z

    fn parse(args: &str) -> Result<ReportQuery, ParamError> {
        parse_report_query(args.as_bytes(), NOW)
    }

    fn refusal(args: &str) -> String {
        parse(args).expect_err(args).0
    }

    #[test]
    fn rfc3339_times_round_trip() {
        for (text, ms) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-11-01T00:00:00Z", 1_793_491_200_000),
            ("2024-02-29T23:59:59.999Z", 1_709_251_199_999),
            ("2000-03-01T12:30:00+00:00", 951_913_800_000),
        ] {
            assert_eq!(parse_rfc3339_utc(text), Some(ms), "{text}");
        }
        assert_eq!(
            format_rfc3339_utc(1_793_491_200_000),
            "2026-11-01T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339_utc(1_709_251_199_999),
            "2024-02-29T23:59:59Z"
        );
        for bad in [
            "2026-11-01",
            "2026-11-01T00:00:00",
            "2026-11-01T00:00:00+01:00",
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-01T24:00:00Z",
            "2026-11-01T00:00:00.Z",
            "2026-11-01 00:00:00Z",
            "+026-11-01T00:00:00Z",
            "2026-11-01T00:00:00Z; DROP",
            "１９７０-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
        for day in (0..200_000).step_by(997) {
            let ms = day * DAY_MS + 12_345_000;
            assert_eq!(parse_rfc3339_utc(&format_rfc3339_utc(ms)), Some(ms));
        }
    }

    #[test]
    fn periods_and_ranges() {
        let q = parse("report=summary&domain=Example.COM&period=7d").unwrap();
        assert_eq!(q.domain.as_deref(), Some("example.com"));
        assert_eq!(q.range.to_ms - q.range.from_ms, 7 * DAY_MS + 1);
        let today = parse("report=summary&domain=a.b&period=today").unwrap();
        assert_eq!(today.range.from_ms % DAY_MS, 0);
        assert!(today.range.from_ms <= NOW && NOW - today.range.from_ms < DAY_MS);
        let custom =
            parse("report=pages&domain=a.b&from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z")
                .unwrap();
        assert_eq!(custom.range.to_ms - custom.range.from_ms, DAY_MS);
        assert_eq!(custom.range.previous().to_ms, custom.range.from_ms);
        let realtime = parse("report=realtime&domain=a.b").unwrap();
        assert_eq!(
            realtime.range.to_ms - realtime.range.from_ms,
            REALTIME_MS + 1
        );
        assert_eq!(parse("report=domains").unwrap().domain, None);
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        for (args, param) in [
            ("", "`report`"),
            ("report=DROP", "`report`"),
            ("report=pages", "`domain`"),
            ("report=pages&domain=a'b", "`domain`"),
            ("report=pages&domain=a%0Ab", "`domain`"),
            ("report=pages&domain=a.b&period=1y", "`period`"),
            (
                "report=pages&domain=a.b&period=7d&from=2026-11-01T00:00:00Z",
                "`period`",
            ),
            ("report=pages&domain=a.b&from=2026-11-01T00:00:00Z", "`to`"),
            (
                "report=pages&domain=a.b&from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
                "`from`",
            ),
            (
                "report=pages&domain=a.b&from=2024-01-01T00:00:00Z&to=2026-11-01T00:00:00Z",
                "`to`",
            ),
            (
                "report=pages&domain=a.b&from=now()&to=2026-11-01T00:00:00Z",
                "`from`",
            ),
            ("report=pages&domain=a.b&limit=0", "`limit`"),
            ("report=pages&domain=a.b&limit=1001", "`limit`"),
            ("report=pages&domain=a.b&limit=-1", "`limit`"),
            ("report=pages&domain=a.b&format=xml", "`format`"),
            ("report=summary&domain=a.b&format=csv", "`format`"),
            ("report=pages&domain=a.b&page=x", "`page`"),
            ("report=pages&domain=a.b&page=/a?b=1", "`page`"),
            ("report=pages&domain=a.b&page=/a%00", "`page`"),
            ("report=pages&domain=a.b&page=/a%0D%0A", "`page`"),
            ("report=pages&domain=a.b&page=/%FF", "`page`"),
            ("report=pages&report=pages&domain=a.b", "`report`"),
            ("report=pages&domain=a.b&domain=c.d", "`domain`"),
        ] {
            let message = refusal(args);
            assert!(message.starts_with(param), "{args}: {message}");
        }
        let long = format!("report=pages&domain=a.b&page=/{}", "a".repeat(10_000));
        assert!(refusal(&long).starts_with("`page`"));
        assert!(
            parse("report=pages&domain=a.b&_=12345&utm=x").is_ok(),
            "unknown ignored"
        );
    }

    #[test]
    fn statements_are_single_selects_with_escaped_literals() {
        let hostile = [
            "/a'b",
            "/a\\'; DROP DATABASE analytics; --",
            "/x\\",
            "/é/ü/中",
            "/a/*",
            "/(.*)/",
        ];
        for page in hostile {
            let args = format!(
                "report=pages&domain=a.b&page={}",
                form_urlencoded::byte_serialize(page.as_bytes()).collect::<String>()
            );
            let query = parse(&args).unwrap();
            for visits in [
                SessionStorage::Field,
                SessionStorage::Tag,
                SessionStorage::Off,
            ] {
                for statement in statements(&query, &Measurements::default(), visits, Source::Raw) {
                    assert!(statement.starts_with("SELECT "), "{statement}");
                    assert!(
                        !statement.contains(';') || page.contains(';'),
                        "{statement}"
                    );
                    let literal = quote_literal(query.page.as_deref().unwrap());
                    assert!(statement.contains(&literal), "{statement}");
                    assert_eq!(
                        unquote_literal(&literal),
                        query.page.clone(),
                        "the literal reads back as the page"
                    );
                }
            }
        }
    }

    /// InfluxQL's reading of a string literal (scanner.go ScanString), to check the quoting.
    fn unquote_literal(literal: &str) -> Option<String> {
        let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    'n' => out.push('\n'),
                    '\\' => out.push('\\'),
                    '\'' => out.push('\''),
                    '"' => out.push('"'),
                    _ => return None,
                },
                '\'' | '\n' => return None,
                c => out.push(c),
            }
        }
        Some(out)
    }

    #[test]
    fn every_report_has_its_statements() {
        let m = Measurements::default();
        for (args, n) in [
            ("report=domains", 1),
            ("report=summary&domain=a.b", 4),
            ("report=timeseries&domain=a.b", 1),
            ("report=pages&domain=a.b", 1),
            ("report=events&domain=a.b", 2),
            ("report=realtime&domain=a.b", 1),
        ] {
            let q = parse(args).unwrap();
            let all = statements(&q, &m, SessionStorage::Field, Source::Raw);
            assert_eq!(all.len(), n, "{args}");
            for s in all {
                assert!(
                    s.starts_with("SELECT ") || s.starts_with("SHOW TAG VALUES "),
                    "{s}"
                );
                if q.domain.is_some() {
                    assert!(s.contains("\"domain\" = 'a.b'"), "{s}");
                }
            }
        }
        let ts = statements(
            &parse("report=timeseries&domain=a.b&period=24h").unwrap(),
            &m,
            SessionStorage::Field,
            Source::Raw,
        );
        assert!(ts[0].contains("GROUP BY time(1h) fill(0)"), "{}", ts[0]);
        let ts = statements(
            &parse("report=timeseries&domain=a.b&period=30d").unwrap(),
            &m,
            SessionStorage::Field,
            Source::Raw,
        );
        assert!(ts[0].contains("GROUP BY time(1d) fill(0)"), "{}", ts[0]);
    }

    #[test]
    fn rollups_answer_long_ranges_without_a_page() {
        for (args, apply) in [
            ("report=summary&domain=a.b&period=30d", true),
            ("report=timeseries&domain=a.b&period=7d", true),
            ("report=pages&domain=a.b&period=90d", true),
            ("report=events&domain=a.b&period=30d", true),
            ("report=summary&domain=a.b&period=24h", false),
            ("report=pages&domain=a.b&period=today", false),
            ("report=summary&domain=a.b&period=30d&page=/a", false),
            ("report=realtime&domain=a.b", false),
            ("report=domains&period=30d", false),
            (
                "report=pages&domain=a.b&from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z",
                false,
            ),
            (
                "report=pages&domain=a.b&from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:01Z",
                true,
            ),
        ] {
            let q = parse(args).unwrap();
            assert_eq!(rollups_apply(&q), apply, "{args}");
            let raw = statements(
                &q,
                &Measurements::default(),
                SessionStorage::Field,
                Source::Raw,
            );
            let rollups = statements(
                &q,
                &Measurements::default(),
                SessionStorage::Field,
                Source::Rollups,
            );
            assert_eq!(raw == rollups, !apply, "{args}: {rollups:?}");
        }
    }

    #[test]
    fn whole_days_widen_a_range() {
        let day = parse_rfc3339_utc("2026-11-02T00:00:00Z").unwrap();
        for (from, to, want) in [
            (day, day + DAY_MS, (day, day + DAY_MS)),
            (day + 1, day + DAY_MS - 1, (day, day + DAY_MS)),
            (day - 1, day + 1, (day - DAY_MS, day + DAY_MS)),
        ] {
            let got = whole_days(&TimeRange {
                from_ms: from,
                to_ms: to,
            });
            assert_eq!((got.from_ms, got.to_ms), want, "{from}..{to}");
        }
    }

    #[test]
    fn the_weighted_median_of_daily_medians() {
        for (days, want) in [
            (vec![], None),
            (vec![(5.0, 0)], None),
            (vec![(5.0, 3)], Some(5.0)),
            (vec![(9.0, 1), (1.0, 1), (5.0, 1)], Some(5.0)),
            (vec![(1.0, 1), (3.0, 1)], Some(2.0)),
            (vec![(1.0, 10), (100.0, 1), (50.0, 1)], Some(1.0)),
            (vec![(1.0, 2), (3.0, 1), (7.0, 1)], Some(2.0)),
            (vec![(f64::NAN, 5), (4.0, 1)], Some(4.0)),
        ] {
            assert_eq!(weighted_median(days.clone()), want, "{days:?}");
        }
    }

    #[test]
    fn rollup_statements_are_single_selects_and_the_probe_matches_names_exactly() {
        let m = Measurements {
            page_view: "pv.x-1".to_string(),
            event: "ev".to_string(),
        };
        for report in [
            "summary",
            "timeseries",
            "pages",
            "referrers",
            "platforms",
            "timezones",
            "events",
        ] {
            let q = parse(&format!("report={report}&domain=a.b&period=30d")).unwrap();
            let probe = rollup_probe(&q, &m);
            assert!(
                probe.starts_with("SHOW MEASUREMENTS WITH MEASUREMENT =~ /^(")
                    && probe.ends_with(")$/"),
                "{probe}"
            );
            assert!(!probe.contains("pv.x-1"), "escaped: {probe}");
            for s in statements(&q, &m, SessionStorage::Field, Source::Rollups) {
                assert!(s.starts_with("SELECT "), "{s}");
                assert!(!s.contains(';'), "{s}");
                assert!(s.contains("\"domain\" = 'a.b'"), "{s}");
                assert!(s.contains("FROM \"rollups\".\""), "{s}");
            }
        }
        assert_eq!(regex_escape("pv.x-1"), "pv\\.x\\-1");
        assert_eq!(regex_escape("a/b"), "[^\\s\\S]");
        let q = parse("report=summary&domain=a.b&period=30d").unwrap();
        let listed = |names: &[&str]| {
            let values: Vec<String> = names.iter().map(|n| format!("[\"{n}\"]")).collect();
            influx(&format!(
                r#","series":[{{"name":"measurements","columns":["name"],"values":[{}]}}]"#,
                values.join(",")
            ))
        };
        let d = Measurements::default();
        let both = listed(&["pf_analytics_domain_1d", "pf_analytics_event_1d"]);
        assert_eq!(rollups_found(&q, &d, &both), Ok(true));
        let one = listed(&["pf_analytics_domain_1d"]);
        assert_eq!(rollups_found(&q, &d, &one), Ok(false));
        assert_eq!(rollups_found(&q, &d, &influx("")), Ok(false));
        assert!(rollups_found(&q, &d, b"{}").is_err());
    }

    #[test]
    fn the_rollup_summary_splits_the_days_of_both_periods() {
        let q =
            parse("report=summary&domain=a.b&from=2026-11-04T06:00:00Z&to=2026-11-06T12:00:00Z")
                .unwrap();
        // Widened: 2026-11-04..07 (3 days); previous: 2026-11-01..04.
        let day = |d: &str| parse_rfc3339_utc(&format!("2026-11-{d}T00:00:00Z")).unwrap();
        let views = influx(&format!(
            r#","series":[{{"name":"x","columns":["time","pageviews","visits","load_time_median","load_time_count"],"values":[
            [{},10,4,100,8],[{},5,5,null,0],[{},7,3,300,4],[{},1,1,200,1]]}}]"#,
            day("02"),
            day("03"),
            day("04"),
            day("06")
        ));
        let events = influx(&format!(
            r#","series":[{{"name":"y","columns":["time","events"],"values":[[{},2],[{},3],[{},4]]}}]"#,
            day("03"),
            day("05"),
            day("05")
        ));
        let body = answer(
            &q,
            SessionStorage::Field,
            None,
            Source::Rollups,
            &[views.clone(), events.clone()],
        )
        .unwrap()
        .body;
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            json!({"pageviews": 8, "visits": 4, "events": 7, "load_time_ms_median": 300.0,
                   "previous": {"pageviews": 15, "visits": 9, "events": 2,
                                "load_time_ms_median": 100.0}})
        );
        let off = answer(
            &q,
            SessionStorage::Off,
            None,
            Source::Rollups,
            &[views, events],
        )
        .unwrap()
        .body;
        let json: Value = serde_json::from_slice(&off).unwrap();
        assert_eq!(json["visits"], Value::Null);
        assert_eq!(json["previous"]["visits"], Value::Null);
    }

    fn influx(series: &str) -> Vec<u8> {
        format!(r#"{{"results":[{{"statement_id":0{series}}}]}}"#).into_bytes()
    }

    #[test]
    fn table_answers_are_sorted_limited_and_csv_safe() {
        let mut q = parse("report=platforms&domain=a.b&limit=2").unwrap();
        let body = influx(
            r#","series":[
            {"name":"pf_analytics","tags":{"platform":"=cmd|' /C calc'!A0"},"columns":["time","pageviews","visits"],"values":[[0,5,3]]},
            {"name":"pf_analytics","tags":{"platform":""},"columns":["time","pageviews","visits"],"values":[[0,9,9]]},
            {"name":"pf_analytics","tags":{"platform":"Linux, x86"},"columns":["time","pageviews","visits"],"values":[[0,7,1]]},
            {"name":"pf_analytics","tags":{"platform":"Mac"},"columns":["time","pageviews","visits"],"values":[[0,1,1]]}]"#,
        );
        let json: Value = serde_json::from_slice(
            &answer(
                &q,
                SessionStorage::Field,
                None,
                Source::Raw,
                std::slice::from_ref(&body),
            )
            .unwrap()
            .body,
        )
        .unwrap();
        assert_eq!(
            json,
            json!({"rows": [
                {"key": "Linux, x86", "pageviews": 7, "visits": 1},
                {"key": "=cmd|' /C calc'!A0", "pageviews": 5, "visits": 3},
            ]}),
            "by page views, empty key left out, limited"
        );
        q.format = Format::Csv;
        let csv = String::from_utf8(
            answer(&q, SessionStorage::Field, None, Source::Raw, &[body])
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(
            csv,
            "key,pageviews,visits\r\n\"Linux, x86\",7,1\r\n'=cmd|' /C calc'!A0,5,3\r\n"
        );
    }

    #[test]
    fn csv_fields_are_quoted_and_never_formulas() {
        for (value, field) in [
            ("/a", "/a"),
            ("-60", "-60"),
            ("=1+2", "'=1+2"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("=a,b", "\"'=a,b\""),
        ] {
            assert_eq!(csv_field(value), field, "{value}");
        }
    }

    #[test]
    fn influxdb_errors_and_garbage_are_query_errors() {
        let q = parse("report=realtime&domain=a.b").unwrap();
        for body in [
            &br#"{"error":"database not found: analytics"}"#[..],
            br#"{"results":[{"statement_id":0,"error":"field type conflict"}]}"#,
            b"<html>502</html>",
            b"{}",
        ] {
            assert!(answer(
                &q,
                SessionStorage::Field,
                None,
                Source::Raw,
                &[body.to_vec()]
            )
            .is_err());
        }
        let empty = influx("");
        let json: Value = serde_json::from_slice(
            &answer(&q, SessionStorage::Off, None, Source::Raw, &[empty])
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(json, json!({"visits": null, "pageviews": 0}));
    }

    #[test]
    fn the_time_series_has_every_interval() {
        let q =
            parse("report=timeseries&domain=a.b&from=2026-11-01T00:00:00Z&to=2026-11-04T00:00:00Z")
                .unwrap();
        let day2 = parse_rfc3339_utc("2026-11-02T00:00:00Z").unwrap();
        let body = influx(&format!(
            r#","series":[{{"name":"pf_analytics","columns":["time","pageviews","visits"],"values":[[{day2},4,2]]}}]"#
        ));
        let json: Value = serde_json::from_slice(
            &answer(&q, SessionStorage::Field, None, Source::Raw, &[body])
                .unwrap()
                .body,
        )
        .unwrap();
        assert_eq!(
            json,
            json!({"interval": "1d", "points": [
                {"time": "2026-11-01T00:00:00Z", "pageviews": 0, "visits": 0},
                {"time": "2026-11-02T00:00:00Z", "pageviews": 4, "visits": 2},
                {"time": "2026-11-03T00:00:00Z", "pageviews": 0, "visits": 0},
            ]})
        );
    }
}
