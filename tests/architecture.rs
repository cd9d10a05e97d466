//! The layout's one rule that a compiler does not check: no import circle between top-level
//! modules (docs/ARCHITECTURE.md, "The layers"). Reads `src/` as text: every `crate::NAME` and
//! every name at the top of a `use crate::{...}` list is an edge from the file's top-level
//! module to NAME; test code (after a file's first `#[cfg(test)]`) is left out. A circle fails
//! the test with its members, so a new one is caught by CI, not by the next reader.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a `{...}` list (after `use crate::`) imports: `a`, `b::c`, `d::{e, f}`
/// give a, b, d.
fn list_heads(list: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut start = true;
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && !c.is_whitespace() => {
                start = false;
                if depth == 0 {
                    heads.push(ident(&list[i..]));
                }
            }
            _ => {}
        }
    }
    heads
}

/// The matching `}` of the `{` at the start of `s`, as a byte offset.
fn block_end(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeSet::new();
    let mut edges = Graph::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src/");
        let first = rel.components().next().expect("a path");
        let first = first.as_os_str().to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        modules.insert(module.clone());
        let text = std::fs::read_to_string(&path).expect("a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let targets = edges.entry(module).or_default();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            if rest.starts_with('{') {
                if let Some(end) = block_end(rest) {
                    targets.extend(list_heads(&rest[1..end]).into_iter().map(String::from));
                }
            } else {
                targets.insert(ident(rest).to_string());
            }
        }
    }
    for (module, targets) in edges.iter_mut() {
        targets.retain(|t| t != module && modules.contains(t));
    }
    edges
}

/// The strongly connected components with more than one member (Tarjan).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut c = Vec::new();
            while let Some(w) = s.stack.pop() {
                c.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                s.out.push(c);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = module_graph(&src);
    assert!(g.len() > 10, "the scan found the modules: {g:?}");
    assert!(
        g.get("server").is_some_and(|t| t.contains("hub")),
        "the scan sees imports (server uses the hub): {g:?}"
    );
    let found = circles(&g);
    assert!(
        found.is_empty(),
        "import circles between top-level modules: {found:?}\n(types below logic: see docs/ARCHITECTURE.md)"
    );
}

#[test]
fn the_circle_finder_finds_a_circle_and_reads_use_lists() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(circles(&g), vec![vec!["a", "b", "c"]]);
    g.get_mut("c").expect("c").remove("a");
    assert!(circles(&g).is_empty());
    assert_eq!(
        list_heads("config::Config, hub::{Hub, Message}, model"),
        ["config", "hub", "model"]
    );
}
