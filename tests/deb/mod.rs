//! Builds the `.deb` once per test process with `packaging/build-deb`, the documented
//! command, in the dev profile: the release build would add about a minute and a half on
//! two cores and proves nothing more about the package's contents or its units.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The package file, built on first call into `target/test-deb/NAME` (one directory per
/// test binary, so two binaries never build into the same place).
pub fn package(name: &str) -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out = repo().join("target/test-deb").join(name);
        let started = std::time::Instant::now();
        let output = Command::new(repo().join("packaging/build-deb"))
            .arg(&out)
            .env("LMP_CARGO_PROFILE", "dev")
            .output()
            .expect("packaging/build-deb did not start");
        assert!(
            output.status.success(),
            "packaging/build-deb failed ({}). Its build needs `apt-get install -y \
             --no-install-recommends debhelper` (tests/setup.sh installs it):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let deb = PathBuf::from(stdout.lines().last().expect("build-deb names the .deb"));
        eprintln!(
            "built {} in {:.1} s",
            deb.display(),
            started.elapsed().as_secs_f64()
        );
        deb
    })
}
