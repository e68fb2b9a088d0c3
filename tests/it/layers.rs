//! The rooms of the code import only rooms below them (ARCHITECTURE.md): read from the
//! sources, so a new upward import fails here instead of growing a cycle.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top: a room may import only rooms listed before it.
const LAYERS: &[&str] = &[
    "error",
    "key",
    "backoff",
    "connect",
    "sentinel",
    "metrics",
    "pool",
    "protocol",
    "options",
    "store",
    "lease",
    "redlock",
    "cluster",
    "zookeeper",
    "auto_extend",
    "notify",
    "guard",
    "wait",
    "manager",
    "multi",
    "semaphore",
    "rwlock",
    "builder",
];

/// The rooms a source file names through `crate::<room>`.
fn imports(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn room_of(path: &Path, src: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_owned())
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_room_imports_only_rooms_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let Some(room) = room_of(&file, &src) else {
            continue;
        };
        if room == "lib" {
            continue;
        }
        seen.insert(room.clone());
        let Some(level) = LAYERS.iter().position(|r| *r == room) else {
            wrong.push(format!("{room} is not in LAYERS (ARCHITECTURE.md)"));
            continue;
        };
        let source = std::fs::read_to_string(&file).expect("read source");
        for import in imports(&source) {
            if import == room {
                continue;
            }
            match LAYERS.iter().position(|r| *r == import) {
                Some(i) if i < level => {}
                Some(_) => wrong.push(format!(
                    "{} imports {import}, a room above it",
                    file.display()
                )),
                None => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(seen.len(), LAYERS.len(), "rooms found: {seen:?}");
}

#[test]
fn no_source_file_is_over_550_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > 550).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "{long:#?}");
}
