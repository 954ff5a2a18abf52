//! Embeds the files of `migrations/` into the binary, in file-name order, so a deployed binary
//! carries exactly the migrations it was built with and needs no folder beside it.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("the migrations/ folder is readable")
        .map(|entry| entry.expect("a readable directory entry").file_name().into_string().expect("a UTF-8 file name"))
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();
    let mut out = String::from(
        "/// `(file name, contents)` of every migration, in order.\npub const EMBEDDED: &[(&str, &str)] = &[\n",
    );
    for name in &names {
        let digits = name.split('_').next().unwrap_or("");
        assert!(
            digits.len() == 4 && digits.chars().all(|c| c.is_ascii_digit()),
            "migration file {name} must be named NNNN_description.json"
        );
        let path = dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(out, "    ({name:?}, include_str!({:?})),", path.display().to_string()).unwrap();
    }
    out.push_str("];\n");
    let target = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(target, out).unwrap();
}
