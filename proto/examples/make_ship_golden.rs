//! Writes the golden ship-protocol frames and their README under `testdata/ship/`.
//!
//! Run with `cargo run -p promgate-proto --example make_ship_golden`; the files are
//! committed, and `tests/ship_golden.rs` requires that encoding the same fixed values
//! (`tests/ship_fixture/mod.rs`) still gives these exact bytes, so running this again
//! must leave `git diff` empty unless the wire format changed on purpose.

#[path = "../tests/ship_fixture/mod.rs"]
mod ship_fixture;

fn main() -> std::io::Result<()> {
    let dir = ship_fixture::golden_dir();
    std::fs::create_dir_all(&dir)?;
    let goldens = ship_fixture::goldens();
    for g in &goldens {
        std::fs::write(dir.join(g.file), &g.bytes)?;
        println!("{:<18} {:>5} bytes", g.file, g.bytes.len());
    }
    std::fs::write(dir.join("README.md"), ship_fixture::readme(&goldens))?;
    println!("README.md");
    Ok(())
}
