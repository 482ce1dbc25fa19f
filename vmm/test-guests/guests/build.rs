//! Links every guest with `guest.ld` (`_start` at 0x100200, see the script).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/guest.ld");
    println!("cargo:rerun-if-changed=guest.ld");
}
