//! The README's configuration reference against `config/default.toml`, the defaults compiled into
//! the binary: every key is documented, nothing documented is missing from the defaults, and each
//! default the table states is the one the file sets. Needs no services.

use std::collections::BTreeMap;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde_json::Value;

const README: &str = include_str!("../../README.md");
const DEFAULTS: &str = include_str!("../../config/default.toml");

/// Keys the README documents that the defaults leave out on purpose: a server lists `tools`
/// instead of `tool_prefix` (one of the two).
const OPTIONAL: &[&str] = &["mcp.servers.<name>.tools"];

/// Every leaf of the defaults as a dotted key with its value. The example server's name and the
/// empty key ring stand for any name and id, as the README writes them.
fn defaults() -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if map.is_empty() => {
                out.insert(format!("{prefix}.<id>"), Value::Null);
            }
            Value::Object(map) => {
                for (key, value) in map {
                    let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    walk(&key, value, out);
                }
            }
            leaf => {
                out.insert(prefix.replace("mcp.servers.qlik.", "mcp.servers.<name>."), leaf.clone());
            }
        }
    }
    let tree: Value = Figment::from(Toml::string(DEFAULTS)).extract().expect("config/default.toml parses");
    let mut out = BTreeMap::new();
    walk("", &tree, &mut out);
    out
}

/// The rows of the README's configuration table: the keys of each row (`a.b` / `.c` is `a.b`
/// and `a.c`) and its default cell.
fn documented() -> Vec<(Vec<String>, String)> {
    let section = README.split("\n## Configuration\n").nth(1).expect("the README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            let mut keys: Vec<String> = Vec::new();
            for name in cells[0].split('`').skip(1).step_by(2) {
                match (name.strip_prefix('.'), keys.first()) {
                    (Some(sibling), Some(first)) => {
                        let parent = first.rsplit_once('.').expect("a dotted key").0;
                        keys.push(format!("{parent}.{sibling}"));
                    }
                    _ => keys.push(name.to_owned()),
                }
            }
            (keys, cells[1].to_owned())
        })
        .collect()
}

/// How the README writes a default value.
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

#[test]
fn every_key_of_the_defaults_is_in_the_readme_and_every_documented_key_exists() {
    let defaults = defaults();
    let documented: Vec<String> = documented().into_iter().flat_map(|(keys, _)| keys).collect();
    assert!(documented.len() > 40, "the table was not found or not parsed: {documented:?}");
    let missing: Vec<_> = defaults.keys().filter(|k| !documented.contains(k)).collect();
    assert!(missing.is_empty(), "config/default.toml keys missing from the README's table: {missing:?}");
    let unknown: Vec<_> =
        documented.iter().filter(|k| !defaults.contains_key(*k) && !OPTIONAL.contains(&k.as_str())).collect();
    assert!(unknown.is_empty(), "README keys that config/default.toml does not have: {unknown:?}");
}

#[test]
fn the_defaults_the_readme_states_are_the_ones_compiled_in() {
    let defaults = defaults();
    let mut compared = 0;
    for (keys, cell) in documented() {
        // `a` / `b` gives one value per key; a single literal may cover several keys (`qlik: ...`,
        // `…` and prose are examples, not values, and are left alone).
        let literals: Vec<&str> = cell.split(" / ").map(|part| part.trim()).collect();
        for (key, literal) in keys.iter().zip(literals.iter().cycle()) {
            let Some(value) = defaults.get(key) else { continue };
            let expected = shown(value);
            let stated = match *literal {
                "empty" => String::new(),
                "none" => continue,
                literal
                    if literal.matches('`').count() == 2
                        && literal.starts_with('`')
                        && literal.ends_with('`')
                        && !literal.contains('…') =>
                {
                    literal.trim_matches('`').to_owned()
                }
                _ => continue,
            };
            if keys.len() > 1 && literals.len() == 1 {
                continue;
            }
            assert_eq!(stated, expected, "README states {stated:?} as the default of `{key}`");
            compared += 1;
        }
    }
    assert!(compared > 30, "only {compared} defaults were compared; is the table still parsed?");
}
