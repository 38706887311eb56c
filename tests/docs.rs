//! The documentation keeps up with the code: every configuration key in
//! `config/default.toml` (its commented-out examples included) is in
//! `docs/configuration.md` and the other way round, each documented
//! environment variable is the key's, and every relative link in README.md
//! and docs/ points to a file (and heading) that exists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const REFERENCE: &str = "docs/configuration.md";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The name of a table header line (`[cache.redis]`, `[[routes.params]]`).
fn header(line: &str) -> Option<&str> {
    let inner = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]"));
    let inner = inner.or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')))?;
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.';
    inner.chars().all(plain).then_some(inner)
}

/// Every key of `config/default.toml`, as `section.key`: the active ones
/// (from the parsed file) and the commented-out examples (a comment line
/// that parses as one TOML assignment, under the last header above it,
/// commented or not). Tables written as headers are sections and are walked
/// into; any other value (an inline table, a list, `clients = []`) is one key.
fn default_toml_keys() -> BTreeSet<String> {
    let mut sections = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in DEFAULT_TOML.lines() {
        let uncommented = line.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
        if let Some(name) = header(uncommented.trim_end()) {
            sections.insert(name.to_owned());
            section = name.to_owned();
        } else if line.trim_start().starts_with('#')
            && let Ok(table) = uncommented.parse::<toml::Table>()
            && table.len() == 1
        {
            keys.extend(table.keys().map(|k| join(&section, k)));
        }
    }
    let parsed: toml::Table = DEFAULT_TOML.parse().expect("config/default.toml parses");
    walk(&parsed, "", &sections, &mut keys);
    keys
}

fn walk(
    table: &toml::Table,
    prefix: &str,
    sections: &BTreeSet<String>,
    keys: &mut BTreeSet<String>,
) {
    for (key, value) in table {
        let path = join(prefix, key);
        match value {
            toml::Value::Table(inner) if sections.contains(&path) => {
                walk(inner, &path, sections, keys)
            }
            toml::Value::Array(items) if sections.contains(&path) && !items.is_empty() => {
                for item in items {
                    let inner = item.as_table().expect("an array of tables");
                    walk(inner, &path, sections, keys);
                }
            }
            _ => {
                keys.insert(path);
            }
        }
    }
}

/// The cells of a Markdown table row, trimmed (`|` inside backticks is not
/// a separator).
fn cells(row: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut code = false;
    let mut escaped = false;
    for c in row.trim().trim_matches('|').chars() {
        match c {
            '`' => code = !code,
            '\\' if !code => escaped = true,
            '|' if !code && !escaped => {
                cells.push(String::new());
                continue;
            }
            _ => escaped = false,
        }
        if let Some(cell) = cells.last_mut() {
            cell.push(c);
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

/// The reference's documented keys (the first column of its tables, one
/// backticked dotted key) with their env column.
fn documented_keys() -> BTreeMap<String, String> {
    let text = read(&root().join(REFERENCE));
    let mut keys = BTreeMap::new();
    for row in text.lines().filter(|l| l.starts_with("| `")) {
        let cells = cells(row);
        let key = cells[0].trim_matches('`').to_owned();
        let env = cells.get(1).cloned().unwrap_or_default();
        assert!(
            keys.insert(key.clone(), env).is_none(),
            "{REFERENCE}: `{key}` is documented twice"
        );
    }
    keys
}

#[test]
fn every_default_toml_key_is_documented_and_every_documented_key_exists() {
    let in_file = default_toml_keys();
    let documented = documented_keys();
    // A sample the walk must find, so that the test cannot pass by finding nothing.
    for expected in [
        "server.listen",
        "server.max_connections",
        "cache.redis.url",
        "clients.token_sha256",
        "issuers.hs256_secret_file",
        "routes.ttl_by",
        "routes.params.strip_prefix",
        "warmup.questions",
    ] {
        assert!(
            in_file.contains(expected),
            "default.toml: {expected} not found"
        );
    }
    let undocumented: Vec<_> = in_file
        .iter()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    assert!(
        undocumented.is_empty(),
        "keys of config/default.toml missing from {REFERENCE}: {undocumented:?}"
    );
    let unknown: Vec<_> = documented
        .keys()
        .filter(|k| !in_file.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "keys in {REFERENCE} that config/default.toml does not have: {unknown:?}"
    );
}

#[test]
fn documented_environment_variables_are_the_keys_own() {
    for (key, env) in documented_keys() {
        // `—`: file only (list entries); else the variable leads the cell.
        let Some(var) = env.strip_prefix('`').and_then(|e| e.split('`').next()) else {
            continue;
        };
        let expected = format!("KEYAPI_PROXY__{}", key.replace('.', "__").to_uppercase());
        assert_eq!(var, expected, "{REFERENCE}: the variable of `{key}`");
    }
}

/// GitHub's anchor for a heading: lower-cased, punctuation dropped, spaces
/// as `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let slug: String = title
            .trim_start_matches('#')
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_default();
        anchors.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    anchors
}

/// Relative link targets `(target)` after `](`, outside code spans and blocks.
fn links(markdown: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        for part in prose.split("](").skip(1) {
            if let Some(target) = part.split(')').next() {
                links.push(target.to_owned());
            }
        }
    }
    links
        .into_iter()
        .filter(|t| !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let docs = fs::read_dir(root().join("docs")).expect("docs/ exists");
    let mut in_docs: Vec<_> = docs
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_docs.sort();
    files.extend(in_docs);
    files
}

#[test]
fn relative_links_point_to_existing_files_and_headings() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        for link in links(&text) {
            checked += 1;
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a directory").join(path)
            };
            let name = file
                .strip_prefix(root())
                .unwrap_or(&file)
                .display()
                .to_string();
            if !target.exists() {
                broken.push(format!("{name}: {link} (no such file)"));
            } else if !anchor.is_empty()
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&read(&target)).contains(anchor)
            {
                broken.push(format!("{name}: {link} (no such heading)"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser right?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
