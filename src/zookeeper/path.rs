//! Where a lock lives in the ZooKeeper tree, as plain data (no I/O, unit-tested).
//!
//! Layout: the lock `jobs:nightly` with the prefix `distlock:` is the container node
//! `/distlock/jobs:nightly`; each contender is an ephemeral sequential child
//! `_c_<token>-lock-<sequence>` under it (Curator's `InterProcessMutex` naming, with the
//! attempt's token as the "protection" id, so the owner finds its node after a connection
//! loss during the create). The lowest sequence holds the lock.

use crate::error::{Error, Result};
use crate::key::Token;

/// Before the token in a contender's node name.
const NODE_HEAD: &str = "_c_";
/// Between the token and the sequence number.
const NODE_TAIL: &str = "-lock-";

/// The directory of all locks of one prefix: `distlock:` → `/distlock`, `app/locks` →
/// `/app/locks`. Every segment must be a valid znode name.
pub(crate) fn base_dir(prefix: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(prefix)
        .map_err(|_| Error::invalid("prefix", "a ZooKeeper prefix must be UTF-8"))?;
    let text = text.trim_end_matches(':').trim_matches('/');
    if text.is_empty() {
        return Err(Error::invalid(
            "prefix",
            "a ZooKeeper prefix must name a node (e.g. `distlock:`)",
        ));
    }
    let mut dir = String::with_capacity(text.len() + 1);
    for segment in text.split('/') {
        check_segment(segment).map_err(|why| Error::invalid("prefix", why))?;
        dir.push('/');
        dir.push_str(segment);
    }
    Ok(dir)
}

/// The node of the lock `name` under `base`. The name is one znode name: UTF-8, no `/`,
/// not `.` or `..`, no control or reserved characters.
pub(crate) fn lock_dir(base: &str, name: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(name).map_err(|_| {
        Error::invalid(
            "key",
            "a lock name on ZooKeeper must be UTF-8 (it is a znode name)",
        )
    })?;
    check_segment(text).map_err(|why| Error::invalid("key", why))?;
    Ok(format!("{base}/{text}"))
}

fn check_segment(segment: &str) -> std::result::Result<(), String> {
    if segment.is_empty() {
        return Err("a ZooKeeper node name must not be empty".into());
    }
    if segment == "." || segment == ".." {
        return Err(format!("`{segment}` is not a ZooKeeper node name"));
    }
    if segment.contains('/') {
        return Err("a ZooKeeper node name must not contain `/`".into());
    }
    if segment == "zookeeper" {
        return Err("`zookeeper` is reserved by ZooKeeper".into());
    }
    // ZooKeeper's `PathUtils.validatePath` refuses these.
    if let Some(c) = segment.chars().find(|&c| {
        c == '\u{0}'
            || ('\u{1}'..='\u{1f}').contains(&c)
            || ('\u{7f}'..='\u{9f}').contains(&c)
            || ('\u{f000}'..='\u{f8ff}').contains(&c)
            || ('\u{fff0}'..='\u{ffff}').contains(&c)
    }) {
        return Err(format!(
            "a ZooKeeper node name must not contain the character U+{:04X}",
            u32::from(c)
        ));
    }
    Ok(())
}

/// The path a contender's create is sent with; the server appends the sequence number.
pub(crate) fn node_prefix(dir: &str, token: &Token) -> String {
    format!("{dir}/{NODE_HEAD}{}{NODE_TAIL}", token_text(token))
}

fn token_text(token: &Token) -> &str {
    // The bytes are ASCII hex digits.
    std::str::from_utf8(token.as_bytes()).unwrap_or("")
}

/// The sequence number of a contender's node name; `None` for any other child.
pub(crate) fn sequence(child: &str) -> Option<i64> {
    let rest = child.strip_prefix(NODE_HEAD)?;
    let at = rest.rfind(NODE_TAIL)?;
    rest[at + NODE_TAIL.len()..].parse().ok()
}

/// Whether `child` is the node of the attempt with `token`.
pub(crate) fn is_own(child: &str, token: &Token) -> bool {
    child
        .strip_prefix(NODE_HEAD)
        .and_then(|rest| rest.strip_prefix(token_text(token)))
        .is_some_and(|rest| rest.starts_with(NODE_TAIL))
}

/// Where `own` stands in the queue `children` (names under the lock's node): `None` when it
/// is not there; `Some(None)` when it holds the lock (lowest sequence); `Some(Some(name))`,
/// the contender just before it, the only one it needs to watch.
pub(crate) fn standing<'c>(children: &'c [String], own: &str) -> Option<Option<&'c str>> {
    let mine = sequence(own)?;
    if !children.iter().any(|c| c == own) {
        return None;
    }
    let predecessor = children
        .iter()
        .filter_map(|c| Some((sequence(c)?, c.as_str())))
        .filter(|(seq, _)| *seq < mine)
        .max_by_key(|(seq, _)| *seq)
        .map(|(_, name)| name);
    Some(predecessor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_map_to_directories() {
        assert_eq!(base_dir(b"distlock:").unwrap(), "/distlock");
        assert_eq!(base_dir(b"app/locks").unwrap(), "/app/locks");
        assert_eq!(base_dir(b"/app/").unwrap(), "/app");
        assert!(base_dir(b"").is_err());
        assert!(base_dir(b":").is_err());
        assert!(base_dir(b"a//b").is_err());
        assert!(base_dir(b"a/../b").is_err());
        assert!(base_dir(&[0xff]).is_err());
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            &b"a/b"[..],
            b"/",
            b".",
            b"..",
            b"zookeeper",
            b"a\x00b",
            b"tab\there",
            &[0xc3, 0x28],
            "\u{fff5}".as_bytes(),
        ] {
            let err = lock_dir("/d", bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(ref a) if a.what() == "key"),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(lock_dir("/d", b"jobs:nightly").unwrap(), "/d/jobs:nightly");
        assert_eq!(lock_dir("/d", "zählen".as_bytes()).unwrap(), "/d/zählen");
    }

    #[test]
    fn own_node_and_predecessor() {
        let t = Token::generate();
        let own = format!("{}0000000007", &node_prefix("", &t)[1..]);
        assert!(is_own(&own, &t));
        assert!(!is_own(&own, &Token::generate()));
        assert_eq!(sequence(&own), Some(7));
        let children = vec![
            "_c_aaaa-lock-0000000009".to_string(),
            own.clone(),
            "_c_bbbb-lock-0000000003".to_string(),
            "_c_cccc-lock-0000000005".to_string(),
            "stray".to_string(),
        ];
        assert_eq!(
            standing(&children, &own),
            Some(Some("_c_cccc-lock-0000000005"))
        );
        assert_eq!(standing(&children[..1], &own), None, "own node gone");
        let alone = vec![own.clone(), "_c_z-lock-0000000008".to_string()];
        assert_eq!(standing(&alone, &own), Some(None), "lowest holds");
    }
}
