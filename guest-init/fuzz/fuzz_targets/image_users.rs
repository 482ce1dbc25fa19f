//! `/etc/passwd` and `/etc/group` come from the image (a registry's content): resolving a user
//! against any bytes must give an identity or an error, never a panic.

#![no_main]

use hearth_init::workload::user;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // user \0 passwd \0 group
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let who = parts.next().unwrap_or("");
    let passwd = parts.next().unwrap_or("");
    let group = parts.next().unwrap_or("");
    if let Ok(id) = user::resolve(who, passwd, group) {
        assert!(id.groups.contains(&id.gid));
        assert!(id.groups.windows(2).all(|w| w[0] < w[1]));
    }
});
