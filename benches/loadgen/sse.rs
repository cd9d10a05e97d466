//! An EventSource-conformant event parser (the parts a benchmark client needs): lines → events
//! with their `event` type, `data` (lines joined by LF) and the last-event-id buffer, which —
//! as in a browser — is what a reconnect sends as `Last-Event-ID`. Comments are skipped.

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// "message" when the event had no `event:` field.
    pub kind: String,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct Parser {
    kind: String,
    data: Vec<u8>,
    has_data: bool,
    /// The last `id:` seen (EventSource's last event ID buffer).
    pub last_id: Option<String>,
}

impl Parser {
    /// One line (without its line ending); returns an event when the line ends one.
    pub fn line(&mut self, l: &[u8]) -> Option<Event> {
        if l.is_empty() {
            let kind = std::mem::take(&mut self.kind);
            let data = std::mem::take(&mut self.data);
            if !std::mem::take(&mut self.has_data) {
                return None;
            }
            let kind = if kind.is_empty() {
                "message".into()
            } else {
                kind
            };
            return Some(Event { kind, data });
        }
        if l[0] == b':' {
            return None;
        }
        let (name, value) = match l.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &l[i + 1..];
                (&l[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (l, &b""[..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.kind = String::from_utf8_lossy(value).into_owned(),
            b"id" if !value.contains(&0) => {
                self.last_id = Some(String::from_utf8_lossy(value).into_owned())
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events() {
        let mut p = Parser::default();
        let mut got = Vec::new();
        for l in [
            &b": keepalive"[..],
            b"",
            b"id: 1-0",
            b"data: a",
            b"data: b",
            b"",
            b"event: crier.gap",
            b"data: {\"next\":\"5-0\"}",
            b"",
        ] {
            got.extend(p.line(l));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].kind.as_str(), &got[0].data[..]),
            ("message", &b"a\nb"[..])
        );
        assert_eq!(got[1].kind, "crier.gap");
        assert_eq!(p.last_id.as_deref(), Some("1-0"));
    }
}
