//! Label matchers (the four Prometheus types, regexes fully anchored), the series
//! selector syntax of `match[]` (`metric{name="v", other=~"re"}`), and series selection
//! over the store's postings, where a matcher on `df_NAME` (the configured prefix)
//! selects by the meta tag `NAME` ([`TagView`]).

use crate::store::{Labels, Reader, TAG_MARK};
use regex::Regex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchKind {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

#[derive(Clone, Debug)]
pub struct Matcher {
    pub name: String,
    pub kind: MatchKind,
    pub value: String,
    regex: Option<Regex>,
}

impl Matcher {
    pub fn new(kind: MatchKind, name: &str, value: &str) -> Result<Matcher, String> {
        let regex = match kind {
            MatchKind::Regex | MatchKind::NotRegex => Some(
                // Prometheus anchors every label regex at both ends.
                Regex::new(&format!("^(?s:{value})$"))
                    .map_err(|e| format!("bad regex {value:?} for label {name:?}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Matcher {
            name: name.to_string(),
            kind,
            value: value.to_string(),
            regex,
        })
    }

    /// Whether a label value (`""` when the series lacks the label) matches.
    pub fn matches(&self, v: &str) -> bool {
        match self.kind {
            MatchKind::Equal => v == self.value,
            MatchKind::NotEqual => v != self.value,
            MatchKind::Regex => self.regex.as_ref().is_some_and(|r| r.is_match(v)),
            MatchKind::NotRegex => !self.regex.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }

    pub fn matches_labels(&self, labels: &Labels) -> bool {
        self.matches_labels_named(labels, &self.name)
    }

    /// Whether the value of `name` in `labels` matches.
    pub fn matches_labels_named(&self, labels: &Labels, name: &str) -> bool {
        let v = labels
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str());
        self.matches(v)
    }
}

/// How meta tags show in queries: a matcher on `prefix + NAME` filters by the tag
/// `NAME`; with `tags_in_labels` the returned label sets carry the tags under the prefix
/// too (an original label of the same name wins).
#[derive(Clone, Copy, Debug)]
pub struct TagView<'a> {
    pub prefix: &'a str,
    pub tags_in_labels: bool,
}

impl TagView<'_> {
    /// The tag a label name stands for, if it has the prefix.
    pub fn tag_name<'n>(&self, name: &'n str) -> Option<&'n str> {
        name.strip_prefix(self.prefix)
            .filter(|t| !self.prefix.is_empty() && !t.is_empty())
    }

    /// The name under which the postings index `name`.
    pub fn index_name<'n>(&self, name: &'n str) -> std::borrow::Cow<'n, str> {
        match self.tag_name(name) {
            Some(t) => format!("{TAG_MARK}{t}").into(),
            None => name.into(),
        }
    }

    /// The name an index name is shown under.
    pub fn shown_name(&self, index_name: &str) -> String {
        match index_name.strip_prefix(TAG_MARK) {
            Some(t) => format!("{}{t}", self.prefix),
            None => index_name.to_string(),
        }
    }

    /// `labels` plus `tags` under the prefix (originals win), sorted.
    pub fn with_tags(&self, mut labels: Labels, tags: Labels) -> Labels {
        for (n, v) in tags {
            let n = format!("{}{n}", self.prefix);
            if !labels.iter().any(|(ln, _)| *ln == n) {
                labels.push((n, v));
            }
        }
        labels.sort();
        labels
    }
}

/// The series matching every matcher, sorted by the label sets returned (original
/// labels, plus the tags if `view.tags_in_labels`).
pub fn select(
    r: &Reader,
    matchers: &[Matcher],
    view: TagView<'_>,
) -> anyhow::Result<Vec<(u64, Labels)>> {
    // Candidates from the matchers that need a non-empty value (they can use postings).
    let mut candidates: Option<Vec<u64>> = None;
    for m in matchers {
        if m.matches("") {
            continue;
        }
        let name = view.index_name(&m.name);
        let ids = match m.kind {
            MatchKind::Equal => r.postings(&name, &m.value)?,
            // `=~`, and `!=` / `!~` that do not match "" (the series must have the
            // label): the union of the postings of every value that matches.
            _ => {
                let mut ids: Vec<u64> = r
                    .values_of(&name)?
                    .into_iter()
                    .filter(|(v, _)| m.matches(v))
                    .flat_map(|(_, ids)| ids)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        candidates = Some(match candidates {
            None => ids,
            Some(c) => intersect(&c, &ids),
        });
        if candidates.as_ref().is_some_and(|c| c.is_empty()) {
            return Ok(Vec::new());
        }
    }
    let ids = match candidates {
        Some(c) => c,
        None => r.all_series()?,
    };
    let need_tags =
        view.tags_in_labels || matchers.iter().any(|m| view.tag_name(&m.name).is_some());
    let mut out = Vec::with_capacity(ids.len());
    for sid in ids {
        let Some(labels) = r.labels(sid)? else {
            continue;
        };
        let tags = if need_tags {
            r.tags(sid)?
        } else {
            Labels::new()
        };
        let ok = matchers.iter().all(|m| match view.tag_name(&m.name) {
            Some(t) => m.matches_labels_named(&tags, t),
            None => m.matches_labels(&labels),
        });
        if ok {
            let shown = if view.tags_in_labels {
                view.with_tags(labels, tags)
            } else {
                labels
            };
            out.push((sid, shown));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

fn intersect(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// Parses a series selector: `name`, `name{...}` or `{...}`, with `=`, `!=`, `=~`, `!~`
/// and double-, single- or back-quoted values (Go escapes in the first two).
pub fn parse_selector(s: &str) -> Result<Vec<Matcher>, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    p.ws();
    if let Some(name) = p.ident() {
        out.push(Matcher::new(MatchKind::Equal, "__name__", &name)?);
    }
    p.ws();
    if p.eat(b'{') {
        loop {
            p.ws();
            if p.eat(b'}') {
                break;
            }
            let name = p
                .ident()
                .ok_or_else(|| format!("selector {s:?}: expected a label name at byte {}", p.i))?;
            p.ws();
            let kind = if p.eat_str("=~") {
                MatchKind::Regex
            } else if p.eat_str("!~") {
                MatchKind::NotRegex
            } else if p.eat_str("!=") {
                MatchKind::NotEqual
            } else if p.eat(b'=') {
                MatchKind::Equal
            } else {
                return Err(format!(
                    "selector {s:?}: expected =, !=, =~ or !~ at byte {}",
                    p.i
                ));
            };
            p.ws();
            let value = p.string().map_err(|e| format!("selector {s:?}: {e}"))?;
            out.push(Matcher::new(kind, &name, &value)?);
            p.ws();
            if p.eat(b',') {
                continue;
            }
            p.ws();
            if p.eat(b'}') {
                break;
            }
            return Err(format!("selector {s:?}: expected , or }} at byte {}", p.i));
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("selector {s:?}: unexpected text at byte {}", p.i));
    }
    if out.is_empty() {
        return Err(format!("selector {s:?} has no matchers"));
    }
    if out.iter().all(|m| m.matches("")) {
        return Err(format!(
            "selector {s:?} must contain at least one matcher that does not match the empty string"
        ));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<String> {
        let start = self.i;
        while self.i < self.s.len() {
            let c = self.s[self.i];
            let ok = c == b'_'
                || c == b':'
                || c.is_ascii_alphabetic()
                || (self.i > start && c.is_ascii_digit());
            if !ok {
                break;
            }
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = *self
            .s
            .get(self.i)
            .ok_or("expected a quoted value, found the end")?;
        if !matches!(quote, b'"' | b'\'' | b'`') {
            return Err(format!("expected a quoted value at byte {}", self.i));
        }
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            if c == quote {
                return String::from_utf8(out).map_err(|_| "value is not UTF-8".to_string());
            }
            if c == b'\\' && quote != b'`' {
                let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                self.i += 1;
                match e {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'\\' | b'"' | b'\'' => out.push(e),
                    _ => {
                        out.push(b'\\');
                        out.push(e);
                    }
                }
            } else {
                out.push(c);
            }
        }
        Err("unterminated quoted value".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_are_anchored_and_empty_matches_missing_labels() {
        let m = Matcher::new(MatchKind::Regex, "job", "node").unwrap();
        assert!(m.matches("node"));
        assert!(!m.matches("node_exporter"), "unanchored suffix matched");
        assert!(!m.matches("a_node"), "unanchored prefix matched");
        let m = Matcher::new(MatchKind::Regex, "job", "a|b").unwrap();
        assert!(m.matches("a") && m.matches("b") && !m.matches("ab"));
        let m = Matcher::new(MatchKind::NotEqual, "x", "y").unwrap();
        assert!(m.matches_labels(&vec![("a".into(), "b".into())]));
    }

    #[test]
    fn selectors_parse() {
        let ms = parse_selector(r#"up{job=~"no.*", instance!="a\"b"}"#).unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].name, "__name__");
        assert_eq!(ms[1].kind, MatchKind::Regex);
        assert_eq!(ms[2].value, "a\"b");
        assert!(parse_selector("{}").is_err());
        assert!(parse_selector(r#"{a=~".*"}"#).is_err());
        assert!(parse_selector(r#"up{a="b""#).is_err());
        assert!(parse_selector(r#"{a="b",}"#).is_ok());
    }
}
