//! Query-string parameters, read in one place: split at `&` and `=`, percent-decoded (and `+`
//! as a space), by `form_urlencoded`, as browsers encode them.

use std::borrow::Cow;

/// The first value of parameter `name`, decoded. `?a` (no `=`) has the value "".
pub fn param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_takes_the_first() {
        let q = Some("a=1&last_event_id=17-0&x=%2Fy&a=2&flag&sp=a+b");
        assert_eq!(param(q, "a").as_deref(), Some("1"));
        assert_eq!(param(q, "last_event_id").as_deref(), Some("17-0"));
        assert_eq!(param(q, "x").as_deref(), Some("/y"));
        assert_eq!(param(q, "flag").as_deref(), Some(""));
        assert_eq!(param(q, "sp").as_deref(), Some("a b"));
        assert_eq!(param(q, "missing"), None);
        assert_eq!(param(None, "a"), None);
        assert_eq!(
            param(Some("last_event_id=1%2D0"), "last_event_id").as_deref(),
            Some("1-0")
        );
    }
}
